"""Measure every mode of one (model, batch) cell side by side.

One *cell* is a model at one batch size and image size. Each mode gets a fresh
deep copy of the same model (same weights, same BatchNorm statistics) and, when
compiled, its own ``torch.compile(..., options=...)``: Dynamo reuses a compiled
graph for every instance of a model class unless the backend differs
(DESIGN.md, fact 7), and distinct ``options`` make a distinct backend. After each
compile the harness checks that the mode really compiled a graph of its own and
that the rewrite it stands for fired (``checks`` in the results).

Figures per mode:

- ``saved_bytes``: activation bytes kept for backward (convbn_pass.memory), exact;
- ``median_s``: median training-step time (forward + backward, BatchNorm in eval
  mode), modes interleaved round-robin, the order rotated every round;
- ``ratio``: per-round time relative to ``compile`` (median and quartiles);
  ``compile_twin`` is a second instance of the baseline and its ratio is the noise;
- ``first_s`` / ``compile_s``: the first call (Dynamo + AOTAutograd + Inductor,
  forward and backward) and that minus a steady step;
- ``tuned`` / ``builtin_rewrites``: rewrites counted around this mode's compile;
- ``peak_bytes`` (CUDA only): allocator peak of one step above what was allocated
  before it. On CPU, peak RSS comes from ``peak_rss`` in a fresh process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import operator
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import convbn_pass
from torch._inductor.custom_graph_pass import CustomGraphPass

from convbn_pass import backends, deploy, memory, tune, zoo
from convbn_pass.records import COUNTER

__all__ = ["Mode", "MODES", "modes_for", "Settings", "Budget", "Unavailable", "build_model",
           "measure_cell", "measure_module", "light_cell", "peak_rss_worker", "train_step",
           "weight_shaped_bytes", "warm_up_compiler", "environment"]

BUILTIN_COUNTER = "efficient_conv_bn_eval"  # counters["inductor"][...] of PyTorch's pass
BASE_OPTIONS: dict[str, Any] = {"fx_graph_cache": False}  # so that every pass runs every time


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    about: str
    compiled: bool = True
    policy: str | None = None     # convbn_pass policy, None: no convbn_pass
    builtin: bool = False         # PyTorch's efficient_conv_bn_eval pass
    deploy: bool = False          # BatchNorm folded into the conv once
    twin: bool = False            # a second instance of the baseline: measures noise
    extra: tuple[tuple[str, Any], ...] = ()  # further Inductor options
    bias_apart: bool = False      # the (folded or fused) bias added after a bias-free conv
    auto_ratio: float | None = None  # policy.AUTO_RATIO while this mode compiles

    def options(self) -> dict[str, Any]:
        """This mode's ``torch.compile`` options. Equal dicts make equal backends,
        which Dynamo lets share graphs: only the twin is meant to share."""
        opts = dict(BASE_OPTIONS, **dict(self.extra))
        if self.name == "compile_again":
            opts["trace.enabled"] = False  # the default value: same code, another backend
        if self.builtin:
            opts["efficient_conv_bn_eval_fx_passes"] = True
        if self.policy is not None:
            opts = convbn_pass.options(self.policy, **opts)
            if self.bias_apart:
                opts["pre_grad_custom_pass"] = _SplitBiasAfter(opts["pre_grad_custom_pass"])
        return opts


def _modes() -> dict[str, Mode]:
    found = [
        Mode("eager", "eager Eval mode (no compile)", compiled=False),
        Mode("compile", "torch.compile without a pass (the baseline)"),
        Mode("compile_twin", "a second copy compiled with the baseline's options: "
             "Dynamo reuses the baseline's graph; its time ratio is the noise", twin=True),
        Mode("compile_again", "the baseline compiled a second time, on its own (a no-op "
             "option makes its backend distinct): its compile-time ratio is the compile noise"),
        Mode("deploy", "Deploy mode: BN folded once (convbn_pass.deploy.fold), "
             "torch.compile without a pass: the floor", deploy=True),
        Mode("builtin", "torch.compile with PyTorch's efficient_conv_bn_eval_fx_passes",
             builtin=True),
    ]
    found += [Mode(f"pass_{policy}", f"torch.compile with convbn_pass, policy {policy!r}",
                   policy=policy) for policy in convbn_pass.POLICIES]
    # Inductor's layout optimisation turned off: it saves a channels-last copy of every
    # conv weight for backward (see NOTES.md). Asked for by name.
    no_layout = (("layout_optimization", False),)
    found += [
        Mode("compile_nolayout", "compile without a pass, layout_optimization=False",
             extra=no_layout),
        Mode("pass_memory_nolayout", "convbn_pass 'memory', layout_optimization=False",
             policy="memory", extra=no_layout),
        Mode("deploy_nolayout", "Deploy mode, layout_optimization=False", deploy=True,
             extra=no_layout),
        # Deploy mode with each folded bias added after a bias-free conv, so the conv's
        # backward computes no bias gradient (Inductor fuses the add into what follows).
        Mode("deploy_bias_apart", "Deploy mode, folded bias added after a bias-free conv",
             deploy=True, bias_apart=True),
        Mode("pass_memory_bias_apart", "convbn_pass 'memory', then b′ moved out of the conv "
             "into an add (an experiment, not what the pass does)", policy="memory",
             bias_apart=True),
    ]
    # Inductor's C++ backend fuses independent loops horizontally: every W′ (and every
    # channels-last weight copy) of the forward lands in one kernel at its start, all alive
    # at once. Limiting that fusion is the experiment.
    no_hfuse = (("cpp.max_horizontal_fusion_size", 1),)
    found += [
        Mode("compile_nohfuse", "compile without a pass, cpp.max_horizontal_fusion_size=1",
             extra=no_hfuse),
        Mode("pass_memory_nohfuse", "convbn_pass 'memory', cpp.max_horizontal_fusion_size=1",
             policy="memory", extra=no_hfuse),
    ]
    # The auto policy with other thresholds (convbn_pass.policy.AUTO_RATIO set while the
    # mode compiles): whole-model data for choosing the threshold.
    found += [Mode(f"pass_auto_x{ratio:g}", f"convbn_pass 'auto' with AUTO_RATIO = {ratio:g}",
                   policy="auto", auto_ratio=ratio)
              for ratio in (0.25, 4.0, 16.0, 64.0)]
    return {mode.name: mode for mode in found}


MODES: dict[str, Mode] = _modes()
# The order modes are compiled in: the ones the targets need first, so that a run
# whose time budget ends inside a cell still has the baseline, auto and the floor.
PRIORITY = ["eager", "compile", "compile_twin", "pass_auto", "deploy", "builtin",
            "pass_memory", "pass_keep_weight", "compile_again"]
# compile_again costs a full compile and only measures noise: asked for by name, as
# are the *_nolayout modes.
DEFAULT_MODES = [name for name in PRIORITY if name != "compile_again"]


def modes_for(names: Sequence[str] | None = None) -> list[Mode]:
    """Modes by name (all by default), in compile-priority order."""
    names = list(DEFAULT_MODES) if not names else list(names)
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if "compile" not in names:
        names.append("compile")  # every ratio is relative to it
    order = PRIORITY + [n for n in MODES if n not in PRIORITY]
    return [MODES[n] for n in order if n in names]


@dataclasses.dataclass
class Settings:
    device: str = "cpu"
    px: int = 64                 # image side for image models
    warmup: int = 2              # untimed steps per mode after the first call
    rounds: int = 6              # round-robin rounds (fewer if time_per_cell runs out, >= 3)
    steps: int = 2               # timed steps per mode per round
    time_per_cell: float = 120.0  # seconds of timed steps per cell, at most
    min_round_s: float = 0.05    # per mode per round: more steps when a step is shorter
    fresh_kernel_cache: bool = True  # each compile in its own empty Inductor cache dir
    seed: int = 0


class Budget:
    """A wall-clock deadline for the whole run; work that would pass it is skipped."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.monotonic()
        self.deadline = None if seconds is None else self.start + seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


