"""``python -m benchmarks.run``: the benchmark grid, the light sweep, the block study.

::

    python -m benchmarks.run --quick                 # a few minutes on 2 CPU cores
    python -m benchmarks.run --preset cpu            # the CPU grid (about 50 minutes)
    python -m benchmarks.run --preset gpu            # one GPU, under 8 minutes (gpu.sh)
    python -m benchmarks.run --models resnet18 torchvision:resnet50 --batches 1 8 --px 96
    python -m benchmarks.run --report-only benchmarks/results/quick   # tables and plots again

Results go to ``benchmarks/results/<preset>/``: ``results.json`` (everything,
rewritten after every cell, so an interrupted run keeps what it measured),
``results.csv``, ``results.md``, PNG figures and ``command.txt``. Progress goes
to stderr. See benchmarks/README.md for how to read them; ``records.py`` for
what ``results.json`` holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import shlex
import sys
from typing import Any, Iterator, Sequence

import torch

from convbn_pass import models, zoo
from convbn_pass.core import compat

from . import harness, report
from .records import CellResult, ModeResult, RssResult, RunResult, to_json

__all__ = ["main", "PRESETS", "Preset", "raise_recompile_limits"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

Cell = tuple[str, int, int]  # (model, batch, image side)


@dataclasses.dataclass(frozen=True)
class Preset:
    about: str
    cells: tuple[Cell, ...] = ()        # Inductor grid, in priority order
    light: tuple[Cell, ...] = ()        # light-backend saved-bytes sweep
    blocks: tuple[Cell, ...] = ()       # single-block study
    peak_rss: tuple[Cell, ...] = ()     # fresh-process peak RSS (CPU)
    device: str = "cpu"
    threads: int | None = None          # torch threads; None: torch's default
    # Inductor's compile_threads; 1 compiles in-process, so that the C++ compiler's CPU
    # time is counted as this process's children (first_cpu_s). None: Inductor's default.
    compile_threads: int | None = None
    modes: tuple[str, ...] = ()         # default: harness.DEFAULT_MODES
    budget: float | None = None         # seconds for the whole run
    warmup: int = 2
    rounds: int = 6
    steps: int = 2
    time_per_cell: float = 60.0
    min_round_s: float = 0.05           # per mode per round, at least (more steps if short)
    fresh_kernel_cache: bool = True


def _cross(models: Sequence[str], batches: Sequence[int], px: int) -> tuple[Cell, ...]:
    return tuple((m, b, px) for m in models for b in batches)


ZOO = ("resnet18", "resnet50", "mobilenet_v2", "resnext50", "unet", "mlp_bn",
       "efficientnet_lite")

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "ResNet-18 at batch 1 and 8 (64 px) and the Linear-BN MLP: a few minutes on 2 cores",
        cells=(("resnet18", 1, 64), ("resnet18", 8, 64), ("mlp_bn", 8, 0), ("mlp_bn", 64, 0)),
        threads=1, compile_threads=1, rounds=5, steps=2, time_per_cell=30.0,
        fresh_kernel_cache=False),
    "cpu": Preset(
        "The CPU grid: every zoo model, ReLU and SiLU nets, batch 1 to 64, ~50 min on 2 cores",
        cells=(("resnet18", 8, 96), ("mlp_bn", 1, 0), ("mlp_bn", 64, 0),
               ("efficientnet_lite", 8, 96), ("resnet50", 8, 96), ("resnet18", 1, 96),
               ("mobilenet_v2", 8, 96), ("unet", 4, 96), ("resnet18", 32, 96),
               ("resnext50", 8, 64), ("resnet50", 1, 96), ("resnet18", 64, 96)),
        modes=tuple(harness.MODES),
        threads=1, compile_threads=1, rounds=6, steps=2, time_per_cell=45.0, budget=3300.0),
    "cpu-rss": Preset(
        "Peak RSS and cold compile time (wall and CPU seconds), one fresh process per "
        "mode, no order effects: the fair compile-time comparison on CPU",
        peak_rss=(("resnet18", 8, 96), ("mlp_bn", 64, 0), ("resnet50", 8, 96),
                  ("efficientnet_lite", 8, 96)),
        modes=tuple(harness.MODES),
        threads=1, compile_threads=1, budget=2400.0),
    "sweep": Preset(
        "Activation bytes only, light backend (no Inductor): every zoo model, batch 1-64",
        light=tuple((m, b, 96) for m in ZOO for b in (1, 4, 16, 64)),
        threads=1, budget=2400.0),
    "blocks": Preset(
        "Single Conv-BN-ReLU blocks, Tune vs Eval, for the auto policy's threshold",
        blocks=(("resnet18", 8, 96), ("resnet18", 1, 96), ("resnet50", 8, 96),
                ("mobilenet_v2", 8, 96)),
        threads=1, compile_threads=1, rounds=20, steps=3, time_per_cell=15.0,
        min_round_s=0.15, fresh_kernel_cache=False,
        budget=2400.0),
    "gpu": Preset(
        "One GPU, torchvision/timm models at 224 px, in 200 s (gpu.sh's first step of "
        "its 8 minutes)",
        cells=(("torchvision:resnet50", 64, 224), ("torchvision:resnet18", 32, 224),
               ("timm:efficientnet_b0", 32, 224), ("torchvision:resnet50", 32, 224),
               ("torchvision:resnet18", 1, 224), ("torchvision:mobilenet_v2", 32, 224),
               ("unet", 8, 224), ("torchvision:resnet50", 8, 224),
               # stand-ins where torchvision / timm do not import
               ("resnet18", 32, 224), ("resnet50", 32, 224), ("efficientnet_lite", 32, 224)),
        device="cuda", rounds=10, steps=5, time_per_cell=15.0, budget=200.0,
        fresh_kernel_cache=False),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a prepared grid (see README)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--models", nargs="+", help="zoo names, torchvision:NAME or timm:NAME "
                   "(with --batches: replaces the preset's grid)")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes")
    p.add_argument("--px", type=int, default=96, help="image side for --models (default 96)")
    p.add_argument("--modes", nargs="+", help=f"modes (default {', '.join(harness.DEFAULT_MODES)}): "
                   f"{', '.join(harness.MODES)}")
    p.add_argument("--device", help="cpu or cuda (default: the preset's, else cpu)")
    p.add_argument("--threads", type=int, help="torch threads (CPU)")
    p.add_argument("--budget", type=float, help="seconds for the whole run; cells and modes "
                   "that would pass it are skipped and the results still written")
    p.add_argument("--rounds", type=int, help="round-robin timing rounds per cell")
    p.add_argument("--steps", type=int, help="timed steps per mode per round")
    p.add_argument("--time-per-cell", type=float, help="seconds of timing per cell, at most")
    p.add_argument("--shared-kernel-cache", action="store_true",
                   help="let compiles share Inductor's kernel cache (faster; compile times "
                   "then depend on the order)")
    p.add_argument("--light", action="store_true", help="measure the --models/--batches cells "
                   "with the light backend (saved bytes only, no Inductor)")
    p.add_argument("--blocks", action="store_true", help="run the single-block study on the "
                   "--models/--batches cells")
    p.add_argument("--peak-rss", action="store_true", help="also measure each mode's peak RSS "
                   "in a fresh process (CPU; one more compile per mode)")
    p.add_argument("--out", type=pathlib.Path, help="output folder (default "
                   "benchmarks/results/<preset or custom>)")
    p.add_argument("--report-only", type=pathlib.Path, metavar="DIR",
                   help="rewrite tables and plots from DIR/results.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a fresh process for --peak-rss
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _resolve(args: argparse.Namespace) -> tuple[str, Preset]:
    name = "quick" if args.quick else args.preset
    preset = PRESETS[name] if name else Preset("custom")
    changes: dict[str, Any] = {}
    if args.models or args.batches:
        if not (args.models and args.batches):
            raise ValueError("--models and --batches go together")
        cells = _cross(args.models, args.batches, args.px)
        kind = "light" if args.light else "blocks" if args.blocks else "cells"
        changes.update(cells=(), light=(), blocks=(), peak_rss=())
        changes[kind] = cells
        if args.peak_rss:
            changes["peak_rss"] = cells
        name = name or "custom"
    elif args.light or args.blocks:
        raise ValueError("--light and --blocks need --models and --batches")
    elif args.peak_rss:
        changes["peak_rss"] = preset.cells
    for field in ("device", "threads", "budget", "rounds", "steps", "time_per_cell"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.modes:
        changes["modes"] = tuple(args.modes)
    if args.shared_kernel_cache:
        changes["fresh_kernel_cache"] = False
    if not name:
        raise ValueError("say what to run: --quick, --preset NAME, or --models and --batches")
    preset = dataclasses.replace(preset, **changes)
    for model, _, _ in preset.cells + preset.light + preset.blocks + preset.peak_rss:
        if ":" not in model and model not in zoo.MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(zoo.MODELS)}, "
                             "torchvision:NAME or timm:NAME")
    return name, preset


def _settings(preset: Preset, px: int) -> harness.Settings:
    """The harness settings of this preset's cells at image side ``px``."""
    shared = {f.name: getattr(preset, f.name) for f in dataclasses.fields(harness.Settings)
              if hasattr(preset, f.name)}
    return harness.Settings(**shared, px=px)


