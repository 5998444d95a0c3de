"""``python -m convbn_pass.inspect``: what the pass does to one model, before a long run.

::

    python -m convbn_pass.inspect                        # the built-in ResNet-18
    python -m convbn_pass.inspect --list                 # the built-in models
    python -m convbn_pass.inspect resnet50 --policy memory --graphs after
    python -m convbn_pass.inspect mypkg.models:build --shape 3,224,224 --batch 16
    python -m convbn_pass.inspect torchvision:resnet50 --backend inductor --out report/
    python -m convbn_pass.inspect resnet50 --regions auto   # regions, compiling nothing

The model is compiled twice: once without the pass (the baseline) and once
with it, each compile with its own options, with Inductor's FX graph cache and
AOTAutograd's cache off and ``torch._dynamo.reset()`` before it. Each runs one
forward/backward step, and the activation bytes it keeps for backward are
measured with :func:`convbn_pass.memory.saved_activation_bytes`. The table lists
the decisions the pass handed to its ``on_graph`` callback during the second
compile (the same records that feed
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

Progress goes to stderr; stdout carries only the report (``convbn_pass.report``
documents the JSON schema). With ``--graphs`` (text format) the graphs asked for
are the output: stdout carries them alone, each under a ``# graph i of n``
header, and the report goes to stderr, so that ``--graphs after | head`` and
``--graphs after > graphs.txt`` get graphs (the JSON keeps both in one document). Exit status: 0 on success (a model without candidate
pairs included), 2 for bad input (one line on stderr; ``--debug`` adds the
traceback), 1 when compiling or measuring fails.

``--regions`` compiles nothing: it traces the model once and prints the plan
:func:`convbn_pass.compile_regions` would follow (``auto``, module paths
separated by commas, or a module class name), and every conv-BN pair that
those regions would separate.

``--eager`` compiles nothing either: it prints the plan :func:`convbn_pass.tune`
makes under ``--policy`` (tuning a copy of the model) and the activation bytes of
one eager forward/backward step without and with it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import os
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

import convbn_pass
from . import backends, coverage, memory, models, regions, report
from .core import compat
from .core.inductor import GraphRewrite, user_passes
from .printing import format_graph
from .core.records import COUNTER, current_compile_id, tally
from .step import train_step

__all__ = ["main"]

PROG = report.PROG
DEFAULT_MODEL = "resnet18"

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}
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
                   f"model's, else {models.EXTERNAL_INPUT[1]})")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--train", action="store_true",
                   help="BatchNorm in training mode (batch statistics): nothing is tuned")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    p.add_argument("--policy", choices=list(convbn_pass.POLICIES), default="auto",
                   help="; ".join(f"{k}: {v}" for k, v in convbn_pass.POLICIES.items()))
    p.add_argument("--backend", choices=list(report.BACKENDS), default="light",
                   help="; ".join(f"{k}: {v}" for k, v in report.BACKENDS.items())
                   + " (default light: inductor compiles slower)")
    p.add_argument("--graphs", choices=("none", "before", "after", "both"), default="none",
                   help="print these graphs on stdout, the report then on stderr (default none)")
    p.add_argument("--regions", metavar="SPEC",
                   help="compile nothing; show the regions compile_regions would compile and "
                   "the pairs they would separate. SPEC: auto (the outermost modules that "
                   "hold whole pairs), module paths separated by commas (layer1,layer2.0), "
                   "or a module class name (Bottleneck)")
    p.add_argument("--eager", action="store_true",
                   help="compile nothing; show the plan convbn_pass.tune makes under --policy "
                   "and the activation bytes of one eager step without and with it")
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

def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise _UsageError(f"unknown device {name!r} ({models.one_line(exc)})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise _UsageError(f"device {name!r} cannot be used ({models.one_line(exc)})") from exc
    return device


def _prepare(args: argparse.Namespace) -> tuple[models.Model, torch.Tensor]:
    """The model (on its device, dtype and mode) and the input batch; checks both."""
    device = _device(args.device)
    with torch.random.fork_rng(devices=[]):  # the same weights and input every run
        torch.manual_seed(0)
        try:
            model = models.load(args.model)
        except models.ModelError as exc:
            raise _UsageError(str(exc)) from exc
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
                          f"{args.dtype} on {device} ({models.one_line(exc)}); see --shape, "
                          "--batch, --dtype, --device") from exc
    return model, x


# ---------------------------------------------------------------------------
# Compiling with and without the pass.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Compile:
    """What one compile produced: each Dynamo graph, and what the pass did to it."""

    graphs: list[tuple[str | None, int]] = dataclasses.field(default_factory=list)
    rewrites: list[GraphRewrite] = dataclasses.field(default_factory=list)

    def backend(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``inner`` (a torch.compile backend), noting each graph Dynamo hands it."""
        def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
            self.graphs.append(current_compile_id())
            return inner(gm, example_inputs)
        return backend


