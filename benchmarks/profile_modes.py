"""Where a mode's step time goes: ``torch.profiler`` over steady steps, per mode.

::

    python -m benchmarks.profile_modes --model resnet18 --batch 8 --px 96 \\
        --modes compile pass_auto pass_memory deploy

For each mode (compiled as the harness compiles it), profiles ``--steps`` steps
after warm-up and sums self CPU time per operator. Inductor's generated kernels
are named per graph (``cpp_fused_..._12``), so they are also summed by the ops
in their name. Writes ``profile.md`` and ``profile.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import shlex
import sys
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from convbn_pass import deploy, zoo
from convbn_pass.step import train_step

from . import harness

__all__ = ["main"]


def _family(name: str) -> str:
    """A kernel's family: extern aten ops by name; Inductor kernels by what they fuse."""
    if name.startswith("cpp_fused") or name.startswith("triton_"):
        ops = re.sub(r"^(cpp_fused|triton_\w+?_fused)_?", "", name)
        ops = re.sub(r"_\d+$", "", ops)
        return f"inductor: {ops or 'kernel'}"
    return name


def profile_mode(mode: harness.Mode, base: torch.nn.Module, x: torch.Tensor, steps: int,
                 device: str) -> dict[str, Any]:
    model = deploy.fold(base, x) if mode.deploy else copy.deepcopy(base)
    options = dict(mode.options())
    if device == "cpu":
        options["cpp.enable_kernel_profile"] = True  # Inductor's C++ kernels as profiler events
    fn = torch.compile(model, options=options, dynamic=False) if mode.compiled else model
    for _ in range(3):
        train_step(fn, model, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(fn, model, x)
    ops: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        ops[_family(event.key)] += event.self_cpu_time_total / 1e3 / steps  # ms per step
        counts[_family(event.key)] += event.count // steps
    return {"ms_per_step": dict(ops), "calls_per_step": dict(counts),
            "total_ms": sum(ops.values())}


def _markdown(results: dict[str, Any], top: int) -> str:
    modes = list(results["modes"])
    names = set().union(*(r["ms_per_step"] for r in results["modes"].values()))
    rows = sorted(names, key=lambda n: -max(r["ms_per_step"].get(n, 0.0)
                                             for r in results["modes"].values()))[:top]
    lines = [f"# Profile: {results['model']} batch {results['batch']}", "",
             "Made by:", "", "    " + results["command"], "",
             "Self CPU ms per step (calls per step), summed by operator; Inductor kernels "
             "summed by the ops their name lists. One profile, not interleaved: a guide to "
             "where time goes, not a timing result.", "",
             "| op | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for name in rows:
        cells = []
        for m in modes:
            r = results["modes"][m]
            ms, calls = r["ms_per_step"].get(name), r["calls_per_step"].get(name, 0)
            cells.append("–" if ms is None else f"{ms:.2f} ({calls})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{results['modes'][m]['total_ms']:.1f}"
                                              for m in modes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_modes")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--modes", nargs="+", default=["compile", "pass_auto", "pass_memory", "deploy"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch.manual_seed(0)
    base, shape = harness.load_model(args.model, args.px)
    base = zoo.randomize_bn(base).eval().to(args.device)
    x = torch.randn(args.batch, *shape, device=args.device)
    out = args.out or harness_results() / f"profile-{args.model}-b{args.batch}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": args.model, "batch": args.batch, "px": args.px,
                               "command": "python -m benchmarks.profile_modes " + shlex.join(argv),
                               "environment": harness.environment(), "modes": {}}
    for mode in harness.modes_for(args.modes):
        if mode.twin:
            continue
        print(f"profiling {mode.name}", file=sys.stderr, flush=True)
        results["modes"][mode.name] = profile_mode(mode, base, x, args.steps, args.device)
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    (out / "profile.md").write_text(_markdown(results, args.top))
    (out / "command.txt").write_text(results["command"] + "\n")
    print(f"wrote profile.md, profile.json in {out}", file=sys.stderr)
    return 0


def harness_results() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / "results"


if __name__ == "__main__":
    sys.exit(main())
