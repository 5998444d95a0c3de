"""What Dynamo compiles when the distributed wrapper is inside ``torch.compile``.

Two processes on gloo (CPU). For each arrangement it prints, from rank 0, Dynamo's
unique graph count, the pairs the pass tuned, and every graph break with its
reason (``counters["graph_break"]``; ``TORCH_LOGS=graph_breaks`` prints the same
with the user-code stack):

- ``torch.compile(DDP(model))`` and ``torch.compile(fully_shard(model))``, for a
  model whose forward is its own code (``zoo.ResNet``) and for an
  ``nn.Sequential`` (whose forward is torch.nn code);
- ``DDP(torch.compile(model))`` and ``compile_regions`` + ``fully_shard``, the
  arrangements that work.

    python -m benchmarks.wrapped_compile [--backend light|inductor]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ARRANGEMENTS = ("compile(DDP(model))", "compile(fully_shard(model))", "DDP(compile(model))",
                "compile_regions + fully_shard")
MODELS = ("resnet", "sequential")


def _model(kind: str) -> nn.Module:
    from convbn_pass import zoo
    torch.manual_seed(0)
    if kind == "resnet":
        model = zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], num_classes=4, width=8)
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 15 * 15, 4))
    return zoo.randomize_bn(model).eval()


def _arrange(arrangement: str, model: nn.Module, x: torch.Tensor,
             compile_fn: Callable[[Any], Any], backend: Any) -> Any:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from convbn_pass import regions
    if arrangement == "compile(DDP(model))":
        return compile_fn(DDP(model))
    if arrangement == "compile(fully_shard(model))":
        return compile_fn(fully_shard(model))
    if arrangement == "DDP(compile(model))":
        return DDP(compile_fn(model))
    plan = regions.compile_regions(model, (x,), **backend)
    for path in plan.regions:
        fully_shard(model.get_submodule(path))
    return fully_shard(model)


def _worker(rank: int, port: int, backend_name: str) -> None:
    import convbn_pass
    from convbn_pass import backends
    from convbn_pass.core.records import COUNTER
    from torch._dynamo.utils import counters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    if backend_name == "light":
        backend: dict[str, Any] = {"backend": backends.light("memory")}
    else:
        backend = {"options": convbn_pass.options("memory", fx_graph_cache=False)}
    try:
        for kind in MODELS:
            for arrangement in ARRANGEMENTS:
                torch._dynamo.reset()
                counters.clear()
                x = torch.randn(2, 3, 32, 32)
                fn = _arrange(arrangement, _model(kind), x,
                              lambda m: torch.compile(m, **backend), backend)
                fn(x).sum().backward()
                graphs = counters["stats"]["unique_graphs"]
                if arrangement == "compile_regions + fully_shard":
                    graphs -= 1  # compile_regions' own trace
                if rank == 0:
                    print(f"{kind:<10} {arrangement:<30} graphs {graphs:>2}   pairs tuned "
                          f"{counters[COUNTER]['tuned']:>2}", flush=True)
                    for reason, n in counters["graph_break"].items():
                        print(f"{'':<12}graph break x{n}: {_first_lines(reason)}", flush=True)
    finally:
        dist.destroy_process_group()


def _first_lines(reason: str) -> str:
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return " / ".join(lines[:2])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wrapped_compile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("light", "inductor"), default="light")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, gloo, 2 processes, backend {args.backend}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args.backend), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
