"""Regional compilation: pairs found by tracing, regions that hold them whole,
the root compiled where it holds pairs itself, numbers equal to eager, and one
compiled graph per group of equal blocks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import convbn_pass
from convbn_pass.core import compat
from convbn_pass import backends, regions, zoo
from convbn_pass.core import compat
from helpers import Step, check_every_pair_tuned, errors

TOL = 1e-10


def _tiny(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Small float64 versions of the zoo's models (same layouts), eval mode, with input."""
    torch.manual_seed(0)
    builders = {
        "resnet": lambda: zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], num_classes=4, width=8),
        "resnet50": lambda: zoo.ResNet(zoo.Bottleneck, [3, 4, 6, 3], num_classes=4, width=4),
        "resnext": lambda: zoo.ResNet(zoo.Bottleneck, [1, 1, 1, 1], num_classes=4, width=16,
                                      groups=4, width_per_group=8),
        "mobilenet_v2": lambda: zoo.MobileNetV2(num_classes=4, width=0.25),
        "efficientnet_lite": lambda: zoo.EfficientNetLite(num_classes=4, width=0.25),
        "unet": lambda: zoo.UNet(width=4),
        "mlp_bn": lambda: zoo.MLPBN(in_features=16, hidden=12, num_classes=3),
        "detector": lambda: _Joined(zoo.Detector(zoo.ResNet(zoo.Bottleneck, [1, 1, 1, 1],
                                                            width=4),
                                                fpn=8, num_anchors=1, num_classes=2)),
    }
    model = zoo.randomize_bn(builders[name]()).eval().double()
    shape = (3, 16) if name == "mlp_bn" else (2, 3, 32, 32)
    return model, torch.randn(shape, dtype=torch.float64)


