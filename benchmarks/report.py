"""Tables, targets and plots from the typed results of a run (``results.json``).

Everything here reads the measured results only; nothing is measured or
assumed. ``read(path)`` loads a ``results.json`` (older files too), and
``write_all(results, out_dir)`` writes ``results.md``, ``results.csv`` and the
PNG figures next to it. The tables show every mode a file holds, in the order of
the harness's mode table (``harness.MODES``; modes it does not know come last),
so a mode added there, such as a new policy of ``convbn_pass.POLICIES``, appears
in every table without another edit.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import convbn_pass

from .harness import MODES, modes_named
from .records import BlockResult, CellResult, LightCell, RunResult

__all__ = ["read", "targets", "markdown", "csv_rows", "write_all"]

MB = 1e6
FLOOR_TOLERANCE = 0.01   # memory policy: within 1% of Deploy mode
COMPILE_TOLERANCE = 0.10  # compile time with the pass: within 10% of without


Cell = CellResult | LightCell  # a grid cell, a single block or a light-backend cell


def read(path: pathlib.Path) -> RunResult:
    """A ``results.json``, as typed records."""
    return RunResult.from_json(json.loads(path.read_text()))


def _get(cell: Cell, mode: str, field: str) -> Any:
    """A figure of one mode of a cell; None where the mode or the figure is missing."""
    result = cell.modes.get(mode)
    return None if result is None else getattr(result, field)


def _rss(cell: Cell, mode: str, field: str) -> Any:
    """A fresh-process figure of one mode of a cell, or None."""
    return getattr(_get(cell, mode, "rss"), field, None)


def _fmt(value: float | None, digits: int = 1, per: float = 1.0) -> str:
    """``value / per``; "–" where there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value / per:.{digits}f}"


def _dash(value: Any) -> Any:
    return "–" if value is None else value


def _verdict(t: dict[str, Any], key: str, fmt: str) -> str:
    """Target ``key`` of ``t`` as ``✓ value`` (``✗`` missed, ``?`` undecided), the
    value formatted by ``fmt``; "–" where it was not judged."""
    if key not in t:
        return "–"
    *values, ok = t[key]
    return ("?" if ok is None else "✓" if ok else "✗") + " " + fmt.format(*values)


def noise(cell: Cell) -> float | None:
    """The time noise of a cell: how far the baseline's twin (same compiled code,
    second copy) lands from 1, or half the spread of its per-round ratios,
    whichever is larger."""
    twin = cell.modes.get("compile_twin")
    if twin is None or twin.ratio is None or twin.ratio_q1 is None or twin.ratio_q3 is None:
        return None
    return max(abs(twin.ratio - 1.0), (twin.ratio_q3 - twin.ratio_q1) / 2)


def targets(cell: CellResult) -> dict[str, Any]:
    """The policy targets of one cell, each as (value, holds) or None when a mode
    it needs is missing."""
    def got(mode: str, field: str) -> Any:
        return _get(cell, mode, field)

    out: dict[str, Any] = {}
    mem, floor = got("pass_memory", "saved_bytes"), got("deploy", "saved_bytes")
    if mem is not None and floor:
        excess = mem / floor - 1.0
        out["memory_floor"] = (excess, abs(excess) <= FLOOR_TOLERANCE)
    auto, base, builtin = (got("pass_auto", "saved_bytes"), got("compile", "saved_bytes"),
                           got("builtin", "saved_bytes"))
    if auto is not None and base is not None:
        out["auto_le_compile"] = (auto / base, auto <= base)
    if auto is not None and builtin is not None:
        out["auto_le_builtin"] = (auto / builtin, auto <= builtin)
    ratio, band = got("pass_auto", "ratio"), noise(cell)
    if ratio is not None and band is not None:
        out["auto_time"] = (ratio, band, ratio <= 1.0 + band)
    source, times = compile_times(cell)
    out["compile_source"] = source
    c_base = times.get("compile")
    if times.get("compile_again") is not None and c_base:
        out["compile_noise"] = times["compile_again"] / c_base - 1.0
    # A verdict only where the baseline was compiled twice and agreed with itself within
    # the tolerance; otherwise the ratio is shown undecided ("?").
    decidable = abs(out.get("compile_noise", float("inf"))) <= COMPILE_TOLERANCE
    for policy in convbn_pass.POLICIES:
        c_pass = times.get(f"pass_{policy}")
        if c_pass is not None and c_base:
            holds = c_pass <= (1 + COMPILE_TOLERANCE) * c_base
            out[f"compile_{policy}"] = (c_pass / c_base, holds if decidable else None)
    return out


