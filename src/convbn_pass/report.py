"""The ``inspect`` report as typed data, and its text and JSON forms.

:class:`Report` mirrors the JSON schema field for field (``to_json()`` is
``dataclasses.asdict``); :func:`text` renders it as the CLI prints it. Nothing
here measures anything: ``inspect`` fills a Report from the decision records the
pass wrote and the bytes it measured.

JSON report, ``schema_version`` 1. Later versions only add fields; changing or
removing one raises the version::

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
      "outside_graphs": [                 # pairs that ran outside every compiled graph:
        {"conv": str, "bn": str,          # the pass never saw them (no decision above)
         "reason": str,                   # "recompile_limit", "graph_break", "skipped_frame"
         "detail": str, "hint": str}],
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

import dataclasses
from typing import Any, Sequence

from .core.records import Action, Decision, Reason, Tally

__all__ = ["Report", "ReportRow", "SCHEMA_VERSION", "text", "rows_of", "BACKENDS", "PROG"]

SCHEMA_VERSION = 1
PROG = "convbn_pass.inspect"
BACKENDS = {
    "light": "convbn_pass.backends.light: the pass, then AOTAutograd with Inductor's "
             "partitioner, no code generation",
    "inductor": "torch.compile's default backend, the pass in its options",
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    spec: str
    source: str
    about: str


@dataclasses.dataclass(frozen=True)
class InputInfo:
    shape: list[int]
    dtype: str
    device: str
    dynamic: bool
    bn_mode: str                # "eval" or "train"


@dataclasses.dataclass(frozen=True)
class PolicyInfo:
    name: str
    about: str


@dataclasses.dataclass(frozen=True)
class Compiles:
    without_pass_graphs: int
    with_pass_graphs: int
    discarded_graphs: int
    caches: str = "off"


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One decision as the report lists it (``"pairs"`` in the JSON): a
    :class:`~convbn_pass.Decision` with the graph numbered within this run."""

    graph: int
    conv: str
    bn: str
    op: str
    action: Action
    reason: Reason
    detail: str
    weight_numel: int | None
    activation_numel: int | None


@dataclasses.dataclass(frozen=True)
class OutsidePair:
    conv: str
    bn: str
    reason: str
    detail: str
    hint: str


@dataclasses.dataclass(frozen=True)
class Memory:
    backend: str
    without_pass_bytes: int
    with_pass_bytes: int
    saved_bytes: int
    saved_fraction: float | None

    @classmethod
    def of(cls, backend: str, without: int, with_pass: int) -> "Memory":
        return cls(backend, without, with_pass, without - with_pass,
                   (without - with_pass) / without if without else None)


@dataclasses.dataclass(frozen=True)
class Graphs:
    before: list[str] | None
    after: list[str] | None


@dataclasses.dataclass(frozen=True)
class Timings:
    compile_without_pass: float
    measure_without_pass: float
    compile_with_pass: float
    measure_with_pass: float


@dataclasses.dataclass(frozen=True)
class Versions:
    convbn_pass: str
    torch: str


@dataclasses.dataclass(frozen=True)
class Report:
    schema_version: int
    model: ModelInfo
    input: InputInfo
    policy: PolicyInfo
    backend: str
    compiles: Compiles
    pairs: list[ReportRow]
    totals: Tally                    # core.records.tally(pairs)
    counters: dict[str, int]
    outside_graphs: list[OutsidePair]
    memory: Memory
    graphs: Graphs
    timings_s: Timings
    versions: Versions

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rows_of(graphs: Sequence[Sequence[Decision]]) -> list[ReportRow]:
    """One :class:`ReportRow` per decision, numbered by graph (1, 2, …)."""
    return [ReportRow(index, d.conv, d.bn, d.op, d.action, d.reason, d.detail, d.weight_numel,
                 d.activation_numel)
            for index, decided in enumerate(graphs, 1) for d in decided]