def _kept(ids: Sequence[tuple[str | None, int]]) -> list[bool]:
    """For each (compile id, attempt): whether Dynamo kept that graph (a restarted
    compile discards its earlier attempts)."""
    last: dict[str | None, int] = {}
    for compile_id, attempt in ids:
        last[compile_id] = max(last.get(compile_id, 0), attempt)
    return [attempt == last[compile_id] for compile_id, attempt in ids]


def _compile(model: nn.Module, policy: str | None, args: argparse.Namespace,
             seen: _Compile, runs: coverage.GraphRuns | None = None) -> Callable[..., Any]:
    """``model`` compiled with the pass under ``policy`` (None: without it), with
    options of its own and no compile cache."""
    torch._dynamo.reset()  # Dynamo would reuse the other compile's graph otherwise
    if args.backend == "light":
        inner = backends.light(policy, on_graph=seen.rewrites.append)
    else:
        if policy is not None:
            options = convbn_pass.options(policy, on_graph=seen.rewrites.append, **_NO_CACHE)
        else:  # the user's own pre-grad passes, if any, and not this one even if enabled
            options = {**_NO_CACHE,
                       "pre_grad_custom_pass": compat.custom_pass_setting(user_passes())}
        inner = compat.inductor_backend(options, dynamic=args.dynamic)
    backend = seen.backend(inner)
    if runs is not None:
        backend = runs.backend(backend)
    return torch.compile(model, backend=backend, dynamic=args.dynamic)


@dataclasses.dataclass
class _Run:
    seen: _Compile
    counters: dict[str, int]             # counters["convbn_pass"] added by it
    saved_bytes: int
    compile_s: float
    measure_s: float
    runs: coverage.GraphRuns | None = None  # which pairs the graphs held, as they ran

    @property
    def kept(self) -> list[GraphRewrite]:
        """The pass's view of each graph Dynamo kept."""
        ids = [(r.compile_id, r.attempt) for r in self.seen.rewrites]
        return [r for r, keep in zip(self.seen.rewrites, _kept(ids)) if keep]


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

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


def _run(model: nn.Module, x: torch.Tensor, policy: str | None,
         args: argparse.Namespace, progress: _Progress) -> _Run:
    """Compile, take one step (which compiles forward and backward), then measure;
    with the pass, note which pairs its graphs held as they ran."""
    label = "without the pass" if policy is None else f"with the pass (policy {policy})"
    seen = _Compile()
    runs = None if policy is None else coverage.GraphRuns(model)
    counted = collections.Counter(torch._dynamo.utils.counters[COUNTER])
    try:
        with functorch_config.patch(enable_autograd_cache=False):
            fn = _compile(model, policy, args, seen, runs)
            with progress.step(f"compiling {label}, {args.backend} backend") as compile_s, \
                    (runs.watch() if runs is not None else contextlib.nullcontext()):
                train_step(fn, model, x)
            with progress.step(f"measuring activation memory {label}") as measure_s:
                saved = memory.saved_activation_bytes(fn, model, x)
                model.zero_grad(set_to_none=True)
    except Exception as exc:
        raise _Failure(f"compiling or running {label} failed: {models.one_line(exc)}") \
            from exc
    added = collections.Counter(torch._dynamo.utils.counters[COUNTER])
    added.subtract(counted)
    return _Run(seen, {k: v for k, v in sorted(added.items()) if v}, saved,
                compile_s[0], measure_s[0], runs)


def _check_distinct(baseline: _Run, tuned: _Run) -> None:
    """The two figures must come from two compiles: one without the pass, one with."""
    if baseline.counters:
        raise _Failure(f"the compile without the pass recorded decisions "
                       f"({baseline.counters}): the pass ran in it (is it enabled globally?)")
    if baseline.seen.graphs and not tuned.seen.graphs:
        raise _Failure("the compile with the pass compiled no graph: Dynamo reused the "
                       "baseline's, so the pass did not run")
    if len(tuned.seen.rewrites) != len(tuned.seen.graphs):
        raise _Failure("the pass did not run on every graph of its compile")


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------

