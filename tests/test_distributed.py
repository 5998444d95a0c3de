"""DistributedDataParallel on CPU (gloo, two processes) and DDP's graph splitting.

``torch.compile(DDP(model))`` on CPU with torch 2.13 compiles no graph at all
(Dynamo falls back to eager around DDP's forward: 0 unique graphs measured), so
the compiled arrangement tested here is ``DDP(torch.compile(model))``. The graph
splitting that ``torch.compile(DDP(model))`` applies at bucket boundaries
(DDPOptimizer) is tested in-process by running DDPOptimizer itself as the backend.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch._dynamo.backends.distributed import DDPOptimizer

import convbn_pass
from convbn_pass import backends, zoo
from helpers import Step, errors

STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 12, 12))  # materialise the lazy layer
    return zoo.randomize_bn(model).eval().double()


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=gen, dtype=torch.float64)
            for _ in range(STEPS)]


def _train(model: nn.Module, fn, batches, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        part = x.chunk(world)[rank]
        loss = fn(part).square().mean()  # DDP averages the per-rank means
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        compiled = torch.compile(model, options=convbn_pass.options("memory",
                                                                    fx_graph_cache=False))
        ddp = nn.parallel.DistributedDataParallel(compiled)
        _train(model, ddp, _batches(), rank, 2)
        tuned = torch._dynamo.utils.counters["convbn_pass"]["tuned"]
        torch.save({"state": model.state_dict(), "tuned": tuned}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.inductor
def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    reference = _model()
    _train(reference, reference, _batches())
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got["tuned"] == 2
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-10, atol=1e-12,
                                       msg=name)


def test_ddp_bucket_split_between_conv_and_bn_is_recorded():
    """DDPOptimizer splits the graph where a parameter bucket fills. With the cap
    set so that the bucket closes right after the first BN, that conv and its BN
    land in different graphs: recorded as 'split_graph', numbers unchanged."""
    model = zoo.randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16))).eval().double()
    size = lambda m: sum(p.untyped_storage().nbytes() for p in m.parameters())  # noqa: E731
    cap = size(model[4]) + size(model[3]) + 1  # in reverse order: BN, conv, then BN 1 overflows
    splitter = DDPOptimizer(bucket_bytes_cap=cap, first_bucket_cap=cap,
                            backend_compile_fn=backends.light("memory"))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ref = Step(model, x)
    got = Step(model, x, lambda m: torch.compile(m, backend=splitter.compile_fn))
    assert max(errors(got, ref).values()) <= 1e-10
    decided = {(d.conv, d.bn): d.reason for d in convbn_pass.decisions()}
    assert decided == {("0", "1"): "split_graph", ("3", "4"): "tuned"}

