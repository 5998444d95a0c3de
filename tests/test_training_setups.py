"""Real training setups: mixed precision, channels_last, dynamic shapes, frozen BN
variants, DDP, Inductor's caches, and other pre-grad passes."""

from __future__ import annotations

import contextlib
import copy
import statistics
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import convbn_pass
from convbn_pass.core import compat
from convbn_pass import backends, memory, zoo
from convbn_pass.core.records import COUNTER
from helpers import (Step, block, errors, inductor, inductor_options, light, rel_err, run_fresh,
                     sample, tuned)

TOL = 1e-10


# --- Mixed precision ----------------------------------------------------------------------

def _amp_step(model: nn.Module, x: torch.Tensor, compile_fn, dtype: torch.dtype | None,
              cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Output and gradients under autocast(``dtype``) or with the model cast to ``cast``."""
    model = copy.deepcopy(model)
    if cast is not None:
        model, x = model.to(cast), x.to(cast)
    fn = compile_fn(model) if compile_fn else model
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = fn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    grads = {"output": out, "input": x.grad}
    grads.update({k: p.grad for k, p in model.named_parameters()})
    return grads


def _ratios_over_seeds(kind: str, seeds: int, make, dtype=None, cast=None) -> dict[str, float]:
    """Per quantity, the median over seeds of (error with the pass) / (error without),
    both errors measured against a float64 eager reference."""
    ratios: dict[str, list[float]] = {}
    for seed in range(seeds):
        model = block(kind, seed=seed, c_in=16, c_out=16)
        x = sample(kind, batch=4, c_in=16, seed=seed)
        ref = _amp_step(copy.deepcopy(model).double(), x.double(), None, None)
        without = _amp_step(model, x, make(None), dtype, cast)
        with_pass = _amp_step(model, x, make("memory"), dtype, cast)
        assert with_pass["output"].dtype == without["output"].dtype
        for name, value in ref.items():
            if value is not None:
                ratios.setdefault(name, []).append(
                    rel_err(with_pass[name], value) / rel_err(without[name], value))
    return {name: statistics.median(r) for name, r in ratios.items()}


# One draw is noise: the γ gradient's error ratio ranges 0.6–1.8 across draws while
# its median stays near 1, so the criterion is the median over draws, per quantity.
AMP_SEEDS = 8
AMP_LIMIT = 1.10


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_error_no_worse_than_without_pass(kind, dtype):
    medians = _ratios_over_seeds(kind, AMP_SEEDS, light, dtype=dtype)
    worse = {k: round(v, 3) for k, v in medians.items() if v > AMP_LIMIT}
    assert not worse, worse


# A model cast to half precision has half weights: W′ = W·c is rounded once more
# than W, and dW = dW′·c once more than dW. Measured medians over 8 draws range
# 0.90–1.22 per quantity (bf16 and fp16; conv2d, conv_transpose2d, linear), so
# the 10% bound that autocast meets does not hold here; this pins the measured cost.
HALF_MODEL_LIMIT = 1.25


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_half_model_error_close_to_without_pass(kind, cast):
    medians = _ratios_over_seeds(kind, AMP_SEEDS, light, cast=cast)
    worse = {k: round(v, 3) for k, v in medians.items() if v > HALF_MODEL_LIMIT}
    assert not worse, worse


@pytest.mark.inductor
def test_autocast_through_inductor():
    """Inductor compiles the rewritten graph under autocast (its joint-graph passes
    once broke the recompute region), with the same error bound."""
    medians = _ratios_over_seeds("conv2d", 5, inductor, dtype=torch.bfloat16)
    worse = {k: round(v, 3) for k, v in medians.items() if v > AMP_LIMIT}
    assert not worse, worse


# --- channels_last -------------------------------------------------------------------------

@pytest.mark.parametrize("compile_fn", [light("memory"), inductor("memory")],
                         ids=["light", "inductor"])
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_channels_last(kind, compile_fn):
    model = block(kind).double().to(memory_format=torch.channels_last)
    x = sample(kind, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ref, got = Step(model, x), Step(model, x, compile_fn)
    assert tuned() == 1
    assert max(errors(got, ref).values()) <= TOL
    assert got.out.stride() == ref.out.stride()
    assert got.out.is_contiguous(memory_format=torch.channels_last)


# --- Dynamic shapes ---------------------------------------------------------------------------

SHAPES = [(2, 32, 32), (3, 32, 32), (5, 40, 24), (2, 48, 48)]


def _compiles(policy: str | None, dynamic: bool | None) -> tuple[int, list[float]]:
    """How many graphs Dynamo compiles for a ResNet fed SHAPES, and the worst error."""
    torch._dynamo.reset()
    model = zoo.randomize_bn(zoo.build("resnet_tiny")[0]).eval().double()
    graphs = []

    compiled = copy.deepcopy(model)
    fn = torch.compile(compiled, backend=backends.light(policy, on_graph=graphs.append),
                       dynamic=dynamic)
    errs = []
    for n, h, w in SHAPES:
        x = torch.randn(n, 3, h, w, dtype=torch.float64)
        errs.append(rel_err(fn(x), model(x)))
    return len(graphs), errs


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_dynamic_shapes(dynamic):
    plain, _ = _compiles(None, dynamic)
    with_pass, errs = _compiles("memory", dynamic)
    assert with_pass <= plain
    assert max(errs) <= TOL
    assert tuned() >= 12


@pytest.mark.inductor
def test_dynamic_shapes_inductor():
    model = zoo.randomize_bn(_net(nn.BatchNorm2d)).eval().double()

    def graphs(policy: str | None) -> int:
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        fn = torch.compile(copy.deepcopy(model), dynamic=True,
                           options=inductor_options(policy))
        for n, h, w in SHAPES:
            x = torch.randn(n, 3, h, w, dtype=torch.float64)
            assert rel_err(fn(x), model(x)) <= TOL
        return counters["stats"]["unique_graphs"] - before

    assert graphs("memory") <= graphs(None)
    assert tuned() >= 3


# --- Frozen BN and BN+activation layers ---------------------------------------------------------

class VisionFrozenBN(nn.Module):
    """Reference copy of torchvision.ops.FrozenBatchNorm2d's computation: buffers
    only, ``x * scale + shift`` with [1, C, 1, 1] tensors."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class Detectron2FrozenBN(VisionFrozenBN):
    """Reference copy of detectron2's FrozenBatchNorm2d: the affine form when the
    input needs a gradient, F.batch_norm otherwise; scale cast to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return (x * scale.reshape(1, -1, 1, 1).to(x.dtype)
                    + shift.reshape(1, -1, 1, 1).to(x.dtype))
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


class BatchNormAct2d(nn.BatchNorm2d):
    """Reference copy of timm's BatchNormAct2d: BN, then dropout and activation, in
    one module."""

    def __init__(self, n: int, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum or 0.0, self.eps)
        return self.act(self.drop(x))


@torch.no_grad()
def _random_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, VisionFrozenBN):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen))
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return zoo.randomize_bn(model, seed)


def _net(norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), norm(4))


@pytest.mark.parametrize("norm", [VisionFrozenBN, Detectron2FrozenBN, BatchNormAct2d,
                                  nn.SyncBatchNorm], ids=lambda c: c.__name__)
def test_frozen_and_fused_bn(norm):
    model = _random_frozen(_net(norm)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = Step(model, x, dtype=torch.float64)
    got = Step(model, x, light("memory"), dtype=torch.float64)
    assert tuned() == 3
    assert max(errors(got, ref).values()) <= TOL
    assert got.buffers_unchanged()
    plain = memory.saved_activation_bytes(light(None)(model), model, x)
    with_pass = memory.saved_activation_bytes(light("memory")(model), model, x)
    if issubclass(norm, VisionFrozenBN):
        # Nothing in a frozen BN trains, so Eval mode keeps no conv output either:
        # tuning saves the activation-sized multiply-add, not memory.
        assert with_pass <= plain
    else:
        assert with_pass < plain


def test_frozen_bn_without_input_grad_takes_batch_norm_path():
    """detectron2's module switches to F.batch_norm when nothing needs the input's
    gradient: both branches are tuned."""
    model = _random_frozen(_net(Detectron2FrozenBN)).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)  # requires_grad=False
    out = torch.compile(model, backend=backends.light("memory"))(x)
    assert tuned() == 3
    assert rel_err(out, model(x)) <= TOL


# --- Inductor's caches -----------------------------------------------------------------------

@pytest.mark.inductor
def test_warm_caches_stay_correct_and_keyed_by_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = zoo.randomize_bn(block("conv2d", c_in=8, c_out=16)).eval()
    x = sample("conv2d", c_in=8)
    ref = Step(model, x, dtype=torch.float64)

    def run(policy: str | None) -> tuple[int, int, int, int, float]:
        """Cache hits, rewrites and compiles served from the cache for one compile,
        its saved bytes and its error."""
        torch._dynamo.reset()
        counters.clear()
        compile_fn = inductor(policy, fx_graph_cache=True)
        saved = memory.saved_activation_bytes(compile_fn(copy.deepcopy(model)), model, x)
        hits, n_tuned = counters["inductor"]["fxgraph_cache_hit"], tuned()
        served = counters[COUNTER]["served_from_cache"]
        torch._dynamo.reset()
        worst = max(errors(Step(model, x, compile_fn), ref).values())
        return hits, n_tuned, served, saved, worst

    monkeypatch.setattr(convbn_pass.core.inductor._cache_watch, "warned", False)
    # Warned once, when a compile is served from the cache: the cold run's first
    # compile (forward, then its backward compiled lazily) is not; its second
    # compile, after torch._dynamo.reset(), already is.
    # Torch 2.10 and 2.11 run pre-grad passes before looking the cache up: there the
    # pass runs on a warm compile too, and nothing is served past it.
    keyed = compat.asks_pass_key_every_compile()
    with torch._functorch.config.patch(enable_autograd_cache=True), \
            (pytest.warns(UserWarning, match="served from Inductor's cache") if keyed
             else contextlib.nullcontext()):
        hits0, tuned0, served0, saved0, err0 = run("memory")   # cold
        hits1, tuned1, served1, saved1, err1 = run("memory")   # warm, same options
        _, tuned2, _, saved2, _ = run("keep_weight")     # other options
        _, tuned3, _, saved3, _ = run(None)              # no pass
    assert hits0 == 0 and tuned0 >= 1 and served0 == 0
    # reused, still right, and the counters say why no block is listed
    assert hits1 >= 1 and saved1 == saved0 and err1 <= 1e-5
    assert (tuned1 == 0 and served1 >= 1) if keyed else (tuned1 >= 1 and served1 == 0)
    assert tuned2 >= 1 and saved2 > saved0   # recompiled: W′ kept
    assert tuned3 == 0 and saved3 > saved0   # recompiled: no rewrite
    assert err0 <= 1e-5


# A new user's first step: compile, forward, backward, in a process of its own.
_FIRST_STEP = """
    import json, sys, warnings
    import torch
    import convbn_pass
    from convbn_pass import zoo
    from torch._dynamo.utils import counters

    model = zoo.randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3),
                                                 torch.nn.BatchNorm2d(16))).eval()
    if sys.argv[1] == "enable":
        convbn_pass.enable("memory")
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model, options=convbn_pass.options("memory"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 8, 9, 9)).sum().backward()
    print(json.dumps({"counters": {k: v for k, v in counters["convbn_pass"].items() if v},
                      "warnings": [str(w.message) for w in seen
                                   if "convbn_pass" in str(w.message)]}))
