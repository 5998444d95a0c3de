"""DDP and FSDP2 on CPU (gloo, two processes), and DDP's graph splitting.

Arrangements tested: ``DDP(torch.compile(model))``; ``convbn_pass.regions.
compile_regions`` followed by ``fully_shard`` on every region and the root
(float64: parameters after 3 steps equal a single-process run; the same pairs
tuned per rank as in one process; the same activation bytes per rank as one
process keeps for the same per-rank batch), the same with FSDP2's bfloat16
mixed precision (error against float64 next to the same setup without the
pass), and DDP over ``compile_regions``. ``torch.compile(DDP(model))`` and
``torch.compile(fully_shard(model))`` compile no graph for a model whose forward
is torch.nn code (an ``nn.Sequential``): see ``benchmarks/results/wrapped-compile``.
The graph splitting that ``torch.compile(DDP(model))`` applies at bucket
boundaries (DDPOptimizer) is tested in-process by running DDPOptimizer itself as
the backend.
"""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import statistics
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch._dynamo.backends.distributed import DDPOptimizer
from torch._dynamo.utils import counters

import convbn_pass
from convbn_pass import backends, memory, regions, zoo
from convbn_pass.core.records import COUNTER
from helpers import Step, errors, image_batches, small_resnet

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
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
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


# A rank left waiting (a peer that died, a port taken between _free_port and the bind)
# fails after this instead of hanging the suite.
GLOO_TIMEOUT = datetime.timedelta(seconds=300)


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



# --- FSDP2 and DDP over compile_regions --------------------------------------------------
#
# One spawn of two processes runs every scenario; each test reads its part. The light
# backend (the pass, then AOTAutograd's partitioner, no code generation) keeps the
# whole spawn within ~30 s on two busy cores.

WORLD = 2
BF16_DRAWS = 8
# FSDP2 with bfloat16 parameters, first step's gradients against float64 (norm over
# all parameters), median over BF16_DRAWS batches: how much further from float64 the
# pass may be than the same setup without it. Both arms keep BatchNorm statistics in
# bfloat16 (without the pass F.batch_norm refuses bfloat16 weights with float32
# statistics); there the pass rounds W′ and b′ (and b′'s gradient) to bfloat16, while
# with float32 statistics b′ stays in float32. Measured (benchmarks/results/fsdp-bf16,
# 8 seeds of weights and batches): 1.64x the error without the pass (per seed
# 0.9-2.9x), 1.12x with float32 statistics, which only the pass can run; this test's
# fixed weights gave 0.85x and 0.76x.
BF16_FACTOR = {"pass": 2.0, "pass_f32_stats": 1.25}


class _Activations(memory.SavedTensors):
    """Saved-for-backward bytes less the model's parameters and buffers *as they are
    when saved*: under FSDP2 a module's parameters are its unsharded copies while it
    runs, which a list made beforehand would not hold."""

    def __init__(self, model: nn.Module, inputs: list[torch.Tensor]) -> None:
        super().__init__(inputs)
        self.model = model

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        current = {(t.device, t.untyped_storage().data_ptr())
                   for t in itertools.chain(self.model.parameters(), self.model.buffers())
                   if type(t) in (torch.Tensor, nn.Parameter)}  # not the sharded DTensors
        if (tensor.device, tensor.untyped_storage().data_ptr()) in current:
            return tensor
        return super()._pack(tensor)


def _steps(model: nn.Module, fn, batches, rank: int, world: int) -> list[int]:
    """SGD steps on this rank's share of each batch; activation bytes of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtype = next(iter(model.parameters())).dtype
    kept = []
    for x in batches:
        part = x.chunk(world)[rank].to(dtype)
        with _Activations(model, [part]) as saved:
            loss = fn(part).double().square().mean()
        kept.append(saved.bytes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return kept


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().double()
            for k, v in model.state_dict().items()}


def _bn_stats_to(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.data = module.running_mean.data.to(dtype)
            module.running_var.data = module.running_var.data.to(dtype)


def _sharded(model: nn.Module, example: torch.Tensor, policy: str | None,
             bf16_stats: bool | None = None) -> nn.Module:
    """compile_regions, then fully_shard on every region and the root; ``bf16_stats``
    not None: bfloat16 parameters (MixedPrecisionPolicy), statistics in bfloat16 or not."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plan = regions.compile_regions(model, (example,), backend=backends.light(policy))
    kw: dict[str, Any] = {}
    if bf16_stats is not None:
        if bf16_stats:
            _bn_stats_to(model, torch.bfloat16)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for path in plan.regions:
        fully_shard(model.get_submodule(path), **kw)
    fully_shard(model, **kw)
    return model


def _sharded_run(rank: int) -> dict[str, Any]:
    torch._dynamo.reset()
    counters.clear()
    model, batches = small_resnet(), image_batches(STEPS)
    _sharded(model, batches[0].chunk(WORLD)[rank], "memory")
    kept = _steps(model, model, batches, rank, WORLD)
    return {"state": _full_state(model), "tuned": counters[COUNTER]["tuned"],
            "skipped": sum(v for k, v in counters[COUNTER].items() if k != "tuned"),
            "kept": kept}