def compile_times(cell: CellResult) -> tuple[str, dict[str, float]]:
    """The fairest compile times a cell has: CPU seconds of a cold first call in a fresh
    process per mode (``--peak-rss``), else the in-process first call's wall time."""
    fresh = {m: r.rss.first_cpu_s for m, r in cell.modes.items()
             if r.rss is not None and r.rss.first_cpu_s is not None}
    if "compile" in fresh:
        return "fresh process, CPU s", fresh
    return "in-process, wall s", {m: r.first_s for m, r in cell.modes.items()
                                  if r.first_s is not None}


def _auto_fails(t: dict[str, Any]) -> list[str]:
    return [key for key in ("auto_le_compile", "auto_le_builtin", "compile_auto", "auto_time")
            if key in t and t[key][-1] is False]


# --- tables -------------------------------------------------------------------------

def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _cell_id(cell: Cell) -> list[str]:
    shape = cell.input_shape or []
    size = f"{shape[-1]} px" if len(shape) == 4 else "–"
    return [cell.model, str(cell.batch), size]


def _noise(mode: str) -> bool:
    """Whether a mode measures noise only (the twin, the second baseline compile)."""
    return mode in MODES and MODES[mode].noise


def _present(cells: Sequence[Cell], field: str = "saved_bytes", noise: bool = True) -> list[str]:
    """The modes that have ``field`` in some cell, in table order (``noise``: with the
    noise-only modes)."""
    found = modes_named(m for c in cells for m in c.modes if _get(c, m, field) is not None)
    return [m for m in found if noise or not _noise(m)]


def _style(mode: str) -> dict[str, Any]:
    """A mode's line in the plots; modes that often coincide (memory = deploy,
    keep_weight = builtin) have different markers so that both stay visible."""
    return dict(MODES[mode].style) if mode in MODES else {}


def _targets_section(cells: list[CellResult], fresh: bool) -> list[str]:
    lines = ["## Targets", "",
             "- **memory floor**: `pass_memory` activation bytes within 1% of `deploy`.",
             "- **auto ≤ compile / ≤ builtin**: `pass_auto` activation bytes no higher than "
             "compile-without-pass and than PyTorch's built-in pass (value: auto / other).",
             "- **auto time**: median per-round time ratio of `pass_auto` to `compile` no "
             "higher than 1 + noise (noise: the baseline twin's distance from 1 or half "
             "its ratio IQR, whichever is larger).",
             f"- **compile**: first-call time of the pass modes within {COMPILE_TOLERANCE:.0%} of `compile`'s "
             "(ratio shown; `compile_again`, where run, is the baseline compiled twice: "
             "its excess is the compile noise). Taken from fresh processes (CPU seconds of "
             "a cold first call, no order effects) where `--peak-rss` measured the cell, "
             "else from the in-process first call's wall time: " + _cache_note(fresh)
             + " `?`: undecided, because the baseline compiled twice differed by more than "
             f"{COMPILE_TOLERANCE:.0%} (compile noise column).", ""]
    header = ["model", "batch", "size", "memory floor", "auto ≤ compile", "auto ≤ builtin",
              "auto time (noise)", *(f"compile {p}" for p in convbn_pass.POLICIES),
              "compile noise", "compile figures"]
    rows = []
    for cell in cells:
        t = targets(cell)
        rows.append(_cell_id(cell) + [
            _verdict(t, "memory_floor", "{:+.2%}"),
            _verdict(t, "auto_le_compile", "{:.3f}"), _verdict(t, "auto_le_builtin", "{:.3f}"),
            _verdict(t, "auto_time", "{:.3f} (±{:.3f})"),
            *(_verdict(t, f"compile_{p}", "{:.2f}") for p in convbn_pass.POLICIES),
            f"{t['compile_noise'] * 100:+.1f}%" if "compile_noise" in t else "–",
            t["compile_source"]])
    return lines + _table(header, rows)


