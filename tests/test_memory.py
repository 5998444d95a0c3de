"""Activation memory kept for backward: the pass reaches Deploy mode's floor.

Bytes are counted with saved-tensor hooks (convbn_pass.memory): deterministic,
the same on any machine for the same graph.
"""

from __future__ import annotations


import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from convbn_pass import backends, deploy, memory, zoo
from convbn_pass.core.records import COUNTER
from helpers import inductor, light

pytestmark = pytest.mark.version  # in the version suite (pytest -m version)


def _resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    model = zoo.randomize_bn(zoo.build("resnet_tiny")[0]).eval()
    return model, torch.randn(4, 3, 32, 32)


def _saved(model: torch.nn.Module, x: torch.Tensor, compile_fn) -> int:
    return memory.saved_activation_bytes(compile_fn(model), model, x)


def _check_floor(make) -> dict[str, int]:
    model, x = _resnet()
    folded = deploy.fold(model, x)
    figures = {
        "eval": _saved(model, x, make(None)),
        "deploy": _saved(folded, x, make(None)),
    }
    assert torch._dynamo.utils.counters[COUNTER]["tuned"] == 0
    figures["tune"] = _saved(model, x, make("memory"))
    assert torch._dynamo.utils.counters[COUNTER]["tuned"] == 12
    assert abs(figures["tune"] - figures["deploy"]) <= 0.01 * figures["deploy"], figures
    assert figures["tune"] < figures["eval"], figures
    return figures


def test_light_backend_reaches_deploy_floor():
    figures = _check_floor(light)
    # Keeping W′ (what the built-in pass does) costs an extra weight per block.
    model, x = _resnet()
    assert _saved(model, x, light("keep_weight")) > figures["tune"]


@pytest.mark.inductor
def test_inductor_reaches_deploy_floor():
    _check_floor(inductor)


def test_forward_graph_saves_neither_conv_output_nor_weight():
    """The partitioned forward graph's saved outputs: no conv output of a tuned
    block and no node that builds W′."""
    model, x = _resnet()
    forward: list[torch.fx.GraphModule] = []

    def keep(kind, gm):
        if kind == "forward":
            forward.append(gm)
    compiled = torch.compile(model, backend=backends.light("memory", on_partition=keep))
    compiled(x).sum().backward()
    (gm,) = forward
    outputs = gm.graph.output_node().args[0]
    saved = [n for n in outputs[1:] if isinstance(n, torch.fx.Node)]  # [0] is the model output
    assert saved, "a forward graph that saves nothing: the check would be empty"
    recompute = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
    offenders = [n.name for n in saved
                 if n.target is torch.ops.aten.convolution.default
                 or n.meta.get("recompute") in recompute]
    assert not offenders, offenders
    # ...while without the pass the conv outputs are there.
    torch._dynamo.reset()
    forward.clear()

    torch.compile(model, backend=backends.light(None, on_partition=keep))(x).sum().backward()
    plain_saved = forward[0].graph.output_node().args[0][1:]
    assert any(isinstance(n, torch.fx.Node) and n.target is torch.ops.aten.convolution.default
               for n in plain_saved)
