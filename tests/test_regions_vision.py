"""compile_regions on torchvision's and timm's ResNets (skipped where they do not
import: the CPU build of torch 2.13 here cannot import PyPI's torchvision)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from convbn_pass import backends, regions, zoo
from helpers import Step, check_every_pair_tuned, errors

TOL = 1e-10


def _torchvision(name: str) -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    return getattr(models, name)(weights=None, num_classes=4)


def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=4)


MODELS = {  # name: (factory, conv-BN pairs, blocks)
    "torchvision:resnet18": (lambda: _torchvision("resnet18"), 20, 8),
    "torchvision:resnet50": (lambda: _torchvision("resnet50"), 53, 16),
    "timm:resnet18": (lambda: _timm("resnet18"), 20, 8),
    "timm:resnet50": (lambda: _timm("resnet50"), 53, 16),
}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = zoo.randomize_bn(factory()).eval().double()
    return model, torch.randn(2, 3, 64, 64, dtype=torch.float64)


@pytest.mark.parametrize("name", MODELS)
def test_regions_are_the_blocks_and_the_stem_stays_in_the_root(name):
    model, x = _model(name)
    _, pairs, blocks = MODELS[name]
    plan = regions.plan_regions(model, x)
    assert len(plan.pairs) == pairs and plan.split == ()
    assert plan.regions == tuple(f"layer{i}.{j}" for i in range(1, 5)
                                 for j in range(len(getattr(model, f"layer{i}"))))
    assert len(plan.regions) == blocks and plan.root
    assert [(p.conv, p.bn) for p in plan.pairs if plan.region_of(p) == ""] == [("conv1", "bn1")]


@pytest.mark.parametrize("name", MODELS)
def test_regional_step_matches_eager_and_tunes_every_pair(name):
    model, x = _model(name)
    plan = regions.plan_regions(model, x)

    def compile_fn(m: nn.Module) -> nn.Module:
        regions.compile_regions(m, (x,), backend=backends.light("memory"))
        return m

    ref = Step(model, x)
    got = Step(model, x, compile_fn)
    assert max(errors(got, ref).values()) <= TOL
    check_every_pair_tuned(plan)