class _Joined(nn.Module):
    """The detector's per-level outputs as one tensor, for Step's upstream gradient."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([out.flatten(1) for out in self.net(x)], 1)


MODELS = ["resnet", "resnet50", "resnext", "mobilenet_v2", "efficientnet_lite", "unet",
          "mlp_bn", "detector"]


def _compile(x: torch.Tensor, **kw: Any):
    """A Step compile_fn: compile_regions in place with the light backend."""
    def fn(model: nn.Module) -> nn.Module:
        regions.compile_regions(model, (x,), backend=backends.light("memory"), **kw)
        return model
    return fn


def _pairs_in(plan: regions.RegionPlan, where: str) -> int:
    return sum(plan.region_of(p) == where for p in plan.pairs)


# --- Finding pairs and choosing regions -------------------------------------------------

def test_pairs_of_a_resnet_and_their_holders():
    model, x = _tiny("resnet")
    pairs = regions.find_pairs(model, x)
    holders = {(p.conv, p.bn): p.holder for p in pairs}
    assert len(pairs) == 12
    assert holders[("conv1", "bn1")] == ""                       # the stem: in the root
    assert holders[("layer1.0.conv2", "layer1.0.bn2")] == "layer1.0"
    assert holders[("layer2.0.downsample.0", "layer2.0.downsample.1")] == "layer2.0.downsample"
    assert regions.auto_regions(pairs) == ("layer1.0", "layer2.0", "layer3.0", "layer4.0")


def test_pairs_are_data_flow_not_registration_order():
    """BN registered before its conv (pre-activation layout) and a BN that follows
    a conv only in registration order: only the conv whose output feeds a BN pairs."""
    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)    # normalises the input, no conv before it
            self.conv_a = nn.Conv2d(3, 4, 3)
            self.conv_b = nn.Conv2d(4, 4, 3)
            self.bn_b = nn.BatchNorm2d(4)     # follows conv_b in the data flow
            self.bn_a = nn.BatchNorm2d(4)     # registered after conv_a, applied to nothing of it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_a(self.bn_b(self.conv_b(self.conv_a(self.bn_in(x)).relu())))

    pairs = regions.find_pairs(PreAct().eval(), torch.randn(1, 3, 9, 9))
    assert [(p.conv, p.bn) for p in pairs] == [("conv_b", "bn_b")]


def test_find_pairs_changes_nothing():
    """BN in training mode updates running statistics when run: the trace restores them."""
    model, x = _tiny("resnet")
    model.train()
    before = copy.deepcopy(model.state_dict())
    pairs = regions.find_pairs(model, x)
    assert all(p.reject == "bn_training" for p in pairs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("name", MODELS)
def test_auto_regions_never_split_a_pair(name):
    model, x = _tiny(name)
    plan = regions.plan_regions(model, x)
    assert plan.pairs and plan.split == ()
    assert all(plan.region_of(p) is not None for p in plan.pairs)
    assert sum(len(g) for g in plan.groups) == len(plan.regions)


def test_auto_regions_of_mobilenet_are_the_conv_bn_sequentials():
    model, x = _tiny("mobilenet_v2")
    plan = regions.plan_regions(model, x)
    assert len(plan.regions) == len(plan.pairs) == 52
    assert plan.regions[:3] == ("0", "1.block.0", "1.block.1") and not plan.root


def test_regions_by_class():
    model, x = _tiny("mobilenet_v2")
    inverted = type(model[1])
    plan = regions.plan_regions(model, x, regions=inverted)
    assert len(plan.regions) == 17 and plan.split == ()
    assert plan.root  # the first and last conv-BN blocks are not InvertedResiduals


# --- Region lists that would separate a pair, and bad input -----------------------------

def test_split_pairs_names_the_separated_pairs():
    model, x = _tiny("resnet")
    pairs = regions.find_pairs(model, x)
    split = regions.split_pairs(pairs, ["layer1.0.conv1", "layer2.0.downsample.1"])
    assert {(s.pair.conv, s.pair.bn, s.conv_region, s.bn_region) for s in split} == {
        ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv1", None),
        ("layer2.0.downsample.0", "layer2.0.downsample.1", None, "layer2.0.downsample.1"),
    }
    assert regions.split_pairs(pairs, ["layer1.0", "layer2"]) == ()


def test_compile_regions_refuses_a_split():
    model, x = _tiny("resnet")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1 → layer1\.0\.bn1"):
        regions.compile_regions(model, x, regions=["layer1.0.conv1"],
                                backend=backends.light("memory"))
    assert "forward" not in model.layer1[0].conv1.__dict__  # nothing was compiled


@pytest.mark.parametrize("bad, message", [
    (["layer9"], "no submodule 'layer9'"),
    ([""], "'' is the root"),
    (["layer1", "layer1.0"], "'layer1.0' lies inside region 'layer1'"),
    ("layer1", "got the string 'layer1'"),
    (nn.LSTM, "no module of class LSTM"),
])
def test_bad_regions_are_one_clear_error(bad, message):
    model, x = _tiny("resnet")
    with pytest.raises(ValueError, match=message):
        regions.plan_regions(model, x, regions=bad)


def test_compiling_twice_is_refused_and_undo_restores():
    model, x = _tiny("resnet")
    regions.compile_regions(model, x, backend=backends.light("memory"))
    with pytest.raises(ValueError, match="already compiled"):
        regions.compile_regions(model, x, backend=backends.light("memory"))
    assert regions.uncompile_regions(model) == ("", "layer1.0", "layer2.0", "layer3.0",
                                                "layer4.0")
    assert not any("forward" in m.__dict__ for m in model.modules())
    regions.compile_regions(model, x, backend=backends.light("memory"))  # again, fine


# --- Compiled: numbers, tuned pairs, graphs -----------------------------------------------

# ResNet-50's step is in test_equal_blocks_share_one_graph; EfficientNet-lite has
# MobileNetV2's layout with squeeze-excite (52 regions, 25 s on 2 busy cores): slow.
# MobileNetV2 and EfficientNet compile one region per conv-BN-activation Sequential (52
# and 49 regions): a minute or more each on 2 cores, so they run with -m slow.
STEP_MODELS = [pytest.param(n, marks=pytest.mark.slow)
               if n in ("efficientnet_lite", "mobilenet_v2") else n
               for n in MODELS if n != "resnet50"]


@pytest.mark.parametrize("name", STEP_MODELS)
def test_regional_step_matches_eager_and_tunes_every_pair(name):
    model, x = _tiny(name)
    plan = regions.plan_regions(model, x)
    ref = Step(model, x)
    got = Step(model, x, _compile(x))
    assert max(errors(got, ref).values()) <= TOL
    assert got.buffers_unchanged()
    check_every_pair_tuned(plan)


def test_stem_is_tuned_in_the_root_graph():
    """Decisions name modules from the compiled module: "conv1"/"bn1" is the stem in
    the root's graph and each block's first pair in its region's graph."""
    model, x = _tiny("resnet")
    plan = regions.plan_regions(model, x)
    Step(model, x, _compile(x))
    named = [d for d in convbn_pass.decisions() if (d.conv, d.bn) == ("conv1", "bn1")]
    assert plan.root and len(named) == len(plan.groups) + 1 and all(d.tuned for d in named)


