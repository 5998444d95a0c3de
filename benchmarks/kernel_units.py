"""Inductor's C++ kernels per model and policy: call sites, distinct compile units, CPU.

On CPU every distinct kernel source is one C++ compile (one shared object);
kernels whose source is identical (same fused ops, same sizes) are compiled once
and called from several places. For each (model, policy), in a fresh process
with an empty Inductor cache and ``compile_threads=1``, this records the kernel
call sites of each generated graph (from ``TORCH_LOGS=output_code``), how many
of them are distinct, the C++ units compiled and the CPU seconds they took, and
Inductor's ``generated_kernel_count`` (loop nests).

    python -m benchmarks.kernel_units --models unet resnet50 --policies none auto memory
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
_CALL = re.compile(r"^\s+(cpp_fused\w*)\(")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import metrics

    import convbn_pass
    from benchmarks import harness, regional_compile
    from convbn_pass import step, zoo
    from convbn_pass.core.records import COUNTER

    torch.set_num_threads(1)
    cpp = regional_compile._count_cpp_compiles(harness.cpu_seconds)
    torch.manual_seed(0)
    model, shape = regional_compile._build(spec["model"], spec["px"])
    model = zoo.randomize_bn(model).eval()
    x = torch.randn(spec["batch"], *shape)
    opts: dict[str, Any] = {"fx_graph_cache": False}
    if spec["policy"] != "none":
        opts = convbn_pass.options(spec["policy"], **opts)
    start = harness.cpu_seconds()
    step.train_step(torch.compile(model, options=opts), model, x)
    return {"cpu_s": harness.cpu_seconds() - start, "cpp_units": cpp["units"],
            "cpp_cpu_s": cpp["cpu_s"], "loop_nests": metrics.generated_kernel_count,
            "tuned": int(counters[COUNTER]["tuned"])}


def _graph_calls(log: str) -> list[list[str]]:
    """Kernel call sites of each generated graph, from the output_code log."""
    graphs: list[list[str]] = []
    for line in log.splitlines():
        text = line.split("[__output_code] ", 1)[-1]
        if text.strip().startswith("def call(self, args)"):
            graphs.append([])
        elif graphs and (m := _CALL.match(text)):
            graphs[-1].append(m.group(1))
    return graphs


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="convbn_units_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1",
                   TORCH_LOGS="output_code", PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_units", "--worker",
                               json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                              text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result = json.loads(lines[-1])
    graphs = _graph_calls(done.stderr)
    result["call_sites"] = [len(g) for g in graphs]
    result["distinct"] = [len(set(g)) for g in graphs]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_units",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["unet", "resnet50"])
    p.add_argument("--policies", nargs="+", default=["none", "auto", "memory", "keep_weight"])
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/kernel-units"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch
    rows = []
    for model in args.models:
        for policy in args.policies:
            spec = {"model": model, "batch": 4 if model == "unet" else 8, "px": args.px,
                    "policy": policy}
            rows.append({**spec, "load": os.getloadavg()[0], **_spawn(spec)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| model | policy | tuned | kernel call sites (fwd, bwd) | distinct = C++ units "
             "(fwd, bwd) | C++ units compiled | C++ CPU s | loop nests | first step CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} b{r['batch']} | {r['policy']} | error: {r['error']} |")
            continue
        lines.append(f"| {r['model']} b{r['batch']} | {r['policy']} | {r['tuned']} | "
                     f"{', '.join(map(str, r['call_sites']))} | {', '.join(map(str, r['distinct']))} | "
                     f"{r['cpp_units']} | {r['cpp_cpu_s']:.1f} | {r['loop_nests']} | {r['cpu_s']:.1f} |")
    loads = [r["load"] for r in rows]
    text = (f"# Inductor C++ kernels per policy\n\ntorch {torch.__version__}, CPU, one fresh "
            f"process per row, load average {min(loads):.1f}-{max(loads):.1f} on 2 CPUs.\n\n"
            + "\n".join(lines))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(text + "\n")
    (out / "command.txt").write_text("python -m benchmarks.kernel_units "
                                     + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