def _save(results: RunResult, out: pathlib.Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(to_json(results), indent=1, default=str))
    tmp.replace(out / "results.json")


def _cells(cells: Sequence[Cell], kind: str,
           budget: harness.Budget) -> Iterator[tuple[str, str, int, int]]:
    """``(what, model, batch, px)`` of each cell, after logging its progress line."""
    for i, (model, batch, px) in enumerate(cells, 1):
        what = f"{kind}{model} batch {batch}" + (f" at {px} px" if px else "")
        left = "" if budget.deadline is None else f", {budget.left():.0f} s of budget left"
        _log(f"[{i}/{len(cells)}] {what} ({budget.elapsed():.0f} s elapsed{left})")
        yield what, model, batch, px


def _unavailable(results: RunResult, what: str, model: str, exc: Exception) -> None:
    results.skipped.append(f"{what}: {exc}")
    _log(f"    skipped {model}: {exc}")


def _run_grid(preset: Preset, modes: list[harness.Mode], results: RunResult,
              out: pathlib.Path, budget: harness.Budget) -> None:
    estimates: dict[str, float] = {}
    for what, model, batch, px in _cells(preset.cells, "", budget):
        estimate = estimates.get(model, max(estimates.values(), default=0.0))
        try:
            models.check_available(model)  # before the budget check: a clearer reason
            if not budget.allows(estimate + 20):
                results.skipped.append(f"{what}: time budget ({budget.left():.0f} s left)")
                _log("    skipped: time budget")
                continue
            cell = harness.measure_cell(model, batch, _settings(preset, px), modes, budget, _log,
                                        estimate)
        except models.Unavailable as exc:
            _unavailable(results, what, model, exc)
            continue
        except Exception as exc:  # keep going: the run may be unattended
            results.skipped.append(f"{what}: failed, {type(exc).__name__}: {exc}")
            _log(f"    FAILED: {type(exc).__name__}: {exc}")
            torch._dynamo.reset()
            continue
        estimates[model] = max(estimates.get(model, 0.0), cell.max_first_s or 0.0)
        if cell.skipped_modes:
            results.skipped.append(f"{what}: modes {', '.join(cell.skipped_modes)} "
                                   "(time budget)")
        if cell.error is not None:
            results.skipped.append(f"{what}: {cell.error}")
        else:
            results.cells.append(cell)
            _summary(cell)
        _save(results, out)


