"""Building blocks and checks shared by the tests."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch._inductor import config as inductor_config
from torch._dynamo.utils import counters

import convbn_pass
from convbn_pass import backends, zoo
from convbn_pass.core.records import COUNTER

CompileFn = Callable[[nn.Module], Callable[..., Any]]

# torch 2.8 and 2.9 have neither the setting nor mode="lite": pre-grad passes always run.
needs_pre_grad_switch = pytest.mark.skipif(
    not hasattr(inductor_config, "use_pre_grad_passes"),
    reason=f"torch {torch.__version__} has no use_pre_grad_passes setting: pre-grad passes "
           f"always run")

KINDS = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d", "linear"]

_CONV = {
    "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d,
    "conv_transpose1d": nn.ConvTranspose1d, "conv_transpose2d": nn.ConvTranspose2d,
    "conv_transpose3d": nn.ConvTranspose3d,
}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


def dims(kind: str) -> int:
    return 0 if kind == "linear" else int(kind[-2])


def block(kind: str, *, bias: bool = True, affine: bool = True, groups: int = 1,
          c_in: int = 4, c_out: int = 6, seed: int = 0, **conv_kw: Any) -> nn.Sequential:
    """``conv → BN`` (``linear → BatchNorm1d``) in eval mode with non-trivial statistics."""
    torch.manual_seed(seed)
    if kind == "linear":
        conv: nn.Module = nn.Linear(c_in, c_out, bias=bias)
        bn: nn.Module = nn.BatchNorm1d(c_out, affine=affine)
    else:
        conv_kw.setdefault("kernel_size", 3)
        conv = _CONV[kind](c_in, c_out, groups=groups, bias=bias, **conv_kw)
        bn = _BN[dims(kind)](c_out, affine=affine)
    return zoo.randomize_bn(nn.Sequential(conv, bn), seed).eval()


def sample(kind: str, batch: int = 2, c_in: int = 4, seed: int = 1,
           dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, c_in) + (() if kind == "linear" else _SPATIAL[dims(kind)])
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


class Step:
    """One forward/backward of ``fn`` on a fresh copy of ``model``: output and gradients."""

    def __init__(self, model: nn.Module, x: torch.Tensor,
                 compile_fn: Callable[[nn.Module], Callable[..., Any]] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.model = copy.deepcopy(model)
        if dtype is not None:
            self.model = self.model.to(dtype)
            x = x.to(dtype)
        self.buffers_before = {k: v.clone() for k, v in self.model.named_buffers()}
        fn = compile_fn(self.model) if compile_fn is not None else self.model
        self.x = x.detach().clone().requires_grad_(True)
        self.out = fn(self.x)
        # A fixed, non-uniform upstream gradient so that every output element matters.
        gen = torch.Generator().manual_seed(7)
        upstream = torch.randn(self.out.shape, generator=gen, dtype=torch.float64)
        (self.out * upstream.to(self.out)).sum().backward()
        self.grads = {"input": self.x.grad}
        self.grads.update({k: p.grad for k, p in self.model.named_parameters()})

    def buffers_unchanged(self) -> bool:
        return all(torch.equal(v, self.buffers_before[k])
                   for k, v in self.model.named_buffers())


def errors(step: Step, ref: Step) -> dict[str, float]:
    """Relative error of the output and of every gradient of ``step`` against ``ref``."""
    errs = {"output": rel_err(step.out, ref.out)}
    for name, grad in ref.grads.items():
        if grad is None:  # a parameter the model does not use
            assert step.grads.get(name) is None, f"a gradient reached unused {name}"
            continue
        assert step.grads[name] is not None, f"no gradient reached {name}"
        errs[name] = rel_err(step.grads[name], grad)
    return errs


# --- Compiling, shared by every test file ---------------------------------------------

def light(policy: str | None) -> CompileFn:
    """``torch.compile`` through the light backend (the pass, then AOTAutograd, no code
    generation); ``policy=None``: the same backend without the pass."""
    return lambda model: torch.compile(model, backend=backends.light(policy))


def inductor_options(policy: str | None, **opts: Any) -> dict[str, Any]:
    """Inductor options with the pass under ``policy`` (None: without it), FX graph
    cache off unless ``opts`` say otherwise, so that the pass runs every time."""
    opts.setdefault("fx_graph_cache", False)
    return convbn_pass.options(policy, **opts) if policy is not None else opts


def inductor(policy: str | None, **opts: Any) -> CompileFn:
    """``torch.compile`` through Inductor, options as :func:`inductor_options`."""
    options = inductor_options(policy, **opts)
    return lambda model: torch.compile(model, options=options)


def counts() -> dict[str, int]:
    """This test's ``counters["convbn_pass"]``, zero entries left out."""
    return {k: v for k, v in counters[COUNTER].items() if v}


def tuned() -> int:
    return counters[COUNTER]["tuned"]


def check_every_pair_tuned(plan: Any) -> None:
    """Every region of a ``convbn_pass.regions.RegionPlan`` had its pairs tuned together
    in one graph (named from the region), and the graphs that are no region's hold
    exactly the root's pairs."""
    decided = convbn_pass.decisions()
    assert decided and all(d.tuned for d in decided)
    graphs: dict[int, set[tuple[str, str]]] = {}
    for d in decided:
        graphs.setdefault(d.graph, set()).add((d.conv, d.bn))
    expected = {r: {(_rel(p.conv, r), _rel(p.bn, r)) for p in plan.pairs
                    if plan.region_of(p) == r} for r in plan.regions}
    for region, pairs in expected.items():
        if pairs:
            assert pairs in graphs.values(), region
    rest = [g for g in graphs.values() if g not in expected.values()]
    assert set().union(*rest) == {(p.conv, p.bn) for p in plan.pairs if plan.region_of(p) == ""}


def _rel(path: str, region: str) -> str:
    return path[len(region) + 1:]


def run_fresh(code: str, *args: str, **env: str) -> Any:
    """Run ``code`` in a fresh Python process (this environment, plus ``env``) with
    ``args`` as its ``sys.argv[1:]``; returns the JSON its last stdout line holds."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def small_resnet() -> nn.Module:
    """A ResNet with one Bottleneck a stage at width 8, float64, eval mode, random BN
    statistics: the model the two-process (DDP, FSDP2) tests train."""
    torch.manual_seed(0)
    model = zoo.ResNet(zoo.Bottleneck, [1, 1, 1, 1], num_classes=4, width=8)
    return zoo.randomize_bn(model).eval().double()


def image_batches(steps: int) -> list[torch.Tensor]:
    """``steps`` fixed float64 batches of four 32×32 images for :func:`small_resnet`."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(steps)]