def test_equal_blocks_share_one_graph():
    """ResNet-50's 16 blocks come in 8 shapes: 8 region graphs, plus the root's two
    (the stem before layer1, the pooling and head after layer4)."""
    model, x = _tiny("resnet50")
    plan = regions.plan_regions(model, x)
    assert (len(plan.regions), len(plan.groups)) == (16, 8)
    before = counters["stats"]["unique_graphs"]
    ref = Step(model, x)
    got = Step(model, x, _compile(x))
    assert counters["stats"]["unique_graphs"] - before == 1 + 8 + 2  # 1: the trace
    assert max(errors(got, ref).values()) <= TOL
    check_every_pair_tuned(plan)


def test_names_and_state_dict_unchanged():
    model, x = _tiny("resnet")
    keys = list(model.state_dict())
    regions.compile_regions(model, x, backend=backends.light("memory"))
    assert list(model.state_dict()) == keys
    assert type(model) is zoo.ResNet


def test_policy_through_inductor_options():
    """The default backend: Inductor with convbn_pass.options(policy)."""
    model, x = _tiny("resnet")
    regions.compile_regions(model, x, policy="memory", options={"fx_graph_cache": False})
    assert model.__dict__["_convbn_region_compiled"] is not None
    with pytest.raises(ValueError, match="unknown policy"):
        regions.compile_regions(copy.deepcopy(zoo.MLPBN()), torch.randn(2, 256), policy="fast")


def test_describe_names_groups_root_and_splits():
    model, x = _tiny("resnet")
    text = regions.describe(regions.plan_regions(model, x))
    assert text.splitlines()[0] == ("12 conv-BN pairs; 4 regions in 4 groups; the root "
                                    "compiled too (1 pair in it)")
    assert "  group 2: layer2.0 (3 pairs each)" in text and "no pair falls between" in text
    split = regions.describe(regions.plan_regions(model, x, regions=["layer1.0.conv1"]))
    assert "split: layer1.0.conv1 → layer1.0.bn1 (conv in 'layer1.0.conv1', BN in no region)" \
        in split


def test_repeated_compiles_share_one_backend_configuration():
    """Equal settings give equal options (so Dynamo sees one backend and reuses the
    root's graphs, instead of dropping to eager after 8 compiles of one model class);
    other settings give other options."""
    first = regions._inductor_options("memory", {"fx_graph_cache": False})
    assert regions._inductor_options("memory", {"fx_graph_cache": False}) == first
    assert regions._inductor_options("auto", {"fx_graph_cache": False}) != first
    assert regions._inductor_options(None, {}) == {}


class _Blocks(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x).flatten(1) for b in self.blocks], 1)


def test_more_block_shapes_than_the_recompile_limit():
    """Ten blocks of one class in ten shapes: torch.compile on each would hit Dynamo's
    recompile limit (8 entries on the class's forward) and run the last ones eagerly;
    each group here has a cache line of its own, so all 40 pairs are tuned."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(_Blocks([zoo.Bottleneck(8, 4 + i) for i in range(10)])).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch._dynamo.config.patch(**compat.recompile_limits(8)):
        plan = regions.compile_regions(model, x, backend=backends.light("memory"))
        model(x)
    assert len(plan.groups) == 10 and not plan.root
    assert counters["convbn_pass"]["tuned"] == 40


def test_find_pairs_reads_a_graph_once_per_block_it_runs_for():
    """Blocks dispatched from a Python loop past a graph break: Dynamo compiles the block's
    forward (one graph per dilation here) and may run one graph for several blocks; every
    block's pair is found, named by the modules it ran with."""
    model = zoo.randomize_bn(zoo.RoutedNet(depth=12, width=4)).eval()
    pairs = regions.find_pairs(model, torch.randn(1, 3, 16, 16))
    assert [(p.conv, p.bn) for p in pairs] == [
        (f"blocks.{i}.conv", f"blocks.{i}.bn") for i in range(12)]


@pytest.mark.skipif(not compat.isolated_recompiles(1),
                    reason="this torch.compile cannot give a compile a recompile budget of its own")
def test_find_pairs_leaves_the_users_recompile_budget_alone():
    """The trace has a recompile budget of its own: a compile after it tunes as many pairs
    as a compile without it (Dynamo's limit counts compiles per code object)."""
    def tuned_by_a_compile(first_find_pairs: bool) -> int:
        torch._dynamo.reset()
        model = zoo.randomize_bn(zoo.RoutedNet(depth=12, width=4)).eval()
        x = torch.randn(1, 3, 16, 16)
        if first_find_pairs:
            regions.find_pairs(model, x)
        decided: list[convbn_pass.Decision] = []
        with torch._dynamo.config.patch(recompile_limit=8):
            torch.compile(model, backend=backends.light(
                "memory", on_graph=lambda r: decided.extend(r.decisions)))(x)
        return sum(d.tuned for d in decided)

    assert tuned_by_a_compile(True) == tuned_by_a_compile(False) == 8