def _memory_section(cells: list[CellResult]) -> list[str]:
    modes = _present(cells, noise=False)
    lines = ["## Activation memory saved for backward (MB)", "",
             "Exact (saved-tensor hooks, `convbn_pass.memory`): unique storages saved for "
             "backward, minus parameters, buffers and the input batch. Deterministic. "
             "`tuned` is `pass_auto`'s tuned blocks / all pairs.", ""]
    header = ["model", "batch", "size"] + modes + ["auto tuned"]
    rows = []
    for cell in cells:
        row = _cell_id(cell)
        row += [_fmt(_get(cell, m, "saved_bytes"), 2, MB) for m in modes]
        auto = cell.modes.get("pass_auto")
        row.append(f"{auto.tuned}/{cell.pairs}" if auto else "–")
        rows.append(row)
    return lines + _table(header, rows)


def _weight_section(cells: list[CellResult]) -> list[str]:
    modes = _present(cells, "weight_shaped_bytes", noise=False)
    if not modes:
        return []
    lines = ["### Of these, weight-shaped tensors (MB) / activations proper (MB)", "",
             "Saved tensors shaped like a model weight that are not the parameter itself: "
             "copies of weights (Inductor's layout optimisation saves a channels-last copy of "
             "each conv weight for backward) and W′ where a mode keeps it. The second figure "
             "is the rest: activations proper.", ""]
    rows = []
    for cell in cells:
        row = _cell_id(cell)
        for m in modes:
            w, saved = _get(cell, m, "weight_shaped_bytes"), _get(cell, m, "saved_bytes")
            row.append("–" if w is None else f"{w / MB:.2f} / {(saved - w) / MB:.2f}")
        rows.append(row)
    return lines + _table(["model", "batch", "size", *modes], rows)


def _time_section(cells: list[CellResult]) -> list[str]:
    modes = [m for m in _present(cells, "median_s") if m != "compile"]
    lines = ["## Step time (forward + backward, BN in eval mode)", "",
             "`compile ms`: the baseline's median step. Other columns: median of per-round "
             "time ratios to `compile` [first–third quartile]. Modes run interleaved, the "
             "order rotated every round. `compile_twin` runs the baseline's compiled code "
             "on a second copy: its ratio shows the noise. **Noisy** figures: the machine "
             "was shared with other jobs.", ""]
    header = ["model", "batch", "size", "compile ms", *modes, "rounds×steps"]
    rows = []
    for cell in cells:
        row = _cell_id(cell)
        base = cell.modes["compile"]
        row.append(_fmt(None if base.median_s is None else base.median_s * 1e3, 1))
        row += [_ratio(cell, m) for m in modes]
        steps = "?" if base.steps_per_round is None else base.steps_per_round
        row.append(f"{base.rounds or 0}×{steps}")
        rows.append(row)
    return lines + _table(header, rows)


def _ratio(cell: Cell, mode: str) -> str:
    """``median [q1–q3]`` of a mode's time ratio to ``compile``."""
    r = cell.modes.get(mode)
    if r is None or r.ratio is None:
        return "–"
    return f"{r.ratio:.3f} [{r.ratio_q1:.2f}–{r.ratio_q3:.2f}]"


def _cache_note(fresh: bool) -> str:
    if fresh:
        return ("Each compile used its own empty Inductor cache directory, so no mode "
                "reused kernels another mode built.")
    return ("**Compiles shared Inductor's kernel cache** (this run's settings): a mode "
            "compiled later reuses kernels built before it, so these times depend on the "
            "order and the compile target is not judged fairly here.")


def _compile_section(cells: list[CellResult], fresh: bool) -> list[str]:
    modes = [m for m in _present(cells, "first_s")
             if m not in MODES or (MODES[m].compiled and not MODES[m].twin)]
    lines = ["## First call (compile) time, s", "",
             "Wall time of the first training step: Dynamo, AOTAutograd and Inductor for "
             "forward and backward, plus one step. " + _cache_note(fresh)
             + " Noisy on a shared machine.", ""]
    header = ["model", "batch", "size", "figure", *modes]
    rows = []
    for cell in cells:
        for field, label in (("first_s", "wall s"), ("first_cpu_s", "CPU s")):
            if not _present([cell], field):
                continue
            rows.append(_cell_id(cell) + [label] + [_fmt(_get(cell, m, field), 1) for m in modes])
    return lines + _table(header, rows)


