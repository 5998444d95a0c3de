"""The benchmark's results as typed records.

The harness makes them, run.py holds them and writes them to ``results.json``
(:func:`to_json`: ``dataclasses.asdict`` without the fields nothing was measured
for), and report.py reads them back with one ``from_json`` per record. Reading
tolerates older and newer files: keys a record does not know are dropped, keys
a file lacks take the field's default (older files hold fields since dropped:
every timed step, per-round means, the CUDA peak without the baseline).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RssResult", "SavedDecision", "ModeResult", "CellResult", "BlockResult",
           "LightCell", "RunResult", "to_json"]


def to_json(record: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of ``record``, fields that are None left out."""
    return dataclasses.asdict(
        record, dict_factory=lambda items: {k: v for k, v in items if v is not None})


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that are fields of ``cls`` (a null takes the default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names and v is not None}


class _Record:
    """``from_json``: the known fields of ``data``, a cell's ``modes`` as records."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        fields = _known(cls, data)
        if "modes" in fields:  # keyed by mode name, which a mode's own ``mode`` repeats
            fields["modes"] = {name: ModeResult.from_json({"mode": name, **r})
                               for name, r in fields["modes"].items()}
        return cls(**fields)


@dataclasses.dataclass
class RssResult(_Record):
    """One mode compiled and stepped in a fresh process (CPU, ``--peak-rss``)."""

    first_s: float | None = None             # wall seconds of the cold first call
    first_cpu_s: float | None = None         # CPU seconds of it, C++ compiler included
    process_peak_bytes: int | None = None    # the process's peak RSS, compile included
    before_step_bytes: int | None = None     # RSS before the measured warm step
    step_peak_bytes: int | None = None       # peak RSS of that step above before_step_bytes
    error: str | None = None                 # why the worker gave no figures


@dataclasses.dataclass
class SavedDecision(_Record):
    """convbn_pass's decision on one Conv→BN pair (a ``convbn_pass.Decision``), as results.json
    saves it."""

    conv: str                                # module path of the conv ("layer1.0.conv1")
    bn: str                                  # module path of its BatchNorm
    op: str                                  # "conv2d", "linear", …
    action: str                              # "tune", "tune_keep_weight" or "skip"
    reason: str                              # "tuned", or why the pair was left alone
    weight_numel: int | None = None          # elements of the conv weight
    activation_numel: int | None = None      # elements of the conv output


@dataclasses.dataclass
class ModeResult(_Record):
    """One mode of one cell, block or light-backend cell. None: not measured there."""

    mode: str                                # the mode's name (harness.MODES)
    first_s: float | None = None             # wall seconds of the first step: the compile
    first_cpu_s: float | None = None         # CPU seconds of it (process + reaped children)
    new_graphs: int | None = None            # graphs Dynamo compiled for it (0: reused)
    candidates: int | None = None            # Conv→BN pairs convbn_pass decided on
    tuned: int | None = None                 # pairs convbn_pass tuned, from its on_graph
    tuned_keep_weight: int | None = None     # of those, pairs that keep W′ for backward
    skipped: dict[str, int] | None = None    # pairs convbn_pass left in Eval mode, by reason
    builtin_rewrites: int | None = None      # counters["inductor"]["efficient_conv_bn_eval"]
    blocks: list[SavedDecision] | None = None  # convbn_pass's decisions, modes with the pass
    saved_bytes: int | None = None           # activation bytes saved for backward (exact)
    weight_shaped_bytes: int | None = None   # of those, tensors shaped like a model weight
    recompiled_while_measuring: int | None = None  # graphs compiled while measuring bytes
    peak_bytes: int | None = None            # CUDA: allocator peak of a step above before
    checks: list[str] = dataclasses.field(default_factory=list)  # problems, as sentences
    rounds: int | None = None                # round-robin rounds timed
    steps_per_round: int | None = None       # timed steps per round
    median_s: float | None = None            # median step time
    q1_s: float | None = None                # its first quartile
    q3_s: float | None = None                # its third quartile
    ratio: float | None = None               # median per-round time ratio to `compile`
    ratio_q1: float | None = None            # its first quartile
    ratio_q3: float | None = None            # its third quartile
    compile_s: float | None = None           # first_s minus the median step
    rss: RssResult | None = None             # the fresh-process figures, where measured

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModeResult:
        fields = _known(cls, data)
        if fields.get("blocks") is not None:
            fields["blocks"] = [SavedDecision.from_json(b) for b in fields["blocks"]]
        if fields.get("rss") is not None:
            fields["rss"] = RssResult.from_json(fields["rss"])
        return cls(**fields)


@dataclasses.dataclass
class CellResult(_Record):
    """Every mode of one model at one batch (and image) size, Inductor backend."""

    model: str                               # zoo name, torchvision:NAME, timm:NAME, …
    batch: int                               # batch size
    input_shape: list[int] | None = None     # the batch's shape
    device: str | None = None                # "cpu", "cuda"
    params: int | None = None                # parameters of the model
    modes: dict[str, ModeResult] = dataclasses.field(default_factory=dict)  # by mode name
    skipped_modes: list[str] = dataclasses.field(default_factory=list)  # time budget
    mode_errors: dict[str, str] = dataclasses.field(default_factory=dict)  # mode: failure
    max_first_s: float | None = None         # the longest first call: the next estimate
    pairs: int | None = None                 # Conv→BN pairs the pass decided on
    notes: list[str] = dataclasses.field(default_factory=list)  # cell-wide problems
    error: str | None = None                 # why the cell has no results
    rss_only: bool = False                   # made by --peak-rss alone (no in-process run)


@dataclasses.dataclass
class BlockResult(CellResult):
    """One distinct Conv→BN→activation block of a model, measured alone (blocks.py)."""

    px: int = 0                              # image side the model ran at
    block: str = ""                          # "conv 3x3 64->64 +ReLU"
    count: int = 1                           # how often the model has this block
    paths: list[str] = dataclasses.field(default_factory=list)  # its convs' module paths
    weight_numel: int = 0                    # elements of the conv weight
    activation_numel: int = 0                # elements of the conv output
    positions: int = 0                       # output positions N·H·W (MACs per weight element)
    act_over_weight: float = 0.0             # activation_numel / weight_numel
    auto_action: str | None = None           # the auto policy's action on it in the whole model


@dataclasses.dataclass
class LightCell(_Record):
    """Saved bytes of every mode of one cell through the light backend (no Inductor)."""

    model: str                               # as in CellResult
    batch: int                               # batch size
    input_shape: list[int] | None = None     # the batch's shape
    device: str | None = None                # "cpu", "cuda"
    backend: str = "light"                   # convbn_pass.backends.light
    modes: dict[str, ModeResult] = dataclasses.field(default_factory=dict)  # by mode name


@dataclasses.dataclass
class RunResult(_Record):
    """One run of ``python -m benchmarks.run``: results.json."""

    preset: str | None = None                # preset name or "custom"
    about: str | None = None                 # the preset's one line
    command: str | None = None               # the command line
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # run.Preset's fields
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # versions, machine
    modes_about: dict[str, str] = dataclasses.field(default_factory=dict)  # mode: one line
    started: str | None = None               # ISO time
    finished: str | None = None              # ISO time; None: interrupted
    elapsed_s: float | None = None           # wall seconds of the run
    cells: list[CellResult] = dataclasses.field(default_factory=list)    # Inductor grid
    light: list[LightCell] = dataclasses.field(default_factory=list)     # light sweep
    blocks: list[BlockResult] = dataclasses.field(default_factory=list)  # block study
    skipped: list[str] = dataclasses.field(default_factory=list)  # what was left out, and why

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        fields = _known(cls, data)
        for key, record in (("cells", CellResult), ("light", LightCell), ("blocks", BlockResult)):
            fields[key] = [record.from_json(c) for c in data.get(key, [])]
        return cls(**fields)
