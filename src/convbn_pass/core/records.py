"""The pass's vocabulary and its decision records.

Every candidate block the pass sees ends as one :class:`Decision`: an
:class:`Action` (tune, tune keeping W′, or skip: the block stays in Eval mode)
and a :class:`Reason` (``tuned``, or why not). Both are defined here once; the
counters (``torch._dynamo.utils.counters["convbn_pass"]``), the ``inspect`` CLI
and the tests all read these values, so what is printed is what the compiler did.

Callers that want the decisions of one compile pass ``on_graph`` to
:class:`convbn_pass.ConvBNPass` (or the light backend); :func:`decisions` keeps
only the latest :data:`LOG_SIZE` decisions of the process, so a process that
compiles thousands of graphs does not grow.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import threading
from typing import Iterable, Protocol

from torch._dynamo.utils import counters

__all__ = ["Action", "Reason", "REASONS", "Decision", "Tally", "tally", "decisions",
           "clear_decisions", "COUNTER", "LOG_SIZE"]

COUNTER = "convbn_pass"  # torch._dynamo.utils.counters[COUNTER][key]
LOG_SIZE = 10_000        # decisions kept by decisions(); older ones are dropped


class _Key(str, enum.Enum):
    """A stable string key: compares, prints and serialises as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Action(_Key):
    TUNE = "tune"                          # rewritten; W′ rebuilt in backward
    TUNE_KEEP_WEIGHT = "tune_keep_weight"  # rewritten; W′ saved for backward
    SKIP = "skip"                          # left as it is: the block stays in Eval mode

    @property
    def tuned(self) -> bool:
        return self is not Action.SKIP


class Reason(_Key):
    TUNED = "tuned"
    BN_TRAINING = "bn_training"
    INPUT_STATS = "input_stats"
    TRAINING_NOT_CONSTANT = "training_not_constant"
    NO_RUNNING_STATS = "no_running_stats"
    CONV_MULTI_USER = "conv_multi_user"
    BN_EXTRA_OUTPUTS = "bn_extra_outputs"
    LINEAR_AXIS = "linear_axis"
    SHAPE_UNKNOWN = "shape_unknown"
    CHANNEL_MISMATCH = "channel_mismatch"
    CUSTOM_FORWARD = "custom_forward"
    OUTPUT_SIZE = "output_size"
    MODULE_CALL_ARGS = "module_call_args"
    SPLIT_GRAPH = "split_graph"
    POLICY_EVAL = "policy_eval"
    MODULE_REUSED = "module_reused"
    NOT_MODULE = "not_module"
    NOT_TRACED = "not_traced"

    @property
    def sentence(self) -> str:
        return _SENTENCES[self]


_SENTENCES: dict[Reason, str] = {
    Reason.TUNED: "rewritten in Tune mode",
    Reason.BN_TRAINING: "BatchNorm runs in training mode (batch statistics)",
    Reason.INPUT_STATS: "InstanceNorm normalises each sample by its own statistics "
    "(use_input_stats: its default, training mode, or track_running_stats=False)",
    Reason.TRAINING_NOT_CONSTANT: "the norm's statistics flag (BatchNorm's training, "
    "InstanceNorm's use_input_stats) is not a constant in the graph",
    Reason.NO_RUNNING_STATS: "the BatchNorm or InstanceNorm has no running statistics",
    Reason.CONV_MULTI_USER: "the conv output has users other than the BatchNorm",
    Reason.BN_EXTRA_OUTPUTS: "the BatchNorm's saved mean/invstd outputs are used",
    Reason.LINEAR_AXIS: "linear acts on the last axis but BatchNorm1d normalises axis 1 "
    "of a 3-D input",
    Reason.SHAPE_UNKNOWN: "shapes are not recorded in the graph",
    Reason.CHANNEL_MISMATCH: "conv output channels differ from BatchNorm's",
    Reason.CUSTOM_FORWARD: "a module subclass overrides forward",
    Reason.OUTPUT_SIZE: "ConvTranspose called with output_size",
    Reason.MODULE_CALL_ARGS: "the conv/linear module is called with arguments its forward "
    "does not take",
    Reason.SPLIT_GRAPH: "the conv is in another graph: DDP's bucket split (or a graph break) "
    "separates it from its BatchNorm",
    Reason.POLICY_EVAL: "the policy keeps this block in Eval mode",
    # Reasons of convbn_pass.tune alone, which replaces modules' forwards rather
    # than rewriting a graph.
    Reason.MODULE_REUSED: "the conv or its BatchNorm module is called more than once in "
    "the forward",
    Reason.NOT_MODULE: "the conv or its BatchNorm is not a module call that tune can "
    "replace (a functional call, or a normalisation module tune does not know)",
    Reason.NOT_TRACED: "the pair runs in code Dynamo never traces (a frame it skips), so "
    "who else reads the conv output is unknown",
}

