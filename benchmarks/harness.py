"""Measure every mode of one (model, batch) cell side by side.

One *cell* is a model at one batch size and image size (:func:`setup`). Each
mode builds its own model from the same base (:meth:`Mode.build`: a deep copy,
or BatchNorm folded once for Deploy mode, same weights and statistics) and,
when compiled, its own ``torch.compile(..., options=...)``. Dynamo reuses a
compiled graph for a second instance of the same model class when the backend
is the same, whatever the global config says: two copies compiled with the pass
enabled through the global config after a plain compile gave 0 rewrites and
identical saved bytes. ``torch.compile(model, options={...})`` makes a distinct
backend, which rewrote all 20 pairs of a ResNet-18 in the same process. After
each compile the harness checks that the mode compiled a graph of its own and
that the rewrite it stands for fired (``checks`` in the results); the pass's
decisions come from the ``on_graph`` callback in that mode's own options.

The modes are one table, :data:`MODES`, in the order they are compiled in (the
ones the targets need first); every policy of ``convbn_pass.POLICIES`` is a
``pass_<policy>`` mode of it. Results are the typed records of ``records.py``;
what each figure means is in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import convbn_pass
from convbn_pass import backends, deploy, memory, models, zoo
from convbn_pass.core.records import COUNTER, tally
from convbn_pass.step import backward, train_step

from .records import CellResult, LightCell, ModeResult, SavedDecision, RssResult

__all__ = ["Mode", "MODES", "DEFAULT_MODES", "modes_for", "Settings", "Budget", "load_model",
           "setup", "timed_step", "median_step", "measure_cell", "measure_module", "light_cell",
           "peak_rss_worker", "weight_shaped_bytes", "warm_up_compiler", "environment",
           "cpu_seconds", "spawn", "worker_main"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILTIN_COUNTER = "efficient_conv_bn_eval"  # counters["inductor"][...] of PyTorch's pass
BASE_OPTIONS: dict[str, Any] = {"fx_graph_cache": False}  # so that every pass runs every time
DEFAULT_POLICY = next(iter(convbn_pass.POLICIES))  # what convbn_pass.options() applies
OnGraph = Callable[[convbn_pass.GraphRewrite], None]
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    about: str
    compiled: bool = True
    policy: str | None = None     # convbn_pass policy, None: no convbn_pass
    builtin: bool = False         # PyTorch's efficient_conv_bn_eval pass
    deploy: bool = False          # BatchNorm folded into the conv once
    twin: bool = False            # the baseline's options: Dynamo reuses its graph
    noise: bool = False           # measures noise only: left out of byte tables and plots
    default: bool = True          # run unless modes are named
    extra: tuple[tuple[str, Any], ...] = ()  # further Inductor options
    style: tuple[tuple[str, Any], ...] = ()  # matplotlib keywords for its line

    def options(self, on_graph: OnGraph | None = None, **more: Any) -> dict[str, Any]:
        """This mode's ``torch.compile`` options; ``on_graph`` receives the pass's
        graphs and decisions. Equal dicts make equal backends, which Dynamo lets
        share graphs: only the twin is meant to share."""
        opts = {**BASE_OPTIONS, **dict(self.extra), **more}
        if self.builtin:
            opts["efficient_conv_bn_eval_fx_passes"] = True
        if self.policy is not None:
            opts = convbn_pass.options(self.policy, on_graph=on_graph, **opts)
        return opts

    def build(self, base: nn.Module, x: torch.Tensor, on_graph: OnGraph | None = None,
              light: bool = False, **more: Any) -> tuple[nn.Module, Callable[..., Any]]:
        """``(model, fn)``: this mode's own model (a copy of ``base``, or BN folded into
        it) and what a step calls: the model, or its ``torch.compile`` with this mode's
        options (``light``: through ``convbn_pass.backends.light`` instead of Inductor;
        ``more``: further Inductor options)."""
        model = (deploy.fold(base, x) if self.deploy else copy.deepcopy(base)).eval()
        if not self.compiled:
            return model, model
        if light:
            backend = _builtin_light() if self.builtin else backends.light(self.policy,
                                                                          on_graph=on_graph)
            return model, torch.compile(model, backend=backend, dynamic=False)
        return model, torch.compile(model, options=self.options(on_graph, **more),
                                    dynamic=False)


_PASS_STYLES = [dict(color="tab:green", marker="D", ls="-"),
                dict(color="tab:red", marker="o", ls="-", ms=8),
                dict(color="tab:purple", marker="v", ls="--", ms=6)]


def _pass_mode(index: int, policy: str) -> Mode:
    style = _PASS_STYLES[index] if index < len(_PASS_STYLES) else {}
    return Mode(f"pass_{policy}", f"torch.compile with convbn_pass, policy {policy!r}",
                policy=policy, style=tuple(style.items()))


def _modes() -> dict[str, Mode]:
    """Every mode, in compile-priority order: a run whose time budget ends inside a
    cell still has the baseline, the default policy and the floor."""
    first, *others = [_pass_mode(i, p) for i, p in enumerate(convbn_pass.POLICIES)]
    found = [
        Mode("eager", "eager Eval mode (no compile)", compiled=False,
             style=(("color", "tab:gray"), ("marker", "s"), ("ls", ":"))),
        Mode("compile", "torch.compile without a pass (the baseline)",
             style=(("color", "black"), ("marker", "o"), ("ls", "-"))),
        Mode("compile_twin", "a second copy compiled with the baseline's options: "
             "Dynamo reuses the baseline's graph; its time ratio is the noise",
             twin=True, noise=True),
        first,
        Mode("deploy", "Deploy mode: BN folded once (convbn_pass.deploy.fold), "
             "torch.compile without a pass: the floor", deploy=True,
             style=(("color", "tab:blue"), ("marker", "x"), ("ls", "--"), ("ms", 8))),
        Mode("builtin", "torch.compile with PyTorch's efficient_conv_bn_eval_fx_passes",
             builtin=True,
             style=(("color", "tab:orange"), ("marker", "^"), ("ls", "-"), ("ms", 8))),
        *others,
        # A full compile that only measures noise: run when named.
        Mode("compile_again", "the baseline compiled a second time, on its own (a no-op "
             "option makes its backend distinct): its compile-time ratio is the compile noise",
             noise=True, default=False, extra=(("trace.enabled", False),)),
    ]
    return {mode.name: mode for mode in found}


MODES: dict[str, Mode] = _modes()
DEFAULT_MODES = [name for name, mode in MODES.items() if mode.default]


def modes_for(names: Sequence[str] | None = None) -> list[Mode]:
    """Modes by name (the default ones when none), in compile-priority order, the
    baseline always among them (every ratio is relative to it)."""
    names = list(names or DEFAULT_MODES)
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return [mode for name, mode in MODES.items() if name in names or name == "compile"]


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


# --- models and cells ---------------------------------------------------------------

def load_model(spec: str, px: int) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, sample shape without batch)`` for what ``convbn_pass.models.load``
    takes (random weights, no download); an image model's images are ``px`` square."""
    model = models.load(spec)
    shape = model.input_shape
    if model.is_image:  # the harness picks the image size
        shape = (shape[0], px, px)
    return model.module, shape


