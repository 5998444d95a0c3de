"""FSDP2 with bfloat16 parameters: error against float64, with and without the pass.

Two processes on gloo (CPU). A small ResNet (Bottleneck blocks, float32 master
weights) is compiled by regions (``convbn_pass.regions.compile_regions``, light
backend: the pass and AOTAutograd's partitioner, no code generation), every
region and the root sharded with ``fully_shard(..., mp_policy=
MixedPrecisionPolicy(param_dtype=torch.bfloat16))``, and trained 3 SGD steps.
Per seed it records, against the same model trained in float64 eager on one
process: the relative error of the first step's gradients (norm over all
parameters, and per parameter) and of the parameters after the 3 steps.

Both arms keep BatchNorm's running statistics in bfloat16: FSDP2 casts
parameters, not buffers, and ``F.batch_norm`` refuses bfloat16 weights with
float32 statistics ("expected scalar type BFloat16 but found Float"), so without
the pass the float32-statistics setup does not run at all. A third arm runs the
pass with float32 statistics.

    python -m benchmarks.fsdp_bf16 --seeds 8 --out benchmarks/results/fsdp-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORLD = 2
STEPS = 3
ARMS = {  # name: (policy, statistics dtype)
    "no_pass": (None, torch.bfloat16),
    "pass": ("memory", torch.bfloat16),
    "pass_f32_stats": ("memory", torch.float32),
}


def _model(seed: int) -> nn.Module:
    from convbn_pass import zoo
    torch.manual_seed(seed)
    model = zoo.ResNet(zoo.Bottleneck, [1, 1, 1, 1], num_classes=4, width=8)
    return zoo.randomize_bn(model, seed).eval()


def _batches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor], rank: int, world: int
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """First step's gradients and the parameters after STEPS steps, full tensors."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtype = next(iter(model.parameters())).dtype
    first: dict[str, torch.Tensor] = {}
    for i, x in enumerate(batches):
        loss = model(x.chunk(world)[rank].to(dtype)).double().square().mean()
        opt.zero_grad()
        loss.backward()
        if i == 0:
            first = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
    return first, {n: _full(p) for n, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double().clone()


def _worker(rank: int, port: int, seeds: list[int], out: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from convbn_pass import backends, regions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    found: dict[str, Any] = {}
    # One backend per policy for the whole run: Dynamo keeps the root's graphs on the
    # model class's code, and a new backend per compile would pile entries there until
    # its recompile_limit (8) sends the root to eager.
    backend = {policy: backends.light(policy) for policy, _ in ARMS.values()}
    try:
        for seed in seeds:
            for arm, (policy, stats) in ARMS.items():
                model, batches = _model(seed), _batches(seed)
                plan = regions.compile_regions(model, (batches[0].chunk(WORLD)[rank].float(),),
                                               backend=backend[policy])
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.running_mean.data = module.running_mean.data.to(stats)
                        module.running_var.data = module.running_var.data.to(stats)
                mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
                for path in plan.regions:
                    fully_shard(model.get_submodule(path), mp_policy=mixed)
                fully_shard(model, mp_policy=mixed)
                found[f"{seed}/{arm}"] = _train(model, batches, rank, WORLD)
        if rank == 0:
            torch.save(found, out)
    finally:
        dist.destroy_process_group()


def _rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
         names: Sequence[str] | None = None) -> float:
    names = list(want) if names is None else names
    num = sum(float((got[n] - want[n]).norm()) ** 2 for n in names)
    return (num / sum(float(want[n].norm()) ** 2 for n in names)) ** 0.5


def measure(seeds: list[int], out: pathlib.Path) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(out / "ranks.pt")
    mp.spawn(_worker, args=(port, seeds, path), nprocs=WORLD, join=True)
    found = torch.load(path)
    os.remove(path)
    rows = []
    for seed in seeds:
        reference = _model(seed).double()
        ref_grads, ref_params = _train(reference, _batches(seed), 0, 1)
        row: dict[str, Any] = {"seed": seed}
        for arm in ARMS:
            grads, params = found[f"{seed}/{arm}"]
            per_param = {n: _rel(grads, ref_grads, [n]) for n in ref_grads}
            row[arm] = {"grad_error": _rel(grads, ref_grads), "param_error": _rel(params, ref_params),
                        "grad_error_per_param": per_param}
        rows.append(row)
    return {"seeds": seeds, "rows": rows, "torch": torch.__version__}


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = ["| seed | first-step gradients: no pass | pass | pass, f32 stats | "
             "params after 3 steps: no pass | pass | pass, f32 stats |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[a]['grad_error']:.2e}" for a in ARMS)
                     + " | " + " | ".join(f"{r[a]['param_error']:.2e}" for a in ARMS) + " |")
    med = {a: (statistics.median(r[a]["grad_error"] for r in rows),
               statistics.median(r[a]["param_error"] for r in rows)) for a in ARMS}
    lines.append("| median | " + " | ".join(f"{med[a][0]:.2e}" for a in ARMS) + " | "
                 + " | ".join(f"{med[a][1]:.2e}" for a in ARMS) + " |")
    ratios = [statistics.median(r["pass"]["grad_error_per_param"][n]
                                / max(r["no_pass"]["grad_error_per_param"][n], 1e-300)
                                for r in rows) for n in rows[0]["pass"]["grad_error_per_param"]]
    lines += ["", f"Per parameter, median over seeds of (pass / no pass) first-step gradient "
              f"error: median {statistics.median(ratios):.2f}, largest {max(ratios):.2f} "
              f"({len(ratios)} parameters).",
              f"Ratio of medians, pass / no pass: gradients {med['pass'][0] / med['no_pass'][0]:.2f}, "
              f"parameters {med['pass'][1] / med['no_pass'][1]:.2f}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_bf16",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/fsdp-bf16"))
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = measure(list(range(args.seeds)), out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "command.txt").write_text("python -m benchmarks.fsdp_bf16 "
                                     + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
    text = (f"# FSDP2, bfloat16 parameters: error against float64\n\ntorch {results['torch']}, "
            f"CPU, gloo, {WORLD} processes.\n\n" + report(results))
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