# The reasons a block is left alone, keyed by their stable string (the counters'
# ``skipped_<key>``), with the sentence each stands for.
REASONS: dict[str, str] = {r.value: r.sentence for r in Reason if r is not Reason.TUNED}


@dataclasses.dataclass(frozen=True)
class Decision:
    graph: int                  # which graph of this process the pass ran on (1, 2, …)
    conv: str                   # module path of the conv/linear ("layer1.0.conv1") or node name
    bn: str                     # module path of the BatchNorm
    op: str                     # "conv2d", "conv_transpose2d", "linear", …
    action: Action
    reason: Reason              # Reason.TUNED, or why the block was left alone
    detail: str                 # one sentence for people
    weight_numel: int | None    # elements of the conv weight
    activation_numel: int | None  # elements of the conv output, for the traced batch
    norm: str = "batch_norm"    # the normalisation's form: "batch_norm", "instance_norm", "affine"
    compile_id: str | None = None  # Dynamo's "frame/compile[_attempt]" ("0/0", "0/0_1"), if any

    @property
    def tuned(self) -> bool:
        return self.action.tuned

    @property
    def counter_key(self) -> str:
        return "tuned" if self.tuned else f"skipped_{self.reason}"


class Decided(Protocol):
    """Anything that records one decision: a :class:`Decision`, or a row made from one."""

    @property
    def action(self) -> Action: ...

    @property
    def reason(self) -> Reason: ...


@dataclasses.dataclass(frozen=True)
class Tally:
    """A set of decisions counted: what ``inspect``'s totals, the benchmarks and the
    zoo tests report, from this one function (:func:`tally`)."""

    candidates: int                   # decisions counted: one per candidate pair
    tuned: int                        # rewritten, either way
    tuned_keep_weight: int            # of ``tuned``, those keeping W′ for backward
    skipped: int                      # left in Eval mode: candidates - tuned
    skipped_by_reason: dict[str, int]  # the skipped by reason key (``REASONS``), key order


def tally(decided: Iterable[Decided]) -> Tally:
    """Count decisions (:class:`Decision` or any record with ``action`` and
    ``reason``), e.g. ``tally(d for r in rewrites for d in r.decisions)``."""
    rows = list(decided)
    skipped = collections.Counter(str(d.reason) for d in rows if not d.action.tuned)
    return Tally(len(rows), sum(d.action.tuned for d in rows),
                 sum(d.action is Action.TUNE_KEEP_WEIGHT for d in rows),
                 sum(skipped.values()), dict(sorted(skipped.items())))


_lock = threading.Lock()
_log: collections.deque[Decision] = collections.deque(maxlen=LOG_SIZE)
_graph_ids = itertools.count(1)


def current_compile_id() -> tuple[str | None, int]:
    """Dynamo's ``frame/compile`` id of the compile in progress and its attempt
    (a restarted compile runs the pass once per attempt), or (None, 0) outside one."""
    from torch._guards import CompileContext
    trace_id = CompileContext.current_trace_id()
    if trace_id is None:
        return None, 0
    return str(trace_id.compile_id), int(trace_id.attempt)


def compile_label(compile_id: str | None, attempt: int) -> str | None:
    """``0/0`` for a first attempt, ``0/0_1`` for the next: as Dynamo prints them."""
    if compile_id is None:
        return None
    return compile_id if attempt == 0 else f"{compile_id}_{attempt}"


def next_graph_id() -> int:
    with _lock:
        return next(_graph_ids)


def record(decision: Decision) -> None:
    with _lock:
        _log.append(decision)
    counters[COUNTER][decision.counter_key] += 1
    if decision.action is Action.TUNE_KEEP_WEIGHT:
        counters[COUNTER]["tuned_keep_weight"] += 1


def decisions() -> list[Decision]:
    """The latest decisions of this process (at most :data:`LOG_SIZE`), since the
    last :func:`clear_decisions`. For the decisions of one compile, pass
    ``on_graph`` to :class:`convbn_pass.ConvBNPass` instead."""
    with _lock:
        return list(_log)


def clear_decisions() -> None:
    """Forget the recorded decisions and reset the ``convbn_pass`` counters."""
    with _lock:
        _log.clear()
    counters.pop(COUNTER, None)