# ---------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def size(n: int) -> str:
    """Bytes in decimal units, as the report prints them: ``88.1 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]


def _discarded(compiles: Compiles) -> str:
    n = compiles.discarded_graphs
    if not n:
        return ""
    return (f" (and {_plural(n, 'graph')} of a compile Dynamo restarted: not shown, "
            "but counted in the counters)")


def text(r: Report) -> str:
    """The report as ``python -m convbn_pass.inspect`` prints it."""
    inp, totals, mem, compiles = r.input, r.totals, r.memory, r.compiles
    lines = [
        f"{PROG}: {r.model.spec}: {r.model.about}",
        f"input     {inp.shape} {inp.dtype} on {inp.device}, "
        f"{'dynamic' if inp.dynamic else 'static'} shapes, BatchNorm in "
        f"{'training' if inp.bn_mode == 'train' else 'eval'} mode",
        f"policy    {r.policy.name}: {r.policy.about}",
        f"backend   {r.backend}: {BACKENDS[r.backend]}",
        f"compiles  two, each with its own options, graph caches off: without the pass "
        f"{_plural(compiles.without_pass_graphs, 'graph')}, with the pass "
        f"{_plural(compiles.with_pass_graphs, 'graph')}" + _discarded(compiles),
        "",
    ]
    if not r.pairs:
        lines.append("No Conv->BatchNorm or Linear->BatchNorm1d pair in the compiled "
                     "graphs: nothing to tune.")
    else:
        several = compiles.with_pass_graphs > 1
        head = ["#", *(["graph"] if several else []), "conv → bn", "op", "decision",
                "reason", "detail"]
        rows = [[str(i), *([str(p.graph)] if several else []), f"{p.conv} → {p.bn}", p.op,
                 str(p.action), str(p.reason), p.detail] for i, p in enumerate(r.pairs, 1)]
        lines.append(f"Candidate pairs: {len(r.pairs)}")
        lines += _table([head, *rows])
    tuned, keep = totals.tuned, totals.tuned_keep_weight
    skipped = ", ".join(f"{k} {v}" for k, v in totals.skipped_by_reason.items())
    lines += [
        "",
        f"totals    {_plural(totals.candidates, 'candidate')}: {tuned} tuned "
        f"({tuned - keep} rebuild W' in backward, {keep} keep W'), "
        f"{totals.skipped} skipped" + (f" ({skipped})" if skipped else ""),
        'counters  torch._dynamo.utils.counters["convbn_pass"]: '
        + (", ".join(f"{k}={v}" for k, v in r.counters.items()) or "none"),
    ]
    if r.outside_graphs:
        lines += ["", f"Pairs that ran outside every compiled graph: {len(r.outside_graphs)} "
                  "(the pass never saw them)"]
        lines += _table([["conv → bn", "reason", "detail"],
                         *([f"{o.conv} → {o.bn}", o.reason, o.detail]
                           for o in r.outside_graphs)])
        hints = dict.fromkeys((o.reason, o.hint) for o in r.outside_graphs)
        lines += [f"  {reason}: {hint}" for reason, hint in hints]
    lines += [
        "",
        f"Activation memory saved for backward, one forward/backward step, "
        f"{mem.backend} backend:",
    ]
    share = "" if mem.saved_fraction is None else f", {mem.saved_fraction:.1%}"
    figures = [("without the pass", mem.without_pass_bytes, ""),
               ("with the pass", mem.with_pass_bytes, ""),
               ("saved", mem.saved_bytes, share)]
    width = max(len(f"{n:,}") for _, n, _ in figures)
    lines += [f"  {label:<16}  {n:>{width},} bytes  ({size(n)}{extra})"
              for label, n, extra in figures]
    for when, texts in (("before", r.graphs.before), ("after", r.graphs.after)):
        for i, graph in enumerate(texts or [], 1):
            lines += ["", f"Graph {i} of {len(texts or [])}, {when} the pass:",
                      graph.rstrip("\n")]
    return "\n".join(lines) + "\n"


def graph_file(graphs: Sequence[str], when: str) -> str:
    """Graph texts as one file, each under a ``# graph i of n`` header."""
    return "".join(f"# graph {i} of {len(graphs)}, {when} the pass\n{text}\n"
                   for i, text in enumerate(graphs, 1))
