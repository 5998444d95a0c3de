"""``python -m convbn_pass.inspect``: what the pass does to one model, before a long run.

::

    python -m convbn_pass.inspect                        # the built-in ResNet-18
    python -m convbn_pass.inspect --list                 # the built-in models
    python -m convbn_pass.inspect resnet50 --policy memory --graphs after
    python -m convbn_pass.inspect mypkg.models:build --shape 3,224,224 --batch 16
    python -m convbn_pass.inspect torchvision:resnet50 --backend inductor --out report/

The model is compiled twice: once without the pass (the baseline) and once
with it, each compile with its own options, with Inductor's FX graph cache and
AOTAutograd's cache off and ``torch._dynamo.reset()`` before it. Each runs one
forward/backward step, and the activation bytes it keeps for backward are
measured with :func:`convbn_pass.memory.saved_activation_bytes`. The table lists
the decision records the pass itself wrote during the second compile
(:func:`convbn_pass.decisions`, counted in
``torch._dynamo.utils.counters["convbn_pass"]``), so what is printed is what the
compiler did. The run fails if the two figures did not come from two such
compiles (the baseline ran the pass, or the second compile did not).

``--backend light`` (the default) is :func:`convbn_pass.backends.light`: the
same pass on the same Dynamo graph, then AOTAutograd with Inductor's min-cut
partitioner, without code generation. ``--backend inductor`` is
``torch.compile``'s default backend with the pass in its options, slower to
compile (the README gives measured times). Inductor decomposes operators before
partitioning and light does not, so the two can keep different tensors and
their byte figures differ; the report names the backend that produced them.

Progress goes to stderr; stdout carries only the report. Exit status: 0 on
success (a model without candidate pairs included), 2 for bad input (one line
on stderr; ``--debug`` adds the traceback), 1 when compiling or measuring fails.

JSON report (``--format json``), ``schema_version`` 1. Later versions only add
fields; changing or removing one raises the version::

    {
      "schema_version": 1,
      "model":   {"spec": str,            # as given: "resnet18", "timm:NAME", "pkg.mod:fn"
                  "source": str,          # "zoo", "torchvision", "timm" or "import"
                  "about": str},
      "input":   {"shape": [int, ...],    # batch first
                  "dtype": str, "device": str,
                  "dynamic": bool,        # compiled with dynamic shapes
                  "bn_mode": str},        # "eval" or "train"
      "policy":  {"name": str, "about": str},
      "backend": str,                     # "light" or "inductor"
      "compiles": {"without_pass_graphs": int,   # graphs Dynamo kept, baseline compile
                   "with_pass_graphs": int,      # graphs Dynamo kept, compile with the pass
                   "discarded_graphs": int,      # graphs of a with-pass compile that Dynamo
                                                 # restarted: in "counters", not in "pairs"
                   "caches": "off"},             # FX graph and AOTAutograd caches
      "pairs": [                          # one per candidate pair, graph order
        {"graph": int,                    # 1, 2, ... within this run
         "conv": str, "bn": str,          # module paths: "layer1.0.conv1", "layer1.0.bn1"
         "op": str,                       # "conv2d", "conv_transpose2d", "linear", ...
         "action": str,                   # "tune", "tune_keep_weight" or "skip"
         "reason": str,                   # "tuned" or a key of convbn_pass.REASONS
         "detail": str,                   # the sentence behind the reason
         "weight_numel": int | null, "activation_numel": int | null}],
      "totals":  {"candidates": int, "tuned": int,
                  "tuned_keep_weight": int,      # of "tuned", those keeping W'
                  "skipped": int,
                  "skipped_by_reason": {reason: int}},
      "counters": {key: int},             # this run's counters["convbn_pass"]
      "memory":  {"backend": str,         # the backend that produced the figures
                  "without_pass_bytes": int, "with_pass_bytes": int,
                  "saved_bytes": int,     # without - with (negative: the pass keeps more)
                  "saved_fraction": float | null},   # saved / without
      "graphs":  {"before": [str] | null, # printing.format_graph text, one per graph,
                  "after": [str] | null}, # as asked by --graphs
      "timings_s": {"compile_without_pass": float, "measure_without_pass": float,
                    "compile_with_pass": float, "measure_with_pass": float},
      "versions": {"convbn_pass": str, "torch": str}
    }

Everything but ``timings_s`` is deterministic for a given model, input and
torch version.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import json
import pathlib
import re
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch._functorch import config as functorch_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import convbn_pass
from . import backends, memory, zoo
from .inductor import ConvBNPass
from .printing import format_graph
from .records import COUNTER, Decision

__all__ = ["main", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
PROG = "convbn_pass.inspect"
DEFAULT_MODEL = "resnet18"
# Input of a model that is not built in, unless --shape/--batch say otherwise.
_EXTERNAL_INPUT: tuple[tuple[int, ...], int] = ((3, 224, 224), 8)

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}
_BACKENDS = {
    "light": "convbn_pass.backends.light: the pass, then AOTAutograd with Inductor's "
             "partitioner, no code generation",
    "inductor": "torch.compile's default backend, the pass in its options",
}
# Inductor's caches that could hand back a graph compiled earlier, so that the pass
# runs on every compile (AOTAutograd's cache is switched off around the compiles).
_NO_CACHE = {"fx_graph_cache": False, "fx_graph_remote_cache": False,
             "autotune_local_cache": False, "autotune_remote_cache": False}
_OUT_FILES = ("report.txt", "report.json", "graph_before.txt", "graph_after.txt")


class _UsageError(Exception):
    """Bad input: reported in one line, exit status 2."""


class _Failure(Exception):
    """Compiling or measuring failed: reported in one line, exit status 1."""


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Show which Conv-BatchNorm blocks the convbn_pass "
                "rewrite turns into Tune mode, why the others are left alone, the graphs "
                "before and after, and the activation memory it saves.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a built-in model (see --list; default {DEFAULT_MODEL}), "
                   "torchvision:NAME, timm:NAME, or package.module:callable returning "
                   "an nn.Module")
    p.add_argument("--list", action="store_true", help="list the built-in models and exit")
    p.add_argument("--shape", type=_shape,
                   help="one sample's shape without the batch axis, e.g. 3,224,224 "
                   "(default: the built-in model's, else 3,224,224)")
    p.add_argument("--batch", type=_positive, help="batch size (default: the built-in "
                   f"model's, else {_EXTERNAL_INPUT[1]})")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--train", action="store_true",
                   help="BatchNorm in training mode (batch statistics): nothing is tuned")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    p.add_argument("--policy", choices=list(convbn_pass.POLICIES), default="auto",
                   help="; ".join(f"{k}: {v}" for k, v in convbn_pass.POLICIES.items()))
    p.add_argument("--backend", choices=list(_BACKENDS), default="light",
                   help="; ".join(f"{k}: {v}" for k, v in _BACKENDS.items())
                   + " (default light: inductor compiles slower)")
    p.add_argument("--graphs", choices=("none", "before", "after", "both"), default="none",
                   help="graphs to print in the report (default none)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--out", type=pathlib.Path, metavar="DIR",
                   help=f"also write {', '.join(_OUT_FILES)} there")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    return p


def _shape(text: str) -> tuple[int, ...]:
    """``3,224,224`` or ``3x224x224``."""
    parts = re.split(r"[,x]", text.strip())
    if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write positive sizes like 3,224,224")
    return tuple(int(part) for part in parts)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Model:
    module: nn.Module
    spec: str                            # as the user wrote it
    source: str                          # "zoo", "torchvision", "timm", "import"
    about: str
    input_shape: tuple[int, ...]         # one sample, the default when --shape is not given
    batch: int


def _model_list() -> str:
    width = max(map(len, zoo.MODELS))
    return "\n".join(
        f"{name:<{width}}  {'x'.join(map(str, spec.input_shape)):<9}  batch {spec.batch:<3} "
        f" {spec.about}" for name, spec in zoo.MODELS.items())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _choices() -> str:
    return f"{', '.join(zoo.MODELS)}, or torchvision:NAME, timm:NAME, package.module:callable"


def _load_model(spec: str) -> _Model:
    if spec in zoo.MODELS:
        entry = zoo.MODELS[spec]
        return _Model(_build(entry.factory, spec), spec, "zoo", entry.about,
                      entry.input_shape, entry.batch)
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise _UsageError(f"unknown model {spec!r}; choose one of {_choices()}")
    if prefix == "torchvision":
        factory, about = _torchvision(name), f"torchvision.models.get_model({name!r})"
    elif prefix == "timm":
        factory, about = _timm(name), f"timm.create_model({name!r})"
    else:
        factory, about = _imported(prefix, name), f"{prefix}:{name}()"
    source = prefix if prefix in ("torchvision", "timm") else "import"
    module = _build(factory, spec)
    return _Model(module, spec, source, f"{type(module).__name__} from {about}",
                  *_EXTERNAL_INPUT)


def _build(factory: Callable[[], Any], spec: str) -> nn.Module:
    try:
        module = factory()
    except _UsageError:
        raise
    except Exception as exc:
        raise _UsageError(f"building model {spec!r} failed: {_one_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise _UsageError(f"model {spec!r} returned {type(module).__name__}, "
                          "not a torch.nn.Module")
    return module


def _optional(package: str, spec: str) -> Any:
    try:
        return importlib.import_module(package)
    except Exception as exc:
        raise _UsageError(
            f"{spec!r} needs {package}, which does not import here ({_one_line(exc)}); "
            f"install it (pip install {package}) or choose one of {', '.join(zoo.MODELS)}"
        ) from exc


def _torchvision(name: str) -> Callable[[], Any]:
    def factory() -> Any:
        models = _optional("torchvision", f"torchvision:{name}").models
        if name not in models.list_models():
            raise _UsageError(f"torchvision has no model {name!r}; choose one of "
                              f"{', '.join(models.list_models())}")
        return models.get_model(name, weights=None)
    return factory


def _timm(name: str) -> Callable[[], Any]:
    def factory() -> Any:
        timm = _optional("timm", f"timm:{name}")
        if not timm.is_model(name):
            raise _UsageError(f"timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False)
    return factory


def _imported(module_name: str, attribute: str) -> Callable[[], Any]:
    spec = f"{module_name}:{attribute}"
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise _UsageError(f"cannot import {module_name!r} for model {spec!r} "
                          f"({_one_line(exc)})") from exc
    except Exception as exc:
        raise _UsageError(f"importing {module_name!r} for model {spec!r} failed: "
                          f"{_one_line(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _UsageError(f"{module_name!r} has no attribute {attribute!r} "
                              f"(model {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise _UsageError(f"model {spec!r} is a {type(target).__name__}, not a callable "
                          "returning an nn.Module")
    return target


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise _UsageError(f"unknown device {name!r} ({_one_line(exc)})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise _UsageError(f"device {name!r} cannot be used ({_one_line(exc)})") from exc
    return device


def _prepare(args: argparse.Namespace) -> tuple[_Model, torch.Tensor]:
    """The model (on its device, dtype and mode) and the input batch; checks both."""
    device = _device(args.device)
    with torch.random.fork_rng(devices=[]):  # the same weights and input every run
        torch.manual_seed(0)
        model = _load_model(args.model)
        shape = args.shape or model.input_shape
        x = torch.randn(args.batch or model.batch, *shape)
    module = model.module.to(device=device, dtype=_DTYPES[args.dtype])
    module.train(args.train)
    x = x.to(device=device, dtype=_DTYPES[args.dtype])
    try:
        with torch.no_grad():
            module(x)
    except Exception as exc:
        raise _UsageError(f"model {args.model!r} rejects an input of shape {list(x.shape)}, "
                          f"{args.dtype} on {device} ({_one_line(exc)}); see --shape, "
                          "--batch, --dtype, --device") from exc
    return model, x


# ---------------------------------------------------------------------------
# Compiling with and without the pass, capturing graphs and decisions.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Graph:
    before: str                   # the graph the pass got (normalised text)
    compile_id: str | None        # Dynamo's "frame/compile" id ("0/0"), None outside Dynamo
    attempt: int                  # Dynamo restarts a compile with attempt + 1
    after: str | None = None      # the graph it left; None when the pass did not run
    decisions: list[Decision] = dataclasses.field(default_factory=list)


def _kept(graphs: list[_Graph]) -> list[_Graph]:
    """The graphs Dynamo kept: a restarted compile discards its earlier attempts."""
    last: dict[str | None, int] = {}
    for graph in graphs:
        last[graph.compile_id] = max(last.get(graph.compile_id, 0), graph.attempt)
    return [g for g in graphs if g.attempt == last[g.compile_id]]


class _Sink:
    """The graphs one compile produced, each with the decisions the pass recorded on it."""

    def __init__(self) -> None:
        self.graphs: list[_Graph] = []
        self._mark = 0

    def before(self, graph: fx.Graph) -> None:
        self._mark = len(convbn_pass.decisions())
        trace = torch._guards.CompileContext.current_trace_id()
        compile_id = None if trace is None else str(trace.compile_id)
        attempt = 0 if trace is None else trace.attempt
        self.graphs.append(_Graph(format_graph(graph), compile_id, attempt))

    def after(self, graph: fx.Graph) -> None:
        current = self.graphs[-1]
        current.after = format_graph(graph)
        current.decisions = convbn_pass.decisions()[self._mark:]


class _Snapshot(CustomGraphPass):
    """A pre-grad pass that only shows the graph to ``see``."""

    def __init__(self, see: Callable[[fx.Graph], None]) -> None:
        self._see = see

    def __call__(self, graph: fx.Graph) -> None:
        self._see(graph)

    def uuid(self) -> Any:
        return ("convbn_pass.inspect", "snapshot")


class _TracedPass(ConvBNPass):
    """The pass as :func:`convbn_pass.options` made it, with the graph captured
    before (after the user's own pre-grad passes) and after it."""

    def __init__(self, chosen: ConvBNPass, sink: _Sink) -> None:
        super().__init__(chosen.policy, (*chosen.before, _Snapshot(sink.before)))
        self._sink = sink

    def __call__(self, graph: fx.Graph) -> None:
        super().__call__(graph)
        self._sink.after(graph)


def _light_backend(policy: str | None, sink: _Sink) -> Callable[..., Any]:
    def on_graph(kind: str, gm: fx.GraphModule) -> None:
        if kind == "pre":
            sink.after(gm.graph)

    inner = backends.light(policy, on_graph)

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        sink.before(gm.graph)
        return inner(gm, example_inputs)

    return backend


def _compile(model: nn.Module, policy: str | None, args: argparse.Namespace,
             sink: _Sink) -> Callable[..., Any]:
    """``model`` compiled with the pass under ``policy`` (None: without it), with
    options of its own and no compile cache."""
    torch._dynamo.reset()  # Dynamo would reuse the other compile's graph otherwise
    if args.backend == "light":
        return torch.compile(model, backend=_light_backend(policy, sink),
                             dynamic=args.dynamic)
    with_pass = convbn_pass.options(policy or "auto", **_NO_CACHE)
    chosen = with_pass["pre_grad_custom_pass"]
    assert isinstance(chosen, ConvBNPass)
    if policy is not None:
        options = {**with_pass, "pre_grad_custom_pass": _TracedPass(chosen, sink)}
    else:  # the user's own pre-grad passes, if any, and no ConvBNPass
        snapshot = _Snapshot(sink.before)
        options = {**_NO_CACHE, "pre_grad_custom_pass":
                   [*chosen.before, snapshot] if chosen.before else snapshot}
    return torch.compile(model, options=options, dynamic=args.dynamic)


@dataclasses.dataclass
class _Run:
    graphs: list[_Graph]
    decisions: list[Decision]            # recorded during this compile and step
    counters: dict[str, int]             # counters["convbn_pass"] added by it
    saved_bytes: int
    compile_s: float
    measure_s: float


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[list[float]]:
        elapsed = [0.0]
        if not self.quiet:
            print(f"{PROG}: {what}...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield elapsed
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        elapsed[0] = time.perf_counter() - start
        if not self.quiet:
            print(f" {elapsed[0]:.1f} s", file=sys.stderr, flush=True)


def _step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> None:
    """One forward and backward (of the sum of the outputs), as the measurement takes."""
    outputs = [t for t in torch.utils._pytree.tree_leaves(fn(x))
               if isinstance(t, torch.Tensor) and t.requires_grad]
    if outputs:
        torch.autograd.backward([t.float().sum() for t in outputs])
    model.zero_grad(set_to_none=True)


def _run(model: nn.Module, x: torch.Tensor, policy: str | None,
         args: argparse.Namespace, progress: _Progress) -> _Run:
    """Compile, take one step (which compiles forward and backward), then measure."""
    label = "without the pass" if policy is None else f"with the pass (policy {policy})"
    sink = _Sink()
    first = len(convbn_pass.decisions())
    counted = collections.Counter(torch._dynamo.utils.counters[COUNTER])
    try:
        with functorch_config.patch(enable_autograd_cache=False):
            fn = _compile(model, policy, args, sink)
            with progress.step(f"compiling {label}, {args.backend} backend") as compile_s:
                _step(fn, model, x)
            with progress.step(f"measuring activation memory {label}") as measure_s:
                saved = memory.saved_activation_bytes(fn, model, x)
                model.zero_grad(set_to_none=True)
    except Exception as exc:
        raise _Failure(f"compiling or running {label} failed: {_one_line(exc)}") from exc
    added = collections.Counter(torch._dynamo.utils.counters[COUNTER])
    added.subtract(counted)
    return _Run(sink.graphs, convbn_pass.decisions()[first:],
                {k: v for k, v in sorted(added.items()) if v}, saved,
                compile_s[0], measure_s[0])


def _check_distinct(baseline: _Run, tuned: _Run) -> None:
    """The two figures must come from two compiles: one without the pass, one with."""
    if baseline.decisions:
        raise _Failure(f"the compile without the pass recorded {len(baseline.decisions)} "
                       "decisions: the pass ran in it (is it enabled globally?)")
    if baseline.graphs and not tuned.graphs:
        raise _Failure("the compile with the pass compiled no graph: Dynamo reused the "
                       "baseline's, so the pass did not run")
    if any(g.after is None for g in tuned.graphs):
        raise _Failure("the pass did not run on every graph of its compile")
    if sum(len(g.decisions) for g in tuned.graphs) != len(tuned.decisions):
        raise _Failure("decisions were recorded outside the graphs of this compile")


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------

def _report(args: argparse.Namespace, model: _Model, x: torch.Tensor, baseline: _Run,
            tuned: _Run) -> dict[str, Any]:
    graphs, base_graphs = _kept(tuned.graphs), _kept(baseline.graphs)
    pairs = [{"graph": index, "conv": d.conv, "bn": d.bn, "op": d.op, "action": d.action,
              "reason": d.reason, "detail": d.detail, "weight_numel": d.weight_numel,
              "activation_numel": d.activation_numel}
             for index, graph in enumerate(graphs, 1) for d in graph.decisions]
    skipped = collections.Counter(p["reason"] for p in pairs if p["action"] == "skip")
    without, with_pass = baseline.saved_bytes, tuned.saved_bytes
    show_before = args.graphs in ("before", "both")
    show_after = args.graphs in ("after", "both")
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"spec": model.spec, "source": model.source, "about": model.about},
        "input": {"shape": list(x.shape), "dtype": args.dtype, "device": str(x.device),
                  "dynamic": bool(args.dynamic), "bn_mode": "train" if args.train else "eval"},
        "policy": {"name": args.policy, "about": convbn_pass.POLICIES[args.policy]},
        "backend": args.backend,
        "compiles": {"without_pass_graphs": len(base_graphs), "with_pass_graphs": len(graphs),
                     "discarded_graphs": len(tuned.graphs) - len(graphs), "caches": "off"},
        "pairs": pairs,
        "totals": {
            "candidates": len(pairs),
            "tuned": sum(p["action"] != "skip" for p in pairs),
            "tuned_keep_weight": sum(p["action"] == "tune_keep_weight" for p in pairs),
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
        },
        "counters": tuned.counters,
        "memory": {"backend": args.backend, "without_pass_bytes": without,
                   "with_pass_bytes": with_pass, "saved_bytes": without - with_pass,
                   "saved_fraction": (without - with_pass) / without if without else None},
        "graphs": {"before": [g.before for g in graphs] if show_before else None,
                   "after": [g.after for g in graphs] if show_after else None},
        "timings_s": {"compile_without_pass": round(baseline.compile_s, 3),
                      "measure_without_pass": round(baseline.measure_s, 3),
                      "compile_with_pass": round(tuned.compile_s, 3),
                      "measure_with_pass": round(tuned.measure_s, 3)},
        "versions": {"convbn_pass": convbn_pass.__version__, "torch": torch.__version__},
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]