"""


@pytest.mark.inductor
@pytest.mark.parametrize("how", ["options", "enable"])
def test_cache_cold_process_warns_nothing_warm_process_warns(tmp_path, how):
    """An empty cache dir: the pass runs and nothing is said (the backward, compiled
    lazily at .backward(), keys its graph with the pass's uuid() but is no cache hit).
    A second process on the same cache dir is served from AOTAutograd's cache: the
    pass does not run, and that is counted and said once."""
    cold = run_fresh(_FIRST_STEP, how, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    assert cold == {"counters": {"tuned": 1}, "warnings": []}
    warm = run_fresh(_FIRST_STEP, how, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    assert warm["counters"] == {"served_from_cache": 1}
    assert len(warm["warnings"]) == 1 and "served from Inductor's cache" in warm["warnings"][0]


# --- Other pre-grad passes -------------------------------------------------------------------

class Recorder(CustomGraphPass):
    """A user's pass that notes, in a shared list, when it ran and how many
    batch_norm calls the graph still had."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        self.name, self.log = name, log

    def __call__(self, graph: torch.fx.Graph) -> None:
        bns = sum(n.target is F.batch_norm for n in graph.nodes)
        self.log.append((self.name, bns))

    def uuid(self) -> str:
        return f"recorder-{self.name}"


def test_user_passes_run_first_in_their_order():
    log: list[tuple[str, int]] = []
    saved = inductor_config.pre_grad_custom_pass
    try:
        inductor_config.pre_grad_custom_pass = Recorder("before", log)
        convbn_pass.enable(policy="memory")
        # A pass appended after enable(), the way Inductor takes a list:
        inductor_config.pre_grad_custom_pass = [inductor_config.pre_grad_custom_pass,
                                                Recorder("after", log)]
        convbn_pass.enable(policy="memory")  # re-enabling puts convbn_pass last again
        current = inductor_config.pre_grad_custom_pass
        assert [p.name for p in current.before] == ["before", "after"]
        torch.compile(block("conv2d"))(sample("conv2d"))
        # Both user passes saw the BatchNorm (they ran first); then it was tuned.
        assert log == [("before", 1), ("after", 1)] and tuned() == 1
        convbn_pass.disable()
        assert [p.name for p in inductor_config.pre_grad_custom_pass] == ["before", "after"]
    finally:
        inductor_config.pre_grad_custom_pass = saved
