"""Each Conv→BN block of a model, timed alone: the data for the ``auto`` policy.

The ``auto`` policy tunes a block when its conv output has at least
``AUTO_RATIO`` times as many elements as its weight. Whether that is the right
line is a question about single blocks: how much slower (or faster) is a block
in Tune mode (W′ rebuilt in backward) than in Eval mode, as a function of
activation elements / weight elements, or of output positions N·H·W (the conv's
multiply-adds per weight element: the weight-side work of Tune mode is a few
passes over the weight, so its cost relative to a compute-bound conv goes as
1 / (N·H·W))? This module cuts every distinct block
out of a model (same conv, same BatchNorm, same input shape, followed by the
activation the model puts after that BatchNorm: ReLU6 in MobileNetV2, none after a
projection, ReLU in the ResNets), and measures each one with the harness: modes
``compile`` (Eval), ``pass_memory`` (Tune, W′ rebuilt) and the ``compile_twin``
noise reference. Each block's ``auto_action`` is what the ``auto`` policy does to
that block in the whole model, the CPU activation rule included: the pass's own
decision, read from one compile of the model through the light backend.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import deploy
from convbn_pass.step import train_step

from . import harness
from .records import BlockResult

__all__ = ["BLOCK_MODES", "model_blocks", "measure_blocks"]

BLOCK_MODES = ["compile", "compile_twin", "pass_memory"]


def _describe(conv: nn.Module) -> str:
    if isinstance(conv, nn.Linear):
        return f"linear {conv.in_features}->{conv.out_features}"
    assert isinstance(conv, nn.modules.conv._ConvNd)
    kind = "convT" if conv.transposed else "conv"
    k = "x".join(map(str, conv.kernel_size))
    text = f"{kind} {k} {conv.in_channels}->{conv.out_channels}"
    if conv.stride != (1,) * len(conv.stride):
        text += f" s{conv.stride[0]}"
    if conv.groups != 1:
        text += f" g{conv.groups}"
    return text


Modules = tuple[nn.Module, nn.Module, nn.Module]  # conv, BatchNorm, the activation after it


def model_blocks(model_name: str, batch: int, px: int,
                 seed: int = 0) -> list[tuple[BlockResult, Modules]]:
    """The distinct Conv→BN blocks of a model at this batch, each as its record (not
    measured yet: input shape, sizes, how many times it occurs) and its modules."""
    model, x = harness.setup(model_name, batch, px, seed=seed)
    pairs = deploy.pairs(model, x)
    auto = _auto_actions(model, x)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for conv_path, _ in pairs:
        def record(module: nn.Module, args: Any, path: str = conv_path) -> None:
            shapes[path] = tuple(args[0].shape)
        hooks.append(model.get_submodule(conv_path).register_forward_pre_hook(record))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    found: dict[tuple[Any, ...], tuple[BlockResult, Modules]] = {}
    for conv_path, bn_path in pairs:
        conv = model.get_submodule(conv_path)
        in_shape = shapes[conv_path]
        key = (repr(conv), in_shape)
        if key in found:
            found[key][0].count += 1
            found[key][0].paths.append(conv_path)
            continue
        with torch.no_grad():
            out = conv(torch.zeros(in_shape))
        channels = out.shape[1]
        act = _activation_after(model, bn_path)
        ratio = out.numel() / conv.weight.numel()
        record = BlockResult(
            model_name, batch, input_shape=list(in_shape), px=px,
            block=_describe(conv) + f" +{type(act).__name__}", paths=[conv_path],
            weight_numel=conv.weight.numel(), activation_numel=out.numel(),
            # Output positions N·H·W = MACs / weight elements, for every conv kind.
            positions=out.numel() // channels, act_over_weight=ratio,
            auto_action=auto.get(conv_path))
        found[key] = (record, (conv, model.get_submodule(bn_path), act))
    return list(found.values())


def _auto_actions(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """The ``auto`` policy's action on each conv of the model (by module path), as the
    pass decides it in one light-backend compile of the whole model."""
    rewrites: list[convbn_pass.GraphRewrite] = []
    tuned, fn = harness.MODES["pass_auto"].build(model, x, rewrites.append, light=True)
    train_step(fn, tuned, x)
    torch._dynamo.reset()
    return {d.conv: str(d.action) for r in rewrites for d in r.decisions}


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Identity)


def _activation_after(model: nn.Module, bn_path: str) -> nn.Module:
    """The activation that follows the BatchNorm when both sit in one ``nn.Sequential``
    (the zoo's conv_bn blocks: ReLU, ReLU6, SiLU, or none); ReLU otherwise (the ResNet
    blocks call ``self.relu`` from ``forward``)."""
    parent_path, _, name = bn_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        index = names.index(name)
        if index + 1 < len(names):
            following = parent[index + 1]
            if isinstance(following, _ACTIVATIONS):
                return copy.deepcopy(following)
        return nn.Identity()  # the BN ends its Sequential: nothing fused after it
    return nn.ReLU()


def measure_blocks(model_name: str, batch: int, settings: harness.Settings,
                   budget: harness.Budget, log: harness.Log) -> list[BlockResult]:
    """Measure every distinct block of the model at this batch."""
    results = []
    blocks = model_blocks(model_name, batch, settings.px, settings.seed)
    modes = harness.modes_for(BLOCK_MODES)
    estimate = 0.0
    for i, (block, (conv, bn, act)) in enumerate(blocks, 1):
        if not budget.allows(3 * estimate + 10):
            log(f"  block {i}/{len(blocks)} and later skipped: time budget")
            break
        module = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), act).eval()
        x = torch.randn(*(block.input_shape or []))
        log(f"  block {i}/{len(blocks)} {block.block} in {tuple(x.shape)}: "
            f"activation/weight = {block.act_over_weight:.2f}")
        torch._dynamo.reset()
        harness.measure_module(block, module, x, settings, modes, budget, log, estimate)
        estimate = max(estimate, block.max_first_s or 0.0)
        results.append(block)
        torch._dynamo.reset()
    return results