def _peak_section(cells: list[CellResult]) -> list[str]:
    cuda = [c for c in cells if _present([c], "peak_bytes")]
    rss = [c for c in cells if _present([c], "rss")]
    lines: list[str] = []
    if cuda:
        modes = _present(cuda, "peak_bytes", noise=False)
        lines += ["## Peak memory of a step, CUDA allocator (MB above what was allocated "
                  "before the step)", ""]
        rows = [_cell_id(c) + [_fmt(_get(c, m, "peak_bytes"), 1, MB) for m in modes]
                for c in cuda]
        lines += _table(["model", "batch", "size", *modes], rows)
    if rss:
        modes = _present(rss, "rss")
        lines += ["## Peak RSS, CPU, one fresh process per mode (MB)", "",
                  "`step`: peak RSS of one warm step above the RSS before it (glibc mmap "
                  "threshold 64 KiB so freed tensors leave the resident set). `process`: the "
                  "process's peak over its life, compile included. `cold first call`: the "
                  "first step in a fresh process with an empty cache (Inductor compiling "
                  "in-process, so the CPU seconds include the C++ compiler's).", ""]
        rows = []
        for c in rss:
            for field, label, scale in (("step_peak_bytes", "step", MB),
                                        ("process_peak_bytes", "process", MB),
                                        ("first_s", "cold first call, wall s", 1.0),
                                        ("first_cpu_s", "cold first call, CPU s", 1.0)):
                rows.append(_cell_id(c) + [label] + [_fmt(_rss(c, m, field), 1, scale)
                                                     for m in modes])
        lines += _table(["model", "batch", "size", "figure", *modes], rows)
    return lines


def _auto_section(cells: list[CellResult], blocks: list[BlockResult]) -> list[str]:
    """Where ``auto`` misses a target: its per-block choices there."""
    lines = ["## Where the auto policy misses a target", ""]
    failing = [(c, _auto_fails(targets(c))) for c in cells]
    failing = [(c, f) for c, f in failing if f]
    if not failing:
        return lines + ["No cell misses an auto target.", ""]
    timed = {(b.model, b.batch, b.px, p): b for b in blocks for p in b.paths}
    for cell, fails in failing:
        decisions = _get(cell, "pass_auto", "blocks") or []
        lines += [f"### {cell.model}, batch {cell.batch}: misses {', '.join(fails)}", ""]
        groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
        for d in decisions:
            groups[(d.op, d.weight_numel, d.activation_numel, d.action)].append(d.conv)
        rows = []
        for (op, w, a, action), convs in sorted(groups.items(), key=lambda kv: kv[0][2] / max(kv[0][1] or 1, 1)):
            shape = cell.input_shape or []
            px = shape[-1] if len(shape) == 4 else 0
            study = timed.get((cell.model, cell.batch, px, convs[0]))
            t_mem = _fmt(_get(study, "pass_memory", "ratio"), 3) if study else "–"
            t_keep = _fmt(_get(study, "pass_keep_weight", "ratio"), 3) if study else "–"
            rows.append([op, str(len(convs)), f"{w:,}" if w else "?", f"{a:,}" if a else "?",
                         _fmt(a / w, 2) if a and w else "–", action, t_mem, t_keep,
                         ", ".join(convs[:3]) + (" …" if len(convs) > 3 else "")])
        lines += _table(["op", "blocks", "weight numel", "activation numel", "act/weight",
                         "auto action", "block time Tune/Eval", "block time keep-W′/Eval",
                         "convs"], rows)
    return lines


