"""Compile time of a whole-model compile against a regional one, with and without the pass.

Every measurement is one fresh process (empty Inductor cache directory, Inductor's
``compile_threads=1`` so that the C++ compiler runs as a child whose CPU time is
counted, one torch thread): the CPU seconds of the first training step (Dynamo,
AOTAutograd and Inductor for forward and backward, plus the step itself), and,
for a regional compile, of ``convbn_pass.regions.compile_regions`` before it
(its one Dynamo trace). Modes run interleaved, their order rotated every round,
so that a busy interval on a shared machine hits every mode alike.

    python -m benchmarks.regional_compile --models resnet50 unet --rounds 3

Modes: ``whole`` (``torch.compile(model)``), ``whole_pass`` (``options=
convbn_pass.options(policy)``), ``regional`` (``compile_regions(policy=None)``:
Inductor, no pass) and ``regional_pass``. Also recorded per run: Inductor's
generated kernel count, Dynamo's unique graphs, and the pass's tuned count.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ("whole", "whole_pass", "regional", "regional_pass")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.regional_compile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "unet"])
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="one batch per model (default: 8 for image classifiers, 4 for unet)")
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--policy", default="auto")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further Inductor options for every mode (e.g. cpp_wrapper=True)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/regional-compile"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    parsed: Any = {"True": True, "False": False}.get(value, value)
    if isinstance(parsed, str) and parsed.lstrip("-").isdigit():
        parsed = int(parsed)
    return key, parsed


# Deeper layouts than the zoo's, for where regional compilation should pay: ResNet-101
# repeats one block shape 22 times in its third stage.
EXTRA_MODELS = {"resnet101": ((3, 4, 23, 3), "ResNet-101 layout (Bottleneck)")}


def _build(name: str, px: int) -> tuple[Any, tuple[int, ...]]:
    from benchmarks import harness
    from convbn_pass import zoo
    if name in EXTRA_MODELS:
        return zoo.ResNet(zoo.Bottleneck, list(EXTRA_MODELS[name][0])), (3, px, px)
    return harness.load_model(name, px)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: build, compile one mode, take the first step, report."""
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import metrics

    import convbn_pass
    from benchmarks import harness
    from convbn_pass import regions, step
    from convbn_pass.core.records import COUNTER

    torch.set_num_threads(1)
    cpp = _count_cpp_compiles(harness.cpu_seconds)
    model, x = harness.setup(spec["model"], spec["batch"], spec["px"], build=_build)
    mode, policy = spec["mode"], spec["policy"]
    base = {"fx_graph_cache": False, **dict(_option(o) for o in spec.get("options", []))}
    start_cpu, start = harness.cpu_seconds(), time.perf_counter()
    plan = None
    if mode.startswith("whole"):
        opts = convbn_pass.options(policy, **base) if mode == "whole_pass" else base
        fn = torch.compile(model, options=opts)
    else:
        plan = regions.compile_regions(model, (x,), policy=policy if mode == "regional_pass"
                                       else None, options=base)
        fn = model
    plan_cpu = harness.cpu_seconds() - start_cpu
    kernels_before = metrics.generated_kernel_count
    step.train_step(fn, model, x)
    return {
        "cpu_s": harness.cpu_seconds() - start_cpu,
        "wall_s": time.perf_counter() - start,
        "plan_cpu_s": plan_cpu if plan is not None else 0.0,
        "kernels": metrics.generated_kernel_count - kernels_before,
        "cpp_units": cpp["units"],
        "cpp_cpu_s": cpp["cpu_s"],
        # compile_regions' own trace is one of Dynamo's graphs
        "graphs": int(counters["stats"]["unique_graphs"]) - (1 if plan is not None else 0),
        "tuned": int(counters[COUNTER]["tuned"]),
        **({"pairs": len(plan.pairs), "regions": len(plan.regions),
            "groups": len(plan.groups), "root": plan.root} if plan is not None
           else dict.fromkeys(("pairs", "regions", "groups", "root"))),
    }


