"""``python -m benchmarks.zoo_table``: the pass on real torchvision and timm models, one row each.

::

    python -m benchmarks.zoo_table                        # every model of the zoo tests
    python -m benchmarks.zoo_table --models resnet timm-dla34
    python -m benchmarks.zoo_table --list

Needs torchvision and timm (the environment ``.ci/zoo`` builds). Each model is
measured as the zoo tests measure it (``tests_zoo/zoo_models.py``, one
function for both): random weights and BatchNorm statistics, eval mode,
float64, one forward/backward eagerly and through ``convbn_pass.backends.light``
without the pass and under ``auto`` and ``memory``. The columns are :class:`Row`'s,
explained in the table's ``HEADER``.

Writes ``results.json`` (one record per model, and the versions),
``results.md`` and ``command.txt`` (the command as run) to ``--out`` (default
``benchmarks/results/zoo``), rewritten after every model, so an interrupted run
keeps what it measured. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import sys
import traceback
from typing import Any, Sequence

import torch

from convbn_pass.models import one_line
from tests_zoo import zoo_models

__all__ = ["main", "Row"]

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "zoo"


@dataclasses.dataclass
class Row:
    model: str
    about: str
    input: str
    graphs: int = 0
    pairs: int = 0            # conv → BN pairs counted without the pass in Dynamo's graphs
    tuned_auto: int = 0       # pairs the pass rewrote under each policy
    tuned_memory: int = 0
    bytes_none: int = 0       # activation bytes kept for backward (light backend)
    bytes_auto: int = 0
    bytes_memory: int = 0
    worst_error: float = 0.0  # output and gradients against eager float64, both policies
    # pairs left alone, by reason (the pass's stable reason strings, convbn_pass.REASONS)
    skips_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    skips_auto: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0      # three compiles and five steps, fresh process, start-up excluded
    error: str = ""           # a crash, in one line


def _skips(counter: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counter.items())) or "-"


def measure_row(case: zoo_models.Case) -> Row:
    """One model's row; a crash is recorded in ``error``, not raised."""
    row = Row(case.id, case.about, "x".join(map(str, case.input_shape)))
    try:
        zoo = zoo_models.measure_fresh(case, tune=False)  # a fresh process per model, as the tests do
    except Exception as exc:  # a crash is a result of the table
        row.error = one_line(exc)
        traceback.print_exc(file=sys.stderr)
        return row
    none, auto, memory = (zoo.runs[p] for p in (None, "auto", "memory"))
    row.graphs = memory.graphs
    row.pairs = len(memory.eligible)
    row.tuned_auto, row.tuned_memory = len(auto.tuned), len(memory.tuned)
    row.bytes_none, row.bytes_auto, row.bytes_memory = (
        none.saved_bytes, auto.saved_bytes, memory.saved_bytes)
    row.worst_error = max(max(r.errors.output, r.errors.gradient) for r in (auto, memory))
    row.skips_memory = dict(sorted(memory.skips.items()))
    row.skips_auto = dict(sorted(auto.skips.items()))
    row.seconds = zoo.seconds
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


HEADER = ("Light backend (the pass, then AOTAutograd, no code generation), float64, random "
          "weights and BatchNorm statistics, eval mode. pairs: conv → BN pairs counted without "
          "the pass in Dynamo's graphs; MB: activation bytes (10^6) kept for backward without "
          "the pass / under auto / under memory; worst error: outputs and every gradient "
          "against eager float64, relative to the model's largest output or gradient entry, "
          "over both policies; skips: pairs left in Eval mode, by reason; s: the whole "
          "measurement of the model.")


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        HEADER,
        "",
        "| model | exercises | input | pairs | tuned auto | tuned memory | "
        "MB none / auto / memory | worst error | skips memory | skips auto | s |",
        "|---|---|---|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.about} | {r.input} | | | | | | **{r.error}** | | |")
            continue
        lines.append(
            f"| {r.model} | {r.about} | {r.input} | {r.pairs} | {r.tuned_auto} | "
            f"{r.tuned_memory} | {_mb(r.bytes_none)} / {_mb(r.bytes_auto)} / "
            f"{_mb(r.bytes_memory)} | {r.worst_error:.1e} | {_skips(r.skips_memory)} | "
            f"{_skips(r.skips_auto)} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def command(argv: Sequence[str]) -> str:
    """The command line as run: interpreter, PYTHONPATH if set, arguments."""
    path = os.environ.get("PYTHONPATH")
    prefix = f"PYTHONPATH={shlex.quote(path)} " if path else ""
    return f"{prefix}{shlex.quote(sys.executable)} -m benchmarks.zoo_table {shlex.join(argv)}"


def versions() -> dict[str, Any]:
    import timm
    import torchvision

    import convbn_pass
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "convbn_pass": convbn_pass.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.system()}"}


def write(rows: Sequence[Row], out: pathlib.Path, argv: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    about = versions()
    results = {"command": command(argv), "versions": about,
               "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows))
    (out / "command.txt").write_text(
        command(argv) + "\n" + ", ".join(f"{k} {v}" for k, v in about.items()) + "\n")


def _select(patterns: Sequence[str] | None) -> list[zoo_models.Case]:
    if not patterns:
        return list(zoo_models.CASES)
    chosen = [c for c in zoo_models.CASES if any(p in c.id for p in patterns)]
    if not chosen:
        raise SystemExit(f"zoo_table: no model matches {' '.join(patterns)} (see --list)")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo_table",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", metavar="PATTERN",
                   help="model ids containing any of these (default: all)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"default {RESULTS}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--list", action="store_true", help="list the model ids and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{c.id}  ({c.about})" for c in zoo_models.CASES))
        return 0
    torch.set_num_threads(args.threads)
    cases = _select(args.models)
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.id} ...", file=sys.stderr, flush=True)
        row = measure_row(case)
        rows.append(row)
        print(f"    {row.error or f'{row.tuned_memory}/{row.pairs} tuned, {row.seconds:.0f} s'}",
              file=sys.stderr, flush=True)
        write(rows, args.out, argv)  # an interrupted run keeps what it measured
    print(markdown(rows), end="")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