def _blocks_section(blocks: list[BlockResult]) -> list[str]:
    if not blocks:
        return []
    lines = ["## Single blocks: Tune vs Eval mode (conv → BN → activation, alone)", "",
             "Each distinct block of a model, compiled alone. Ratios are median per-round "
             "step-time ratios to `compile` (Eval mode) [quartiles]; noise from the "
             "baseline twin. `auto`: what the `auto` policy does to the block in the whole "
             "model (the pass's own decision in one light-backend compile of the model, "
             "its CPU activation rule included); older results give the ratio rule alone.", ""]
    header = ["model", "batch", "block", "input", "count", "weight numel", "act numel",
              "act/weight", "N·H·W", "auto", "Eval ms", "Tune/Eval", "noise",
              "saved KB Eval", "saved KB Tune"]
    rows = []
    for b in sorted(blocks, key=lambda b: (b.model, b.batch, b.act_over_weight)):
        eval_s = _get(b, "compile", "median_s")
        rows.append([
            b.model, str(b.batch), b.block, "×".join(map(str, b.input_shape or [])),
            str(b.count), f"{b.weight_numel:,}", f"{b.activation_numel:,}",
            _fmt(b.act_over_weight, 2), f"{b.positions:,}", _dash(b.auto_action),
            _fmt(None if eval_s is None else eval_s * 1e3, 2),
            _ratio(b, "pass_memory"),
            _fmt(noise(b), 3),
            _fmt(_get(b, "compile", "saved_bytes"), 0, 1e3),
            _fmt(_get(b, "pass_memory", "saved_bytes"), 0, 1e3),
        ])
    return lines + _table(header, rows)


def _light_section(light: list[LightCell]) -> list[str]:
    if not light:
        return []
    modes = _present(light, noise=False)
    lines = ["## Activation memory, light backend sweep (MB)", "",
             "`convbn_pass.backends.light`: the pass, then AOTAutograd with the min-cut "
             "partitioner, no Inductor. Same rewrite, but no Inductor decompositions and no "
             "layout optimisation, so absolute figures differ from Inductor's (compare "
             "with the Inductor table where both exist); `builtin` here is PyTorch's pattern "
             "pass called directly.", ""]
    rows = []
    for c in light:
        row = _cell_id(c) + [_fmt(_get(c, m, "saved_bytes"), 2, MB) for m in modes]
        auto, mem = c.modes.get("pass_auto"), c.modes.get("pass_memory")
        row.append(f"{auto.tuned}/{mem.tuned}" if auto and mem else "–")
        rows.append(row)
    return lines + _table(["model", "batch", "size", *modes, "auto tuned"], rows)


def _checks_section(cells: list[CellResult]) -> list[str]:
    lines = ["## Checks", "",
             "Every compiled mode must compile a graph of its own (except the twin), and "
             "its rewrite must fire (`tuned` for the pass, "
             "`counters['inductor']['efficient_conv_bn_eval']` for the built-in pass) and no "
             "other. Problems found:", ""]
    problems = []
    for c in cells:
        for m, r in c.modes.items():
            problems += [f"- {c.model} batch {c.batch}, {m}: {p}" for p in r.checks]
        problems += [f"- {c.model} batch {c.batch}: {n}" for n in c.notes]
        problems += [f"- {c.model} batch {c.batch}, {m}: FAILED {e}"
                     for m, e in c.mode_errors.items()]
    rewrites = [f"{c.model}/{c.batch}: built-in {_dash(_get(c, 'builtin', 'builtin_rewrites'))}, "
                + ", ".join(f"{p} {_dash(_get(c, f'pass_{p}', 'tuned'))}"
                            for p in convbn_pass.POLICIES)
                for c in cells]
    lines += problems or ["- none"]
    lines += ["", "Rewrite counts per cell: " + "; ".join(rewrites) + ".", ""]
    return lines