def _count_cpp_compiles(cpu_seconds: Any) -> dict[str, Any]:
    """Count Inductor's C++ compile units (``AsyncCompile.cpp_pybinding``: one shared
    object each) and the CPU seconds spent in them (with ``compile_threads=1`` each
    compiles synchronously, the compiler a child process)."""
    from torch._inductor.async_compile import AsyncCompile

    tally: dict[str, Any] = {"units": 0, "cpu_s": 0.0}
    original = AsyncCompile.cpp_pybinding

    def counted(self: Any, argtypes: Any, source_code: str) -> Any:
        start = cpu_seconds()
        try:
            return original(self, argtypes, source_code)
        finally:
            tally["units"] += 1
            tally["cpu_s"] += cpu_seconds() - start

    AsyncCompile.cpp_pybinding = counted  # type: ignore[method-assign]
    return tally


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import harness
    batches = args.batch or [4 if m == "unet" else 8 for m in args.models]
    if len(batches) != len(args.models):
        raise SystemExit("--batch: give one batch per model")
    runs: list[dict[str, Any]] = []
    modes = list(args.modes)
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for model, batch in zip(args.models, batches):
            for mode in order:
                spec = {"model": model, "batch": batch, "px": args.px, "mode": mode,
                        "policy": args.policy, "options": args.options}
                load = os.getloadavg()[0]
                result = harness.spawn("benchmarks.regional_compile", spec,
                                       {"TORCHINDUCTOR_COMPILE_THREADS": "1"}).result
                runs.append({**spec, "round": r, "load": load, **result})
                print(f"round {r} {model} b{batch} {mode:<14} "
                      + (f"{result['cpu_s']:.1f} CPU s, {result['kernels']} kernels, "
                         f"{result['graphs']} graphs, {result['tuned']} tuned (load {load:.1f})"
                         if "error" not in result else f"ERROR {result['error']}"),
                      file=sys.stderr, flush=True)
    return {"runs": runs, "argv": sys.argv[1:]}


def summary(results: dict[str, Any]) -> str:
    runs = [r for r in results["runs"] if "error" not in r]
    cells = sorted({(r["model"], r["batch"]) for r in runs}, key=str)
    lines = ["| model | mode | CPU s, median [min–max] | ratio to whole | trace CPU s | "
             "C++ units (CPU s) | kernels | graphs | tuned | regions (groups) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, batch in cells:
        mine = [r for r in runs if (r["model"], r["batch"]) == (model, batch)]
        base = statistics.median(r["cpu_s"] for r in mine if r["mode"] == "whole") \
            if any(r["mode"] == "whole" for r in mine) else None
        for mode in MODES:
            got = [r for r in mine if r["mode"] == mode]
            if not got:
                continue
            cpu = [r["cpu_s"] for r in got]
            med = statistics.median(cpu)
            ratio = f"{med / base:.2f}" if base else "–"
            last = got[-1]
            regions = (f"{last['regions']} ({last['groups']})" if last["regions"] is not None
                       else "–")
            lines.append(
                f"| {model} b{batch} | {mode} | {med:.1f} [{min(cpu):.1f}–{max(cpu):.1f}] | "
                f"{ratio} | {statistics.median(r['plan_cpu_s'] for r in got):.1f} | "
                f"{last['cpp_units']} ({statistics.median(r['cpp_cpu_s'] for r in got):.1f}) | "
                f"{last['kernels']} | {last['graphs']} | {last['tuned']} | {regions} |")
    loads = [r["load"] for r in runs]
    lines.append("")
    lines.append(f"{len(runs)} runs; 1-minute load average at their start {min(loads):.1f}–"
                 f"{max(loads):.1f} (2 CPUs).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        from benchmarks import harness
        return harness.worker_main(worker, args.worker)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    results = run(args)
    results["torch"] = torch.__version__
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "command.txt").write_text("python -m benchmarks.regional_compile "
                                     + " ".join(results["argv"]) + "\n")
    extra = f" Inductor options: {' '.join(args.options)}." if args.options else ""
    text = (f"# Regional compile time\n\ntorch {torch.__version__}, CPU.{extra}\n\n"
            + summary(results))
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