class Unavailable(Exception):
    """A model that cannot be built here (its package does not import)."""


Log = Callable[[str], None]


# --- models -------------------------------------------------------------------------

def check_available(name: str) -> None:
    """Raise :class:`Unavailable` when a ``torchvision:``/``timm:`` model's package does not
    import (cheap: nothing is built)."""
    source = name.rpartition(":")[0]
    if source in ("torchvision", "timm"):
        try:
            __import__(source)
        except Exception as exc:  # ImportError, or a torch/torchvision build mismatch
            raise Unavailable(f"{source} does not import ({type(exc).__name__}: {exc})")


def build_model(name: str, px: int) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, sample shape without batch)`` for a zoo name, ``torchvision:NAME`` or
    ``timm:NAME`` (random weights, no download)."""
    source, _, model_name = name.rpartition(":")
    if source == "":
        if name not in zoo.MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(zoo.MODELS)}, "
                             "torchvision:NAME or timm:NAME")
        model, shape, _ = zoo.build(name)
        if len(shape) == 3:  # an image model: the harness picks the image size
            shape = (shape[0], px, px)
        return model, shape
    if source == "torchvision":
        try:
            import torchvision
        except Exception as exc:  # ImportError, or a torch/torchvision build mismatch
            raise Unavailable(f"torchvision does not import ({type(exc).__name__}: {exc})")
        return torchvision.models.get_model(model_name, weights=None), (3, px, px)
    if source == "timm":
        try:
            import timm
        except Exception as exc:
            raise Unavailable(f"timm does not import ({type(exc).__name__}: {exc})")
        return timm.create_model(model_name, pretrained=False), (3, px, px)
    raise ValueError(f"unknown model source {source!r} in {name!r}; use torchvision: or timm:")


# --- one step -----------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_loss(item) for item in out)  # type: ignore[return-value]


def train_step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> None:
    """Forward + backward of ``sum(output)``; gradients dropped afterwards."""
    _loss(fn(x)).backward()
    for p in model.parameters():
        p.grad = None


def _timed_step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor,
                device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    _loss(fn(x)).backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    return elapsed


@contextlib.contextmanager
def _auto_ratio(ratio: float | None) -> Iterator[None]:
    """``convbn_pass.policy.AUTO_RATIO`` set to ``ratio`` for one compile (the pass
    reads it when it decides, during the first call)."""
    if ratio is None:
        yield
        return
    saved = convbn_pass.policy.AUTO_RATIO
    convbn_pass.policy.AUTO_RATIO = ratio
    try:
        yield
    finally:
        convbn_pass.policy.AUTO_RATIO = saved


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the C++ compiler when
    Inductor compiles in-process, ``compile_threads=1``): unlike wall time, it does
    not grow when other jobs share the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def _kernel_cache(fresh: bool) -> Iterator[None]:
    """An empty Inductor cache directory for one compile, so that no mode reuses
    kernels another mode compiled (which would make compile times depend on order)."""
    if not fresh:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    directory = tempfile.mkdtemp(prefix="convbn_bench_cache_")
    try:
        with temporary_cache_dir(directory):
            yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _counts() -> dict[str, int]:
    return {"graphs": int(counters["stats"]["unique_graphs"])}


def _clear_rewrite_counters() -> None:
    convbn_pass.clear_decisions()
    counters["inductor"].pop(BUILTIN_COUNTER, None)


def _blocks() -> list[dict[str, Any]]:
    return [{"conv": d.conv, "bn": d.bn, "op": d.op, "action": d.action, "reason": d.reason,
             "weight_numel": d.weight_numel, "activation_numel": d.activation_numel}
            for d in convbn_pass.decisions()]


# --- one cell -----------------------------------------------------------------------

@dataclasses.dataclass
class _Instance:
    mode: Mode
    model: nn.Module
    fn: Callable[..., Any]
    result: dict[str, Any]


class _SplitBiasAfter(CustomGraphPass):
    """Runs convbn_pass, then turns every ``conv(x, W′, b′)`` it made into
    ``conv(x, W′, None) + b′`` (channel axis 1), so that the conv's backward computes
    no bias gradient and Inductor can fuse the add and its reduction with the ops
    around it. An experiment for benchmarks only."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.inner(graph)
        for node in list(graph.nodes):
            if node.op != "call_function" or len(node.args) < 3:
                continue
            bias = node.args[2]
            if not (isinstance(bias, torch.fx.Node) and bias.target is tune.fuse_bias):
                continue
            dims = node.meta["example_value"].dim() if "example_value" in node.meta else 4
            node.update_arg(2, None)
            with graph.inserting_after(node):
                shaped = graph.call_function(torch.reshape, (bias, (1, -1) + (1,) * (dims - 2)))
            with graph.inserting_after(shaped):
                added = graph.call_function(operator.add, (node, shaped))
            node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
        graph.lint()

    def uuid(self) -> Any:
        return None  # uncacheable; the benchmarks turn the FX graph cache off anyway