def markdown(results: RunResult) -> str:
    every = [c for c in results.cells if c.modes]
    cells = [c for c in every if _get(c, "compile", "saved_bytes") is not None]
    env = results.environment
    s = results.settings
    lines = [f"# convbn_pass benchmark: {results.preset or 'custom'}", "",
             "Made by:", "", "    " + (results.command or "?"), "",
             f"torch {env.get('torch')}, device {s.get('device')}"
             + (f" ({env['gpu']})" if env.get("gpu") else f", {env.get('cpus')} CPUs")
             + f", {env.get('torch_threads')} torch thread(s), torchvision: {env.get('torchvision')}, "
             f"timm: {env.get('timm')}. auto policy ratio {env.get('auto_ratio')}. "
             f"convbn_pass at git {env.get('git')}. "
             + f"Started {results.started}, finished "
             f"{results.finished or 'unfinished'}, {results.elapsed_s or 0:.0f} s.",
             "",
             f"Settings: `{s}`", ""]
    about = results.modes_about
    if about:
        lines += ["Modes:", ""] + [f"- `{k}`: {v}" for k, v in about.items()] + [""]
    if cells:
        lines += _targets_section(cells, s.get("fresh_kernel_cache", True))
        lines += _memory_section(cells)
        lines += _weight_section(cells)
        lines += _time_section(cells)
        lines += _compile_section(cells, s.get("fresh_kernel_cache", True))
    if every:
        lines += _peak_section(every)
    if cells:
        lines += _auto_section(cells, results.blocks)
        lines += _checks_section(cells)
    lines += _blocks_section(results.blocks)
    lines += _light_section(results.light)
    if results.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in results.skipped] + [""]
    return "\n".join(lines)


# --- CSV ----------------------------------------------------------------------------

RSS_FIELDS = ["step_peak_bytes", "process_peak_bytes", "first_s", "first_cpu_s"]  # rss_<field>
CSV_FIELDS = ["kind", "model", "batch", "input_shape", "mode", "saved_bytes",
              "weight_shaped_bytes", "first_cpu_s", "median_s",
              "q1_s", "q3_s", "ratio", "ratio_q1", "ratio_q3", "rounds", "first_s", "compile_s",
              "tuned", "builtin_rewrites", "new_graphs", "peak_bytes",
              *(f"rss_{f}" for f in RSS_FIELDS), "block", "weight_numel",
              "activation_numel", "checks"]


def csv_rows(results: RunResult) -> list[dict[str, Any]]:
    """One row per (cell, mode); a block's own fields come from its cell."""
    rows = []
    for kind, cells in (("grid", results.cells), ("block", results.blocks),
                        ("light", results.light)):
        for cell in cells:
            for mode, r in cell.modes.items():
                rows.append({k: getattr(r, k, None) for k in CSV_FIELDS}
                            | {f"rss_{f}": _rss(cell, mode, f) for f in RSS_FIELDS}
                            | {k: getattr(cell, k, None)
                               for k in ("block", "weight_numel", "activation_numel")}
                            | {"kind": kind, "model": cell.model, "batch": cell.batch,
                               "input_shape": "x".join(map(str, cell.input_shape or [])),
                               "mode": mode, "checks": "; ".join(r.checks)})
    return rows


# --- plots --------------------------------------------------------------------------