def _summary(cell: CellResult) -> None:
    parts = []
    for name, r in cell.modes.items():
        if not harness.MODES[name].noise and r.saved_bytes is not None:
            ratio = float("nan") if r.ratio is None else r.ratio
            parts.append(f"{name} {r.saved_bytes / 1e6:.1f} MB x{ratio:.2f}")
    _log("    " + ", ".join(parts) + f"; noise ±{report.noise(cell) or float('nan'):.3f}")


def _run_peak_rss(preset: Preset, modes: list[harness.Mode], results: RunResult,
                  out: pathlib.Path, budget: harness.Budget) -> None:
    if preset.device != "cpu":
        if preset.peak_rss:
            _log("peak RSS is a CPU measurement; on CUDA every cell has the allocator peak")
        return
    for what, model, batch, px in _cells(preset.peak_rss, "peak RSS: ", budget):
        cell = next((c for c in results.cells if (c.model, c.batch) == (model, batch)
                     and (not px or (c.input_shape or [0])[-1] == px)), None)
        if cell is None:
            cell = CellResult(model, batch, rss_only=True)
            results.cells.append(cell)
        estimate = cell.max_first_s or 0.0
        for mode in modes:
            if mode.twin:
                continue  # the same compiled code as the baseline
            if not budget.allows(1.2 * estimate + 20):
                results.skipped.append(f"{what}, {mode.name}: time budget")
                continue
            rss = _spawn_worker(model, batch, px, mode.name, preset, budget)
            estimate = max(estimate, rss.first_s or 0.0)
            cell.modes.setdefault(mode.name, ModeResult(mode.name)).rss = rss
            if rss.error is not None:
                _log(f"    {mode.name:<17} failed: {rss.error}")
            else:
                _log(f"    {mode.name:<17} cold first call {rss.first_s:.1f} s "
                     f"({rss.first_cpu_s:.1f} CPU s), step peak "
                     f"{(rss.step_peak_bytes or 0) / 1e6:.1f} MB, process peak "
                     f"{(rss.process_peak_bytes or 0) / 1e6:.0f} MB")
            _save(results, out)