class _BiasApart(nn.Module):
    """``module(x) + bias`` on the channel axis (axis 1), the module without a bias."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.bias = module.bias
        self.module = copy.deepcopy(module)
        self.module.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out + self.bias.view(1, -1, *([1] * (out.dim() - 2)))


def _deploy(mode: Mode, base: nn.Module, x: torch.Tensor) -> nn.Module:
    folded = deploy.fold(base, x)
    if mode.bias_apart:
        for conv_path, _ in deploy.pairs(base, x):
            parent, _, name = conv_path.rpartition(".")
            owner = folded.get_submodule(parent) if parent else folded
            setattr(owner, name, _BiasApart(getattr(owner, name)))
    return folded


def _prepare(mode: Mode, base: nn.Module, x: torch.Tensor, settings: Settings,
             log: Log) -> _Instance:
    """Copy, fold and compile one mode, run its first step, count what fired."""
    model = _deploy(mode, base, x) if mode.deploy else copy.deepcopy(base)
    model.eval()
    fn: Callable[..., Any] = model
    if mode.compiled:
        fn = torch.compile(model, options=mode.options(), dynamic=False)
    _clear_rewrite_counters()
    graphs_before = _counts()["graphs"]
    cpu_before = cpu_seconds()
    with _kernel_cache(settings.fresh_kernel_cache and mode.compiled and not mode.twin), \
            _auto_ratio(mode.auto_ratio):
        first = _timed_step(fn, model, x, settings.device)
    result: dict[str, Any] = {
        "mode": mode.name,
        "first_s": first,
        "first_cpu_s": cpu_seconds() - cpu_before,
        "new_graphs": _counts()["graphs"] - graphs_before,
        "tuned": int(counters[COUNTER]["tuned"]),
        "tuned_keep_weight": int(counters[COUNTER]["tuned_keep_weight"]),
        "skipped": {k[len("skipped_"):]: int(v) for k, v in counters[COUNTER].items()
                    if k.startswith("skipped_") and v},
        "builtin_rewrites": int(counters["inductor"][BUILTIN_COUNTER]),
    }
    if mode.policy is not None:
        result["blocks"] = _blocks()
    log(f"    {mode.name:<17} first call {first:6.1f} s, {result['new_graphs']} new graph(s), "
        f"tuned {result['tuned']}, built-in rewrites {result['builtin_rewrites']}")
    return _Instance(mode, model, fn, result)


def weight_shaped_bytes(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> int:
    """Of what ``fn(x)`` saves for backward (parameters, buffers and ``x`` excluded, as
    convbn_pass.memory does), the bytes of tensors shaped like one of the model's
    weights: copies of weights (Inductor's channels-last layout copies) and W′ kept
    for backward. The rest is activations proper."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}
    found: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in own and tuple(tensor.shape) in shapes:
            found[ptr] = max(found.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    _loss(out).backward()
    for p in model.parameters():
        p.grad = None
    return sum(found.values())


def _measure_memory(inst: _Instance, x: torch.Tensor, settings: Settings) -> None:
    graphs_before = _counts()["graphs"]
    inst.result["saved_bytes"] = memory.saved_activation_bytes(inst.fn, inst.model, x)
    for p in inst.model.parameters():
        p.grad = None
    inst.result["weight_shaped_bytes"] = weight_shaped_bytes(inst.fn, inst.model, x)
    inst.result["recompiled_while_measuring"] = _counts()["graphs"] - graphs_before
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(inst.fn, inst.model, x)
        torch.cuda.synchronize()
        inst.result["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        inst.result["peak_abs_bytes"] = torch.cuda.max_memory_allocated()


def _checks(inst: _Instance, pairs: int | None) -> list[str]:
    """What is wrong with this mode's compile, as sentences (empty: all as meant)."""
    mode, r = inst.mode, inst.result
    problems = []
    if mode.compiled and not mode.twin and r["new_graphs"] == 0:
        problems.append("compiled no graph of its own (reused another mode's graph)")
    if mode.policy is None and r["tuned"]:
        problems.append(f"convbn_pass ran ({r['tuned']} tuned) in a mode without it")
    if not mode.builtin and r["builtin_rewrites"]:
        problems.append(f"PyTorch's built-in pass ran ({r['builtin_rewrites']} rewrites)")
    if pairs:
        if mode.builtin and not r["builtin_rewrites"]:
            problems.append("PyTorch's built-in pass did not fire")
        if mode.policy in ("memory", "keep_weight") and r["tuned"] != pairs:
            problems.append(f"tuned {r['tuned']} of {pairs} pairs")
    if r.get("recompiled_while_measuring"):
        problems.append("recompiled while measuring saved bytes")
    return problems


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _time_round_robin(instances: list[_Instance], x: torch.Tensor, settings: Settings,
                      log: Log) -> None:
    """Warm up, then time ``settings.steps`` steps of every mode per round, rotating
    which mode goes first each round; stops early (after 3 rounds) past
    ``settings.time_per_cell``."""
    warm = []
    for inst in instances:
        for _ in range(settings.warmup - 1):
            train_step(inst.fn, inst.model, x)
        warm.append(_timed_step(inst.fn, inst.model, x, settings.device))
    # Short steps are timed in longer runs, so that timer and scheduler noise stay small.
    n_steps = max(settings.steps, math.ceil(settings.min_round_s / max(min(warm), 1e-6)))
    per_round: dict[str, list[float]] = {inst.mode.name: [] for inst in instances}
    steps: dict[str, list[float]] = {inst.mode.name: [] for inst in instances}
    start = time.monotonic()
    for r in range(settings.rounds):
        shift = r % len(instances)
        for inst in instances[shift:] + instances[:shift]:
            times = [_timed_step(inst.fn, inst.model, x, settings.device)
                     for _ in range(n_steps)]
            steps[inst.mode.name] += times
            per_round[inst.mode.name].append(statistics.fmean(times))
        if r + 1 >= 3 and time.monotonic() - start > settings.time_per_cell:
            break
    rounds = len(per_round["compile"])
    log(f"    timed {rounds} round(s) x {n_steps} step(s) per mode "
        f"in {time.monotonic() - start:.0f} s")
    base = per_round["compile"]
    for inst in instances:
        name = inst.mode.name
        q1, med, q3 = _quartiles(steps[name])
        ratios = [t / b for t, b in zip(per_round[name], base)]
        r1, rmed, r3 = _quartiles(ratios)
        inst.result.update({
            # every step when there are few; else the per-round means (results stay small)
            "steps_s": steps[name] if len(steps[name]) <= 200 else None,
            "round_means_s": per_round[name], "rounds": rounds, "steps_per_round": n_steps,
            "median_s": med, "q1_s": q1, "q3_s": q3,
            "ratio": rmed, "ratio_q1": r1, "ratio_q3": r3,
            "compile_s": inst.result["first_s"] - med,
        })


def measure_cell(model_name: str, batch: int, settings: Settings, mode_list: list[Mode],
                 budget: Budget, log: Log, compile_estimate: float = 0.0) -> dict[str, Any]:
    """All modes of one cell. Modes whose compile would pass the budget are skipped
    (listed under ``skipped_modes``); what was compiled is still timed."""
    torch._dynamo.reset()
    torch.manual_seed(settings.seed)
    base, shape = build_model(model_name, settings.px)
    base = zoo.randomize_bn(base, settings.seed).eval().to(settings.device)
    x = torch.randn(batch, *shape, device=settings.device)
    cell = measure_module(base, x, settings, mode_list, budget, log, compile_estimate)
    return {"model": model_name, "batch": batch, **cell}


def measure_module(base: nn.Module, x: torch.Tensor, settings: Settings,
                   mode_list: list[Mode], budget: Budget, log: Log,
                   compile_estimate: float = 0.0) -> dict[str, Any]:
    """All modes of ``base`` (in eval mode) on the batch ``x``."""
    cell: dict[str, Any] = {
        "input_shape": list(x.shape), "device": settings.device, "modes": {},
        "skipped_modes": [], "params": sum(p.numel() for p in base.parameters()),
    }
    instances: list[_Instance] = []
    estimate = compile_estimate
    for mode in mode_list:
        if mode.compiled and not mode.twin and not budget.allows(estimate + 10):
            log(f"    {mode.name:<17} skipped: {budget.left():.0f} s left, "
                f"a compile takes about {estimate:.0f} s")
            cell["skipped_modes"].append(mode.name)
            continue
        try:
            inst = _prepare(mode, base, x, settings, log)
            _measure_memory(inst, x, settings)
        except Exception as exc:  # one failing mode must not lose the cell (unattended runs)
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"    {mode.name:<17} FAILED: {message}")
            cell.setdefault("mode_errors", {})[mode.name] = message
            _free(settings.device)
            continue
        if mode.compiled and not mode.twin:
            estimate = max(estimate, inst.result["first_s"])
        instances.append(inst)
    cell["max_first_s"] = estimate
    if not any(i.mode.name == "compile" for i in instances):
        cell["error"] = "the baseline was not compiled (time budget)"
        return cell
    memory_mode = next((i for i in instances if i.mode.policy == "memory"), None)
    pairs = memory_mode.result["tuned"] if memory_mode is not None else None
    cell["pairs"] = pairs
    for inst in instances:
        inst.result["checks"] = _checks(inst, pairs)
        for problem in inst.result["checks"]:
            log(f"    CHECK {inst.mode.name}: {problem}")
    _time_round_robin(instances, x, settings, log)
    cell["modes"] = {inst.mode.name: inst.result for inst in instances}
    _cell_checks(cell, log)
    del instances, base
    torch._dynamo.reset()
    gc.collect()
    return cell


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _cell_checks(cell: dict[str, Any], log: Log) -> None:
    """Modes that should differ from the baseline in saved bytes but do not."""
    modes = cell["modes"]
    base = modes["compile"]["saved_bytes"]
    notes = []
    for name in ("pass_memory", "pass_keep_weight", "builtin"):
        r = modes.get(name)
        rewrites = r and (r["tuned"] or r["builtin_rewrites"])
        if rewrites and r["saved_bytes"] == base:
            notes.append(f"{name} rewrote {rewrites} pair(s) but saves exactly the "
                         "baseline's bytes")
    cell["notes"] = notes
    for note in notes:
        log(f"    NOTE {note}")


def warm_up_compiler(device: str, fresh_kernel_cache: bool, log: Log) -> None:
    """Compile a small conv-BN net once in every compiled mode before measuring, so
    that one-time costs of the process (imports, Inductor's start-up, the compile
    worker pool, the pattern matcher's set-up) are not billed to whichever mode
    compiles first."""
    start = time.monotonic()
    torch.manual_seed(0)
    net = zoo.randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4))).eval().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    # With a shared kernel cache compile times are order-dependent anyway (the GPU
    # preset): one warm-up compile is enough there and saves budget.
    names = ["compile", "builtin", "pass_memory", "deploy"] if fresh_kernel_cache else ["compile"]
    for mode in modes_for(names):
        model = deploy.fold(net, x) if mode.deploy else copy.deepcopy(net)
        with _kernel_cache(fresh_kernel_cache):
            train_step(torch.compile(model, options=mode.options(), dynamic=False), model, x)
    torch._dynamo.reset()
    convbn_pass.clear_decisions()
    log(f"compiler warmed up in {time.monotonic() - start:.0f} s (not measured)")