def _by_model(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    grouped: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        grouped[c.model].append(c)
    return {m: sorted(cs, key=lambda c: c.batch) for m, cs in grouped.items()}


def _panels(cells: Sequence[Cell], draw: Callable[[Any, list[Cell]], bool], ylabel: str,
            title: str, path: pathlib.Path) -> bool:
    """One panel per model against batch size; ``draw`` plots a model's cells on its
    axes and says whether it plotted anything. Writes ``path`` where something was."""
    import matplotlib.pyplot as plt
    grouped = _by_model(cells)
    if not grouped:
        return False
    cols = min(len(grouped), 3)
    rows = (len(grouped) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(grouped):]:
        ax.set_visible(False)
    plotted = False
    for ax, (model, cs) in zip(axes, grouped.items()):
        plotted = draw(ax, cs) or plotted
        shape = cs[0].input_shape or []
        ax.set_title(f"{model} ({shape[-1]} px)" if len(shape) == 4 else model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if plotted:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
        fig.suptitle(title)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted


def _ratios(results: list[Any]) -> tuple[list[float], list[list[float]]]:
    """Median time ratios and their quartiles as ``errorbar``'s ``y, yerr``."""
    return ([r.ratio for r in results], [[r.ratio - r.ratio_q1 for r in results],
                                         [r.ratio_q3 - r.ratio for r in results]])


def _plot_metric(cells: Sequence[Cell], field: str, scale: float, ylabel: str, title: str,
                 path: pathlib.Path, rss: bool = False) -> bool:
    def draw(ax: Any, cs: list[Cell]) -> bool:
        drawn = False
        for mode in _present(cs, "rss" if rss else field, noise=False):
            values = [(c.batch, _rss(c, mode, field) if rss else _get(c, mode, field))
                      for c in cs]
            pts = [(b, v / scale) for b, v in values if v is not None]
            if pts:
                ax.plot(*zip(*pts), label=mode, **_style(mode))
                drawn = True
        return drawn
    return _panels(cells, draw, ylabel, title, path)


def _plot_time(cells: list[CellResult], path: pathlib.Path) -> bool:
    def draw(ax: Any, cs: list[Cell]) -> bool:
        batches = [c.batch for c in cs]
        bands = [noise(c) or 0.0 for c in cs]
        ax.fill_between(batches, [1 - b for b in bands], [1 + b for b in bands], color="grey",
                        alpha=0.25, label="noise (twin)")
        for mode in _present(cs, "ratio", noise=False):
            timed = [c for c in cs if _get(c, mode, "ratio") is not None]
            if mode != "compile":
                ax.errorbar([c.batch for c in timed], *_ratios([c.modes[mode] for c in timed]),
                            capsize=3, label=mode, **_style(mode))
        ax.axhline(1.0, color="black", lw=0.8)
        return True
    timed = [c for c in cells if _get(c, "compile", "ratio") is not None]
    return _panels(timed, draw, "step time / compile",
                   "Median step time relative to torch.compile without a pass (bars: quartiles)",
                   path)


def _plot_blocks(blocks: list[BlockResult], auto_ratio: float | None,
                 path: pathlib.Path) -> bool:
    pts = [b for b in blocks if _get(b, "pass_memory", "ratio") is not None]
    if not pts:
        return False
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], "act_over_weight", "conv output elements / weight elements"),
                            (axes[1], "positions", "output positions N·H·W (MACs per weight element)")):
        for label in sorted({(b.model, b.batch) for b in pts}):
            sel = [b for b in pts if (b.model, b.batch) == label]
            ax.errorbar([getattr(b, key) for b in sel],
                        *_ratios([b.modes["pass_memory"] for b in sel]),
                        fmt="o", capsize=2, label=f"{label[0]} batch {label[1]}")
        if auto_ratio and key == "act_over_weight":
            ax.axvline(auto_ratio, color="red", ls="--", label=f"auto ratio {auto_ratio}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("block step time, Tune (W′ rebuilt) / Eval")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Single Conv-BN-ReLU blocks: Tune mode's time cost (bars: quartiles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: RunResult, out: pathlib.Path) -> list[str]:
    """results.md, results.csv and, where matplotlib imports, the PNGs; returns the
    file names written."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables alone
        matplotlib = None
    else:
        matplotlib.use("Agg")
    written = []
    rows = csv_rows(results)
    if rows:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        written.append("results.csv")
    cells = [c for c in results.cells if c.modes]
    plots = {
        "memory.png": lambda p: _plot_metric(cells, "saved_bytes", MB, "MB saved for backward",
                                             "Activation memory saved for backward (Inductor)", p),
        "time.png": lambda p: _plot_time(cells, p),
        "compile.png": lambda p: _plot_metric(cells, "first_s", 1.0, "first call, s",
                                              "First-call (compile) time", p),
        "peak_cuda.png": lambda p: _plot_metric(cells, "peak_bytes", MB, "MB above pre-step",
                                                "Peak CUDA memory of a step", p),
        "peak_rss.png": lambda p: _plot_metric(cells, "step_peak_bytes", MB, "MB above pre-step",
                                               "Peak RSS of a step, fresh process", p, rss=True),
        "light_memory.png": lambda p: _plot_metric(
            results.light, "saved_bytes", MB, "MB saved for backward",
            "Activation memory saved for backward (light backend, no Inductor)", p),
        "blocks.png": lambda p: _plot_blocks(results.blocks,
                                             results.environment.get("auto_ratio"), p),
    }
    for name, plot in plots.items():
        if matplotlib is not None and plot(out / name):
            written.append(name)
    md = markdown(results)
    if written:
        md += "\n## Figures\n\n" + "\n".join(f"![{n}]({n})" for n in written if n.endswith(".png")) + "\n"
    (out / "results.md").write_text(md)
    written.append("results.md")
    return written