def _report(args: argparse.Namespace, model: models.Model, x: torch.Tensor, baseline: _Run,
            tuned: _Run, outside: list[coverage.Outside]) -> report.Report:
    kept = tuned.kept
    show_before = args.graphs in ("before", "both")
    show_after = args.graphs in ("after", "both")
    pairs = report.rows_of([r.decisions for r in kept])
    return report.Report(
        schema_version=report.SCHEMA_VERSION,
        model=report.ModelInfo(model.spec, model.source, model.about),
        input=report.InputInfo(list(x.shape), args.dtype, str(x.device), bool(args.dynamic),
                               "train" if args.train else "eval"),
        policy=report.PolicyInfo(args.policy, convbn_pass.POLICIES[args.policy]),
        backend=args.backend,
        compiles=report.Compiles(sum(_kept(baseline.seen.graphs)), len(kept),
                                 len(tuned.seen.rewrites) - len(kept)),
        pairs=pairs,
        totals=tally(pairs),
        counters=tuned.counters,
        outside_graphs=[report.OutsidePair(*o, coverage.HINTS[o.reason]) for o in outside],
        memory=report.Memory.of(args.backend, baseline.saved_bytes, tuned.saved_bytes),
        graphs=report.Graphs([format_graph(r.before) for r in kept] if show_before else None,
                             [format_graph(r.after) for r in kept] if show_after else None),
        timings_s=report.Timings(round(baseline.compile_s, 3), round(baseline.measure_s, 3),
                                 round(tuned.compile_s, 3), round(tuned.measure_s, 3)),
        versions=report.Versions(convbn_pass.__version__, torch.__version__),
    )


def _write_out(directory: pathlib.Path, r: report.Report, kept: list[GraphRewrite],
               progress: _Progress) -> None:
    files = {
        "report.txt": report.text(r),
        "report.json": json.dumps(r.to_json(), indent=2) + "\n",
        "graph_before.txt": report.graph_file([format_graph(g.before) for g in kept], "before"),
        "graph_after.txt": report.graph_file([format_graph(g.after) for g in kept], "after"),
    }
    with progress.step(f"writing {', '.join(files)} to {directory}"):
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")


def _make_out(directory: pathlib.Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"cannot write to --out {str(directory)!r} "
                          f"({models.one_line(exc)})") from exc


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------

def _inspect(args: argparse.Namespace, progress: _Progress
             ) -> tuple[report.Report, list[GraphRewrite]]:
    if args.out is not None:
        _make_out(args.out)
    model, x = _prepare(args)  # bad input fails here, before any progress line
    with progress.step("finding the conv-BN pairs the forward runs"):
        pairs = (regions.find_pairs(model.module, (x,)), coverage.seen_pairs(model.module, x))
    baseline = _run(model.module, x, None, args, progress)
    tuned = _run(model.module, x, args.policy, args, progress)
    _check_distinct(baseline, tuned)
    assert tuned.runs is not None
    outside = coverage.outside(pairs, tuned.runs)
    for o in outside:  # counted as the pass counts its decisions
        torch._dynamo.utils.counters[COUNTER][f"outside_{o.reason}"] += 1
        tuned.counters[f"outside_{o.reason}"] = tuned.counters.get(f"outside_{o.reason}", 0) + 1
    return _report(args, model, x, baseline, tuned, outside), tuned.kept