def _bf16_draws() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
            for _ in range(BF16_DRAWS)]


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of one step on ``x`` (full tensors, float64), zeroed after."""
    model(x).double().square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).double()
        p.grad = None
    return grads


def _bf16_run(rank: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """First-step gradients of each draw under FSDP2 bfloat16 parameters, per arm."""
    found = {}
    for arm, policy, bf16_stats in (("no_pass", None, True), ("pass", "memory", True),
                                    ("pass_f32_stats", "memory", False)):
        torch._dynamo.reset()
        draws = _bf16_draws()
        model = _sharded(small_resnet().float(), draws[0].chunk(WORLD)[rank].float(), policy,
                         bf16_stats)
        found[arm] = [_grads(model, x.chunk(WORLD)[rank].float()) for x in draws]
    return found


def _ddp_regions_run(rank: int) -> dict[str, Any]:
    torch._dynamo.reset()
    counters.clear()
    model, batches = small_resnet(), image_batches(STEPS)
    regions.compile_regions(model, (batches[0].chunk(WORLD)[rank],),
                            backend=backends.light("memory"))
    ddp = nn.parallel.DistributedDataParallel(model)
    kept = _steps(model, ddp, batches, rank, WORLD)
    return {"state": _full_state(model), "tuned": counters[COUNTER]["tuned"], "kept": kept}


def _scenarios_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=GLOO_TIMEOUT)
    torch.set_num_threads(1)
    try:
        found = {"fsdp_f64": _sharded_run(rank), "ddp_regions": _ddp_regions_run(rank),
                 "fsdp_bf16": _bf16_run(rank)}
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _single_process() -> dict[str, Any]:
    """The references: float64 eager on whole batches; the regional compile and the
    whole-model compile (light backend, the pass) on rank 0's half batches."""
    reference = small_resnet()
    _train(reference, reference, image_batches(STEPS))
    half = [x.chunk(WORLD)[0] for x in image_batches(STEPS)]
    counters.clear()
    regional = small_resnet()
    regions.compile_regions(regional, (half[0],), backend=backends.light("memory"))
    regional_kept = _steps(regional, regional, half, 0, 1)
    tuned = counters[COUNTER]["tuned"]
    whole = small_resnet()
    whole_kept = _steps(whole, torch.compile(whole, backend=backends.light("memory")), half, 0, 1)
    return {"state": _full_state(reference), "tuned": tuned, "regional_kept": regional_kept,
            "whole_kept": whole_kept}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, Any]:
    out = str(tmp_path_factory.mktemp("scenarios") / "rank")
    mp.spawn(_scenarios_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    reference = small_resnet()
    return {"ranks": ranks, "single": _single_process(),
            "f64_grads": [_grads(reference, x) for x in _bf16_draws()]}


def _assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)


def _param_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Norm-wise relative error over all floating-point entries (parameters or grads)."""
    names = [k for k, v in want.items() if v.is_floating_point()]
    num = sum(float((got[k] - want[k]).norm()) ** 2 for k in names)
    return (num / sum(float(want[k].norm()) ** 2 for k in names)) ** 0.5


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_regions_match_single_process(scenarios, rank):
    _assert_state_equal(scenarios["ranks"][rank]["fsdp_f64"]["state"], scenarios["single"]["state"])


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_regions_tune_as_one_process(scenarios, rank):
    run = scenarios["ranks"][rank]["fsdp_f64"]
    # 17 = the stem in the root's graph + 4 blocks x (3 pairs + downsample), all distinct
    assert run["tuned"] == scenarios["single"]["tuned"] == 17 and run["skipped"] == 0


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_activation_bytes_per_rank_as_one_process(scenarios, rank):
    single = scenarios["single"]
    assert single["regional_kept"] == single["whole_kept"]
    assert scenarios["ranks"][rank]["fsdp_f64"]["kept"] == single["regional_kept"]


def bf16_errors(scenarios: dict[str, Any]) -> dict[str, float]:
    """Median over draws of the first step's gradient error against float64, per arm."""
    found = scenarios["ranks"][0]["fsdp_bf16"]  # full gradients: the same on every rank
    return {arm: statistics.median(_param_error(g, ref)
                                   for g, ref in zip(draws, scenarios["f64_grads"]))
            for arm, draws in found.items()}


@pytest.mark.parametrize("arm", sorted(BF16_FACTOR))
def test_fsdp2_bf16_pass_no_worse_than_without(scenarios, arm):
    errors_ = bf16_errors(scenarios)
    assert errors_[arm] <= BF16_FACTOR[arm] * errors_["no_pass"], errors_


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_over_regions_matches_single_process(scenarios, rank):
    run = scenarios["ranks"][rank]["ddp_regions"]
    _assert_state_equal(run["state"], scenarios["single"]["state"])
    assert run["tuned"] == scenarios["single"]["tuned"]
    assert run["kept"] == scenarios["single"]["regional_kept"]