def _discarded(compiles: dict[str, Any]) -> str:
    n = compiles["discarded_graphs"]
    if not n:
        return ""
    return (f" (and {_plural(n, 'graph')} of a compile Dynamo restarted: not shown, "
            "but counted in the counters)")


def _text(r: dict[str, Any]) -> str:
    inp, totals, mem = r["input"], r["totals"], r["memory"]
    compiles = r["compiles"]
    lines = [
        f"{PROG}: {r['model']['spec']}: {r['model']['about']}",
        f"input     {inp['shape']} {inp['dtype']} on {inp['device']}, "
        f"{'dynamic' if inp['dynamic'] else 'static'} shapes, BatchNorm in "
        f"{'training' if inp['bn_mode'] == 'train' else 'eval'} mode",
        f"policy    {r['policy']['name']}: {r['policy']['about']}",
        f"backend   {r['backend']}: {_BACKENDS[r['backend']]}",
        f"compiles  two, each with its own options, graph caches off: without the pass "
        f"{_plural(compiles['without_pass_graphs'], 'graph')}, with the pass "
        f"{_plural(compiles['with_pass_graphs'], 'graph')}" + _discarded(compiles),
        "",
    ]
    pairs = r["pairs"]
    if not pairs:
        lines.append("No Conv->BatchNorm or Linear->BatchNorm1d pair in the compiled "
                     "graphs: nothing to tune.")
    else:
        several = compiles["with_pass_graphs"] > 1
        head = ["#", *(["graph"] if several else []), "conv → bn", "op", "decision",
                "reason", "detail"]
        rows = [[str(i), *([str(p["graph"])] if several else []),
                 f"{p['conv']} → {p['bn']}", p["op"], p["action"], p["reason"], p["detail"]]
                for i, p in enumerate(pairs, 1)]
        lines.append(f"Candidate pairs: {len(pairs)}")
        lines += _table([head, *rows])
    tuned, keep = totals["tuned"], totals["tuned_keep_weight"]
    skipped = ", ".join(f"{k} {v}" for k, v in totals["skipped_by_reason"].items())
    lines += [
        "",
        f"totals    {_plural(totals['candidates'], 'candidate')}: {tuned} tuned "
        f"({tuned - keep} rebuild W' in backward, {keep} keep W'), "
        f"{totals['skipped']} skipped" + (f" ({skipped})" if skipped else ""),
        f'counters  torch._dynamo.utils.counters["{COUNTER}"]: '
        + (", ".join(f"{k}={v}" for k, v in r["counters"].items()) or "none"),
        "",
        f"Activation memory saved for backward, one forward/backward step, "
        f"{mem['backend']} backend:",
    ]
    share = "" if mem["saved_fraction"] is None else f", {mem['saved_fraction']:.1%}"
    figures = [("without the pass", mem["without_pass_bytes"], ""),
               ("with the pass", mem["with_pass_bytes"], ""),
               ("saved", mem["saved_bytes"], share)]
    width = max(len(f"{n:,}") for _, n, _ in figures)
    lines += [f"  {label:<16}  {n:>{width},} bytes  ({_size(n)}{extra})"
              for label, n, extra in figures]
    for when in ("before", "after"):
        texts = r["graphs"][when]
        for i, graph in enumerate(texts or [], 1):
            lines += ["", f"Graph {i} of {len(texts)}, {when} the pass:", graph.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _graph_file(graphs: list[str | None], when: str) -> str:
    return "".join(f"# graph {i} of {len(graphs)}, {when} the pass\n{text}\n"
                   for i, text in enumerate(graphs, 1))


def _write_out(directory: pathlib.Path, report: dict[str, Any], graphs: list[_Graph],
               progress: _Progress) -> None:
    files = {
        "report.txt": _text(report),
        "report.json": json.dumps(report, indent=2) + "\n",
        "graph_before.txt": _graph_file([g.before for g in graphs], "before"),
        "graph_after.txt": _graph_file([g.after for g in graphs], "after"),
    }
    with progress.step(f"writing {', '.join(files)} to {directory}"):
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")


def _make_out(directory: pathlib.Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"cannot write to --out {str(directory)!r} ({_one_line(exc)})") \
            from exc


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------

def _inspect(args: argparse.Namespace, progress: _Progress) -> tuple[dict[str, Any],
                                                                    list[_Graph]]:
    if args.out is not None:
        _make_out(args.out)
    model, x = _prepare(args)  # bad input fails here, before any progress line
    baseline = _run(model.module, x, None, args, progress)
    tuned = _run(model.module, x, args.policy, args, progress)
    _check_distinct(baseline, tuned)
    return _report(args, model, x, baseline, tuned), _kept(tuned.graphs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m convbn_pass.inspect [MODEL] [options]``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.list:
        print(_model_list())
        return 0
    progress = _Progress(args.quiet)
    try:
        report, graphs = _inspect(args, progress)
        if args.out is not None:
            _write_out(args.out, report, graphs, progress)
    except (_UsageError, _Failure, OSError) as exc:
        if args.debug:
            traceback.print_exception(exc)
        hint = "" if args.debug else " (--debug for the traceback)"
        print(f"{PROG}: error: {exc}{hint if isinstance(exc, _Failure) else ''}",
              file=sys.stderr)
        return 2 if isinstance(exc, _UsageError) else 1
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(_text(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
