"""Decision records: one per candidate block, kept for the CLI and counted.

Every candidate the pass sees ends as one :class:`Decision`. The same records
feed ``torch._dynamo.utils.counters["convbn_pass"]`` (one key per outcome), the
``inspect`` CLI and the tests, so what is printed is what the compiler did.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

from torch._dynamo.utils import counters

__all__ = ["Decision", "decisions", "clear_decisions", "COUNTER"]

COUNTER = "convbn_pass"  # torch._dynamo.utils.counters[COUNTER][key]


@dataclasses.dataclass(frozen=True)
class Decision:
    graph: int                  # which graph of this process the pass ran on (1, 2, …)
    conv: str                   # module path of the conv/linear ("layer1.0.conv1") or node name
    bn: str                     # module path of the BatchNorm
    op: str                     # "conv2d", "conv_transpose2d", "linear", …
    action: str                 # "tune", "tune_keep_weight", or "skip"
    reason: str                 # stable key: "tuned" or a key of match.REASONS
    detail: str                 # one sentence for people
    weight_numel: int | None    # elements of the conv weight
    activation_numel: int | None  # elements of the conv output, for the traced batch
    norm: str = "batch_norm"    # what follows the conv: "batch_norm", or "affine" (frozen BN)
    compile_id: str | None = None  # Dynamo's "frame/compile[_attempt]" ("0/0", "0/0_1"), if any

    @property
    def tuned(self) -> bool:
        return self.action != "skip"

    @property
    def counter_key(self) -> str:
        return "tuned" if self.tuned else f"skipped_{self.reason}"


_lock = threading.Lock()
_log: list[Decision] = []
_graph_ids = itertools.count(1)


def current_compile_id() -> str | None:
    """Dynamo's id of the compile in progress (attempt included), or None outside one.

    A compile that Dynamo restarts runs the pass once per attempt; the records of
    an abandoned attempt share the frame/compile with the final one and differ in
    the attempt suffix.
    """
    from torch._guards import CompileContext
    trace_id = CompileContext.current_trace_id()
    return None if trace_id is None else str(trace_id)


def next_graph_id() -> int:
    with _lock:
        return next(_graph_ids)


def record(decision: Decision) -> None:
    with _lock:
        _log.append(decision)
    counters[COUNTER][decision.counter_key] += 1
    if decision.action == "tune_keep_weight":
        counters[COUNTER]["tuned_keep_weight"] += 1


def decisions() -> list[Decision]:
    """All decisions recorded in this process since the last :func:`clear_decisions`."""
    with _lock:
        return list(_log)


def clear_decisions() -> None:
    """Forget the recorded decisions and reset the ``convbn_pass`` counters."""
    with _lock:
        _log.clear()
    counters.pop(COUNTER, None)