def _regions(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The region plan for ``--regions`` as text and as JSON."""
    model, x = _prepare(args)
    chosen = _region_spec(model.module, args.regions)
    try:
        plan = regions.plan_regions(model.module, (x,), chosen)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    data = {
        "model": args.model, "regions": list(plan.regions), "root_compiled": plan.root,
        "groups": [list(g) for g in plan.groups],
        "pairs": [{"conv": p.conv, "bn": p.bn, "op": p.op, "region": plan.region_of(p),
                   "reject": p.reject} for p in plan.pairs],
        "split": [{"conv": s.pair.conv, "bn": s.pair.bn, "conv_region": s.conv_region,
                   "bn_region": s.bn_region} for s in plan.split],
    }
    return f"{args.model}: {regions.describe(plan)}\n", data


def _eager(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The plan of ``convbn_pass.tune`` and an eager step's bytes, as text and JSON."""
    model, x = _prepare(args)
    module = model.module
    tuned = copy.deepcopy(module)
    try:
        plan = convbn_pass.tune(tuned, (x,), policy=args.policy)
    except (TypeError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    without = memory.saved_activation_bytes(module, module, x)
    with_tune = memory.saved_activation_bytes(tuned, tuned, x)
    pairs = [report.ReportRow(d.graph, d.conv, d.bn, d.op, d.action, d.reason, d.detail,
                              d.weight_numel, d.activation_numel) for d in plan.decisions]
    totals = tally(pairs)
    saved = without - with_tune
    share = f", {100 * saved / without:.1f}%" if without else ""
    lines = [f"{PROG}: {model.spec}: {model.about}",
             f"input     {list(x.shape)} {args.dtype} on {x.device}",
             f"policy    {args.policy}: {convbn_pass.POLICIES[args.policy]}",
             "eager     convbn_pass.tune: nothing compiled; the pairs read from one Dynamo "
             "trace", ""]
    if pairs:
        several = len({p.graph for p in pairs}) > 1
        head = ["#", *(["graph"] if several else []), "conv → bn", "op", "decision",
                "reason", "detail"]
        rows = [[str(i), *([str(p.graph)] if several else []), f"{p.conv} → {p.bn}", p.op,
                 str(p.action), str(p.reason), p.detail] for i, p in enumerate(pairs, 1)]
        lines += [f"Candidate pairs: {len(pairs)}", *report._table([head, *rows])]
    else:
        lines.append("No Conv->BatchNorm or Linear->BatchNorm1d pair: nothing to tune.")
    skipped = ", ".join(f"{k} {v}" for k, v in totals.skipped_by_reason.items())
    lines += ["", f"totals    {totals.candidates} candidates: {totals.tuned} tuned "
              f"({totals.tuned - totals.tuned_keep_weight} rebuild W′ in backward, "
              f"{totals.tuned_keep_weight} keep W′), {totals.skipped} skipped"
              + (f" ({skipped})" if skipped else ""), "",
              "Activation memory saved for backward, one eager forward/backward step:",
              f"  without tune  {without:,} bytes  ({report.size(without)})",
              f"  with tune     {with_tune:,} bytes  ({report.size(with_tune)})",
              f"  saved         {saved:,} bytes  ({report.size(saved)}{share})"]
    data = {"model": model.spec, "input": {"shape": list(x.shape), "dtype": args.dtype,
                                           "device": str(x.device)},
            "policy": args.policy,
            "pairs": [{**dataclasses.asdict(p), "action": str(p.action),
                       "reason": str(p.reason)} for p in pairs],
            "totals": dataclasses.asdict(totals),
            "memory": {"without_tune_bytes": without, "with_tune_bytes": with_tune,
                       "saved_bytes": saved}}
    return "\n".join(lines) + "\n", data


def _region_spec(module: nn.Module, spec: str) -> regions.Regions:
    if spec == "auto":
        return None
    classes = {type(m) for m in module.modules() if type(m).__name__ == spec}
    if classes:
        return tuple(classes)
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def _print(text: str) -> None:
    """``text`` to stdout; a reader that closed the pipe early (``| head``) is not an
    error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that no
        # second BrokenPipeError is printed then.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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
        _print(models.model_list() + "\n")
        return 0
    if args.regions is not None or args.eager:
        try:
            text, data = _regions(args) if args.regions is not None else _eager(args)
        except _UsageError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        _print(json.dumps(data, indent=2) + "\n" if args.format == "json" else text)
        return 0
    progress = _Progress(args.quiet)
    try:
        result, kept = _inspect(args, progress)
        if args.out is not None:
            _write_out(args.out, result, kept, progress)
    except (_UsageError, _Failure, OSError) as exc:
        if args.debug:
            traceback.print_exception(exc)
        hint = "" if args.debug else " (--debug for the traceback)"
        print(f"{PROG}: error: {exc}{hint if isinstance(exc, _Failure) else ''}",
              file=sys.stderr)
        return 2 if isinstance(exc, _UsageError) else 1
    if args.format == "json":
        _print(json.dumps(result.to_json(), indent=2) + "\n")
    elif args.graphs != "none":
        sys.stderr.write(report.text(dataclasses.replace(result, graphs=report.Graphs(None, None))))
        _print("".join(report.graph_file(texts, when) for when, texts in
                       (("before", result.graphs.before), ("after", result.graphs.after))
                       if texts is not None))
    else:
        _print(report.text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