# --- the light sweep: saved bytes only, no Inductor ------------------------------------

def _builtin_light() -> Callable[..., Any]:
    """PyTorch's built-in pass (its pattern pass, called directly) + the light backend."""
    import torch._inductor.fx_passes.efficient_conv_bn_eval  # noqa: F401  registers patterns
    from torch._inductor import config as inductor_config
    from torch._inductor.fx_passes.pre_grad import efficient_conv_bn_eval_pass

    inner = backends.light(None)

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        with inductor_config.patch(efficient_conv_bn_eval_fx_passes=True):
            efficient_conv_bn_eval_pass.apply(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return inner(gm, example_inputs)

    return backend


def light_cell(model_name: str, batch: int, px: int, mode_list: list[Mode],
               device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Saved activation bytes of every mode through the light backend (pass +
    AOTAutograd's partitioner, no code generation): fast, for sweeps over batch."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    base, shape = build_model(model_name, px)
    base = zoo.randomize_bn(base, seed).eval().to(device)
    x = torch.randn(batch, *shape, device=device)
    cell: dict[str, Any] = {"model": model_name, "batch": batch, "input_shape": list(x.shape),
                            "device": device, "backend": "light", "modes": {}}
    for mode in mode_list:
        if mode.twin:
            continue
        model = deploy.fold(base, x) if mode.deploy else copy.deepcopy(base)
        fn: Callable[..., Any] = model
        if mode.compiled:
            backend = _builtin_light() if mode.builtin else backends.light(mode.policy)
            fn = torch.compile(model, backend=backend, dynamic=False)
        _clear_rewrite_counters()
        train_step(fn, model, x)
        result = {"mode": mode.name, "tuned": int(counters[COUNTER]["tuned"]),
                  "builtin_rewrites": int(counters["inductor"][BUILTIN_COUNTER])}
        if mode.policy is not None:
            result["blocks"] = _blocks()
        result["saved_bytes"] = memory.saved_activation_bytes(fn, model, x)
        result["weight_shaped_bytes"] = weight_shaped_bytes(fn, model, x)
        cell["modes"][mode.name] = result
    torch._dynamo.reset()
    gc.collect()
    return cell


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "convbn_pass": convbn_pass.__version__,
        "auto_ratio": convbn_pass.policy.AUTO_RATIO,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    env["git"] = _git_state()
    for package in ("torchvision", "timm"):
        try:
            env[package] = __import__(package).__version__
        except Exception as exc:
            env[package] = f"not importable ({type(exc).__name__})"
    return env


# --- peak RSS of a fresh process (CPU) -------------------------------------------------

def _status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # Linux >= 4.0: VmHWM := VmRSS


def peak_rss_worker(model_name: str, batch: int, mode_name: str,
                    settings: Settings) -> dict[str, Any]:
    """Run in a fresh process (see run.py ``--worker``): compile one mode, then read
    the process's peak RSS and the peak of one warm step above the RSS before it.

    The parent starts this process with an empty Inductor cache dir, so ``first_s``
    is a cold compile, and with glibc's mmap threshold at 64 KiB, so that freed
    tensors leave the resident set and a step's peak is its own."""
    torch.manual_seed(settings.seed)
    base, shape = build_model(model_name, settings.px)
    base = zoo.randomize_bn(base, settings.seed).eval()
    x = torch.randn(batch, *shape)
    mode = MODES[mode_name]
    model = deploy.fold(base, x) if mode.deploy else copy.deepcopy(base)
    del base
    fn: Callable[..., Any] = model
    if mode.compiled:
        fn = torch.compile(model, options=mode.options(), dynamic=False)
    cpu_before = cpu_seconds()
    first = _timed_step(fn, model, x, "cpu")
    first_cpu = cpu_seconds() - cpu_before
    for _ in range(max(settings.warmup, 1)):
        train_step(fn, model, x)
    gc.collect()
    process_peak = _status_bytes("VmHWM")
    before = _status_bytes("VmRSS")
    _reset_peak_rss()
    train_step(fn, model, x)
    step_peak = _status_bytes("VmHWM")
    return {"first_s": first, "first_cpu_s": first_cpu,
            "process_peak_bytes": max(process_peak, step_peak),
            "before_step_bytes": before, "step_peak_bytes": step_peak - before}


def _git_state() -> str:
    """The commit measured, and whether convbn_pass/ had uncommitted changes."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(convbn_pass.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "convbn_pass"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in convbn_pass/" if dirty else "")