Build = Callable[[str, int], tuple[nn.Module, tuple[int, ...]]]


def setup(model_name: str, batch: int, px: int, device: str = "cpu", seed: int = 0,
          build: Build = load_model) -> tuple[nn.Module, torch.Tensor]:
    """One cell's base model (BN statistics and affine randomized, eval mode, on
    ``device``) and its input batch, the same for a given seed."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    base, shape = build(model_name, px)
    base = zoo.randomize_bn(base, seed).eval().to(device)
    return base, torch.randn(batch, *shape, device=device)


# --- one step -----------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor,
               device: str) -> float:
    """Wall seconds of one training step: forward, backward, gradients dropped."""
    _sync(device)
    start = time.perf_counter()
    train_step(fn, model, x)
    _sync(device)
    return time.perf_counter() - start


def median_step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor, device: str,
                steps: int) -> float:
    """The median of ``steps`` :func:`timed_step` s."""
    return statistics.median(timed_step(fn, model, x, device) for _ in range(steps))


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
    with (tempfile.TemporaryDirectory(prefix="convbn_bench_cache_",
                                      ignore_cleanup_errors=True) as directory,
          temporary_cache_dir(directory)):
        yield


class _Counts(NamedTuple):
    """Process-wide counts, read before and after a compile."""

    graphs: int   # Dynamo's unique graphs
    tuned: int    # pairs convbn_pass tuned, wherever it ran
    builtin: int  # rewrites of PyTorch's built-in pass


def _counts() -> _Counts:
    return _Counts(int(counters["stats"]["unique_graphs"]), int(counters[COUNTER]["tuned"]),
                   int(counters["inductor"][BUILTIN_COUNTER]))


def _decided(mode: Mode, rewrites: list[convbn_pass.GraphRewrite]) -> dict[str, Any]:
    """``ModeResult`` fields from the graphs a mode's ``on_graph`` received: the pass's
    tally (``convbn_pass.core.records.tally``) and every decision."""
    if mode.policy is None:
        return {}
    decisions = [d for rewrite in rewrites for d in rewrite.decisions]
    counted = tally(decisions)
    return {"candidates": counted.candidates, "tuned": counted.tuned,
            "tuned_keep_weight": counted.tuned_keep_weight,
            "skipped": counted.skipped_by_reason,
            "blocks": [SavedDecision(d.conv, d.bn, d.op, str(d.action), str(d.reason),
                                    d.weight_numel, d.activation_numel) for d in decisions]}


# --- one cell -----------------------------------------------------------------------

@dataclasses.dataclass
class _Instance:
    mode: Mode
    model: nn.Module
    fn: Callable[..., Any]
    result: ModeResult
    tuned_anywhere: int = 0  # counters["convbn_pass"]["tuned"] rise in this mode's compile


def _prepare(mode: Mode, base: nn.Module, x: torch.Tensor, settings: Settings,
             log: Log) -> _Instance:
    """Build one mode, run its first step, count what fired."""
    rewrites: list[convbn_pass.GraphRewrite] = []
    model, fn = mode.build(base, x, rewrites.append)
    before = _counts()
    cpu_before = cpu_seconds()
    with _kernel_cache(settings.fresh_kernel_cache and mode.compiled and not mode.twin):
        first = timed_step(fn, model, x, settings.device)
    after = _counts()
    result = ModeResult(mode.name, first_s=first, first_cpu_s=cpu_seconds() - cpu_before,
                        new_graphs=after.graphs - before.graphs,
                        builtin_rewrites=after.builtin - before.builtin,
                        **_decided(mode, rewrites))
    log(f"    {mode.name:<17} first call {first:6.1f} s, {result.new_graphs} new graph(s), "
        f"tuned {result.tuned}, built-in rewrites {result.builtin_rewrites}")
    return _Instance(mode, model, fn, result, after.tuned - before.tuned)


def weight_shaped_bytes(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> int:
    """Of what ``fn(x)`` saves for backward (parameters, buffers and ``x`` excluded, as
    convbn_pass.memory does), the bytes of tensors shaped like one of the model's
    weights: copies of weights (Inductor's channels-last layout copies) and W′ kept
    for backward. The rest is activations proper."""
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}

    class WeightShaped(memory.SavedTensors):
        def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
            return super()._pack(tensor) if tuple(tensor.shape) in shapes else tensor

    with WeightShaped(exclude=[*model.parameters(), *model.buffers(), x]) as saved:
        out = fn(x)
    backward(out)
    model.zero_grad(set_to_none=True)
    return saved.bytes


def _measure_memory(inst: _Instance, x: torch.Tensor, settings: Settings) -> None:
    r = inst.result
    graphs_before = _counts().graphs
    r.saved_bytes = memory.saved_activation_bytes(inst.fn, inst.model, x)
    inst.model.zero_grad(set_to_none=True)
    r.weight_shaped_bytes = weight_shaped_bytes(inst.fn, inst.model, x)
    r.recompiled_while_measuring = _counts().graphs - graphs_before
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(inst.fn, inst.model, x)
        torch.cuda.synchronize()
        r.peak_bytes = torch.cuda.max_memory_allocated() - before


def _checks(inst: _Instance, pairs: int | None) -> list[str]:
    """What is wrong with this mode's compile, as sentences (empty: all as meant)."""
    mode, r = inst.mode, inst.result
    problems = []
    if mode.compiled and not mode.twin and r.new_graphs == 0:
        problems.append("compiled no graph of its own (reused another mode's graph)")
    if mode.policy is None and inst.tuned_anywhere:
        problems.append(f"convbn_pass ran ({inst.tuned_anywhere} tuned) in a mode without it")
    if not mode.builtin and r.builtin_rewrites:
        problems.append(f"PyTorch's built-in pass ran ({r.builtin_rewrites} rewrites)")
    if pairs:
        if mode.builtin and not r.builtin_rewrites:
            problems.append("PyTorch's built-in pass did not fire")
        # Every policy but the default one tunes every pair it may.
        if mode.policy not in (None, DEFAULT_POLICY) and r.tuned != pairs:
            problems.append(f"tuned {r.tuned} of {pairs} pairs")
    if r.recompiled_while_measuring:
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
        warm.append(timed_step(inst.fn, inst.model, x, settings.device))
    # Short steps are timed in longer runs, so that timer and scheduler noise stay small.
    n_steps = max(settings.steps, math.ceil(settings.min_round_s / max(min(warm), 1e-6)))
    per_round: dict[str, list[float]] = {inst.mode.name: [] for inst in instances}
    steps: dict[str, list[float]] = {inst.mode.name: [] for inst in instances}
    start = time.monotonic()
    for r in range(settings.rounds):
        shift = r % len(instances)
        for inst in instances[shift:] + instances[:shift]:
            times = [timed_step(inst.fn, inst.model, x, settings.device)
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
        r = inst.result
        r.rounds, r.steps_per_round = rounds, n_steps
        r.q1_s, r.median_s, r.q3_s = _quartiles(steps[inst.mode.name])
        r.ratio_q1, r.ratio, r.ratio_q3 = _quartiles(
            [t / b for t, b in zip(per_round[inst.mode.name], base)])
        r.compile_s = None if r.first_s is None else r.first_s - r.median_s


def measure_cell(model_name: str, batch: int, settings: Settings, mode_list: list[Mode],
                 budget: Budget, log: Log, compile_estimate: float = 0.0) -> CellResult:
    """All modes of one cell. Modes whose compile would pass the budget are skipped
    (listed under ``skipped_modes``); what was compiled is still timed."""
    base, x = setup(model_name, batch, settings.px, settings.device, settings.seed)
    return measure_module(CellResult(model_name, batch), base, x, settings, mode_list, budget,
                          log, compile_estimate)


def measure_module(cell: CellResult, base: nn.Module, x: torch.Tensor, settings: Settings,
                   mode_list: list[Mode], budget: Budget, log: Log,
                   compile_estimate: float = 0.0) -> CellResult:
    """All modes of ``base`` (in eval mode) on the batch ``x``, filled into ``cell``."""
    cell.input_shape, cell.device = list(x.shape), settings.device
    cell.params = sum(p.numel() for p in base.parameters())
    instances: list[_Instance] = []
    estimate = compile_estimate
    for mode in mode_list:
        if mode.compiled and not mode.twin and not budget.allows(estimate + 10):
            log(f"    {mode.name:<17} skipped: {budget.left():.0f} s left, "
                f"a compile takes about {estimate:.0f} s")
            cell.skipped_modes.append(mode.name)
            continue
        try:
            inst = _prepare(mode, base, x, settings, log)
            _measure_memory(inst, x, settings)
        except Exception as exc:  # one failing mode must not lose the cell (unattended runs)
            message = models.one_line(exc)
            log(f"    {mode.name:<17} FAILED: {message}")
            cell.mode_errors[mode.name] = message
            gc.collect()
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        if mode.compiled and not mode.twin:
            estimate = max(estimate, inst.result.first_s or 0.0)
        instances.append(inst)
    cell.max_first_s = estimate
    if not any(i.mode.name == "compile" for i in instances):
        cell.error = "the baseline was not compiled (time budget)"
        return cell
    cell.pairs = max((i.result.candidates or 0 for i in instances), default=0) or None
    for inst in instances:
        inst.result.checks = _checks(inst, cell.pairs)
        for problem in inst.result.checks:
            log(f"    CHECK {inst.mode.name}: {problem}")
    _time_round_robin(instances, x, settings, log)
    cell.modes = {inst.mode.name: inst.result for inst in instances}
    _cell_checks(cell, log)
    del instances, base
    torch._dynamo.reset()
    gc.collect()
    return cell


def _cell_checks(cell: CellResult, log: Log) -> None:
    """Modes that rewrote pairs but save exactly the baseline's bytes."""
    base = cell.modes["compile"].saved_bytes
    cell.notes = [f"{name} rewrote {rewrites} pair(s) but saves exactly the baseline's bytes"
                  for name, r in cell.modes.items()
                  if (rewrites := (r.tuned or r.builtin_rewrites)) and r.saved_bytes == base]
    for note in cell.notes:
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
    kinds: dict[tuple[bool, bool, bool], Mode] = {}  # one mode per kind of compile
    for m in modes_for():
        if m.compiled and not m.noise:
            kinds.setdefault((m.policy is None, m.builtin, m.deploy), m)
    for mode in list(kinds.values()) if fresh_kernel_cache else [MODES["compile"]]:
        model, fn = mode.build(net, x)
        with _kernel_cache(fresh_kernel_cache):
            train_step(fn, model, x)
    torch._dynamo.reset()
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
               device: str = "cpu", seed: int = 0) -> LightCell:
    """Saved activation bytes of every mode through the light backend (pass +
    AOTAutograd's partitioner, no code generation): fast, for sweeps over batch."""
    base, x = setup(model_name, batch, px, device, seed)
    cell = LightCell(model_name, batch, list(x.shape), device)
    for mode in mode_list:
        if mode.noise:
            continue
        rewrites: list[convbn_pass.GraphRewrite] = []
        model, fn = mode.build(base, x, rewrites.append, light=True)
        before = _counts()
        train_step(fn, model, x)
        result = ModeResult(mode.name, builtin_rewrites=_counts().builtin - before.builtin,
                            **_decided(mode, rewrites))
        result.saved_bytes = memory.saved_activation_bytes(fn, model, x)
        result.weight_shaped_bytes = weight_shaped_bytes(fn, model, x)
        cell.modes[mode.name] = result
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
        "auto_ratio": convbn_pass.AUTO_RATIO,  # the auto policy's default threshold
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


def _git_state() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    root = os.path.dirname(os.path.abspath(convbn_pass.__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in convbn_pass/" if dirty else "")


# --- fresh processes --------------------------------------------------------------------

class Spawned(NamedTuple):
    result: dict[str, Any]  # the worker's JSON, or {"error": its last stderr line}
    stderr: str


def spawn(module: str, spec: dict[str, Any], env: dict[str, str] | None = None,
          timeout: float | None = None) -> Spawned:
    """Run ``python -m MODULE --worker SPEC`` in a fresh process with an empty Inductor
    cache directory (plus ``env``), and read the JSON it prints last."""
    with tempfile.TemporaryDirectory(prefix="convbn_bench_fresh_") as cache:
        full_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT),
                        **(env or {}))
        try:
            done = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                                  cwd=ROOT, env=full_env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return Spawned({"error": "timed out (time budget)"}, "")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return Spawned({"error": (done.stderr.strip().splitlines() or ["no output"])[-1]},
                       done.stderr)
    return Spawned(json.loads(lines[-1]), done.stderr)


def worker_main(work: Callable[[dict[str, Any]], dict[str, Any]], spec_text: str) -> int:
    """The worker's side of :func:`spawn`: one JSON line on stdout."""
    print(json.dumps(work(json.loads(spec_text)), default=str))
    return 0



# --- peak RSS of a fresh process (CPU) -------------------------------------------------

# glibc's mmap threshold at 64 KiB, so that freed tensors leave the resident set.
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


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
                    settings: Settings) -> RssResult:
    """Run in a fresh process (:func:`spawn` with :data:`RSS_ENV`): compile one mode,
    then read the process's peak RSS and the peak of one warm step above the RSS
    before it. ``first_s`` is a cold compile (empty Inductor cache)."""
    base, x = setup(model_name, batch, settings.px, "cpu", settings.seed)
    model, fn = MODES[mode_name].build(base, x)
    del base
    cpu_before = cpu_seconds()
    first = timed_step(fn, model, x, "cpu")
    first_cpu = cpu_seconds() - cpu_before
    for _ in range(max(settings.warmup, 1)):
        train_step(fn, model, x)
    gc.collect()
    process_peak = _status_bytes("VmHWM")
    before = _status_bytes("VmRSS")
    _reset_peak_rss()
    train_step(fn, model, x)
    step_peak = _status_bytes("VmHWM")
    return RssResult(first_s=first, first_cpu_s=first_cpu,
                     process_peak_bytes=max(process_peak, step_peak),
                     before_step_bytes=before, step_peak_bytes=step_peak - before)


def _reading_rank(mode: Mode) -> int:
    """Eager, the baseline (and its noise copies), the built-in pass, the policies,
    Deploy: the order a reader compares them in, apart from the compile order."""
    if not mode.compiled:
        return 0
    if mode.builtin:
        return 2
    if mode.policy is not None:
        return 3
    return 4 if mode.deploy else 1


def modes_named(names: Iterable[str]) -> list[str]:
    """``names`` in reading order (eager, baseline, built-in, policies in
    ``convbn_pass.POLICIES`` order, Deploy), names the table does not know (older
    results' modes) after them: the column order of every report."""
    names = list(dict.fromkeys(names))
    known = sorted((m for m in MODES.values() if m.name in names), key=_reading_rank)
    return [m.name for m in known] + sorted(n for n in names if n not in MODES)