def _spawn_worker(model: str, batch: int, px: int, mode: str, preset: Preset,
                  budget: harness.Budget) -> RssResult:
    spec = {"model": model, "batch": batch, "px": px, "mode": mode, "threads": preset.threads}
    env = dict(harness.RSS_ENV)
    if preset.compile_threads:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(preset.compile_threads)
    timeout = None if budget.deadline is None else max(60.0, budget.left())
    return RssResult.from_json(harness.spawn("benchmarks.run", spec, env, timeout).result)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    settings = harness.Settings(px=spec["px"])
    return to_json(harness.peak_rss_worker(spec["model"], spec["batch"], spec["mode"], settings))


def _run_light(preset: Preset, modes: list[harness.Mode], results: RunResult,
               out: pathlib.Path, budget: harness.Budget) -> None:
    for what, model, batch, px in _cells(preset.light, "light: ", budget):
        if budget.left() <= 0:
            results.skipped.append(f"{what}: time budget")
            continue
        try:
            cell = harness.light_cell(model, batch, px, modes, preset.device)
        except models.Unavailable as exc:
            _unavailable(results, what, model, exc)
            continue
        results.light.append(cell)
        _log("    " + ", ".join(f"{m} {(r.saved_bytes or 0) / 1e6:.2f} MB"
                                for m, r in cell.modes.items()))
        _save(results, out)


def _run_blocks(preset: Preset, results: RunResult, out: pathlib.Path,
                budget: harness.Budget) -> None:
    from . import blocks
    for _, model, batch, px in _cells(preset.blocks, "blocks: ", budget):
        found = blocks.measure_blocks(model, batch, _settings(preset, px), budget, _log)
        results.blocks += found
        for b in found:
            tune = b.modes.get("pass_memory")
            ratio = float("nan") if tune is None or tune.ratio is None else tune.ratio
            _log(f"    {b.block}: act/weight {b.act_over_weight:.2f}, "
                 f"Tune/Eval {ratio:.3f}, noise ±{report.noise(b) or 0:.3f}")
        _save(results, out)


def raise_recompile_limits() -> None:
    """Every mode of a cell is a distinct backend for the same code objects, and
    each is a Dynamo cache entry: raise the limits (named per torch by compat)."""
    for name, value in compat.recompile_limits(64, 4096).items():
        setattr(torch._dynamo.config, name, value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.worker:
        return harness.worker_main(_worker, args.worker)
    if args.report_only:
        path = args.report_only / "results.json"
        if not path.exists():
            _log(f"error: {path} does not exist")
            return 2
        written = report.write_all(report.read(path), args.report_only)
        _log(f"wrote {', '.join(written)} in {args.report_only}")
        return 0
    try:
        name, preset = _resolve(args)
        modes = harness.modes_for(preset.modes or None)
    except ValueError as exc:
        _log(f"error: {exc}")
        return 2
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        _log(f"error: device {preset.device} asked for, but CUDA is not available here")
        return 2
    if preset.threads:
        torch.set_num_threads(preset.threads)
    if preset.compile_threads:
        torch._inductor.config.compile_threads = preset.compile_threads
    out = args.out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run " + shlex.join(argv)
    (out / "command.txt").write_text(command + "\n")
    results = RunResult(
        preset=name, about=preset.about, command=command,
        settings=dataclasses.asdict(preset), environment=harness.environment(),
        modes_about={m.name: m.about for m in modes},
        started=datetime.datetime.now().isoformat(timespec="seconds"))
    budget = harness.Budget(preset.budget)
    _log(f"{command}\n{preset.about}; results in {out}")
    raise_recompile_limits()
    if preset.cells or preset.blocks:
        harness.warm_up_compiler(preset.device, preset.fresh_kernel_cache, _log)
    _run_grid(preset, modes, results, out, budget)
    _run_peak_rss(preset, modes, results, out, budget)
    _run_light(preset, modes, results, out, budget)
    _run_blocks(preset, results, out, budget)
    results.finished = datetime.datetime.now().isoformat(timespec="seconds")
    results.elapsed_s = budget.elapsed()
    _save(results, out)
    written = report.write_all(results, out)
    _log(f"done in {budget.elapsed():.0f} s; wrote results.json, command.txt, "
         f"{', '.join(written)} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
