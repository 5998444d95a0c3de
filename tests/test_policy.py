"""The per-block policy: what `auto` tunes and what it leaves in Eval mode, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import backends, memory, zoo
from convbn_pass.core import policy as policy_module
from convbn_pass.core.forms import Follow
from convbn_pass.core.match import Candidate
from convbn_pass.core.records import Action


def _decide(model: nn.Module, x: torch.Tensor, policy: str = "auto") -> list[tuple[str, str]]:
    model = zoo.randomize_bn(model).eval()
    torch.compile(model, backend=backends.light(policy))(x)
    return [(d.reason, d.detail) for d in convbn_pass.decisions()]


def _pair(conv: nn.Module, bn: nn.Module, *after: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, bn, *after)


class _UNetStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.block(x)
        down = self.pool(skip)
        return torch.cat([nn.functional.interpolate(down, scale_factor=2), skip], 1)


@pytest.mark.parametrize("model,x,reason,detail", [
    # conv output 2·8·32·32 = 16,384 elements, weight 8·3·3·3 = 216: tuned
    pytest.param(_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
                 torch.randn(2, 3, 32, 32), "tuned", "activation 16,384 >= weight 216",
                 id="early-stage-tuned"),
    # a late-stage shape: output 1·64·2·2 = 256, weight 64·64·3·3 = 36,864: Eval
    pytest.param(_pair(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)),
                 torch.randn(1, 64, 2, 2), "policy_eval", "activation 256 < weight 36,864",
                 id="late-stage-eval"),
    # ReLU6 after the BN, on CPU: Eval, whatever the sizes
    pytest.param(_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()),
                 torch.randn(2, 3, 32, 32), "policy_eval", "conv → hardtanh", id="relu6-cpu"),
    # a ResNet stem: BN → ReLU → max-pool, on CPU: Eval
    pytest.param(_pair(nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(),
                       nn.MaxPool2d(3, 2, 1)),
                 torch.randn(2, 3, 32, 32), "policy_eval", "conv → relu→max_pool",
                 id="stem-cpu"),
    # a U-Net encoder stage: the ReLU feeds the max-pool and the skip concat: Eval
    pytest.param(_UNetStage(), torch.randn(2, 3, 32, 32), "policy_eval",
                 "conv → relu→max_pool", id="unet-stage-cpu"),
    # ReLU alone is fine
    pytest.param(_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                 torch.randn(2, 3, 32, 32), "tuned", "activation", id="relu-tuned"),
])
def test_auto_decisions(model, x, reason, detail):
    ((got_reason, got_detail),) = _decide(model, x)
    assert got_reason == reason and detail in got_detail


class _InplaceStem(nn.Module):
    """A stem written with in-place functional ReLU forms."""

    def __init__(self, relu) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(self.relu(self.bn(self.conv(x))), 3, 2, 1)


@pytest.mark.parametrize("relu", [nn.ReLU(inplace=True), torch.relu_,
                                  lambda y: nn.functional.relu(y, inplace=True)],
                         ids=["ReLU(inplace)", "torch.relu_", "F.relu(inplace)"])
def test_cpu_rule_sees_inplace_relu(relu):
    ((reason, detail),) = _decide(_InplaceStem(relu), torch.randn(2, 3, 32, 32))
    assert reason == "policy_eval" and "conv → relu→max_pool" in detail


@pytest.mark.parametrize("model,expected", [
    (_pair(nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
     "conv → relu→max_pool"),
    (_UNetStage(), "conv → relu→max_pool"),
    (_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()), "conv → hardtanh"),
    (_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), None),
], ids=["stem", "unet_stage", "relu6", "relu"])
def test_cpu_rule_in_module_graphs(model, expected):
    """symbolic_trace graphs call modules (nn.ReLU, nn.MaxPool2d) and carry no device
    in their shape metadata: the rule reads module types and the weight's device."""
    gm = torch.fx.symbolic_trace(zoo.randomize_bn(model).eval())
    (decision,) = convbn_pass.apply(gm, (torch.randn(2, 3, 32, 32),))
    if expected is None:
        assert decision.reason == "tuned"
    else:
        assert decision.reason == "policy_eval" and expected in decision.detail


@pytest.mark.parametrize("policy", ["memory", "keep_weight"])
def test_other_policies_tune_everything(policy):
    model = _pair(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU6())
    ((reason, _),) = _decide(model, torch.randn(1, 64, 2, 2), policy)
    assert reason == "tuned"


def test_auto_never_keeps_more_than_no_pass_or_keep_weight():
    model = zoo.randomize_bn(zoo.build("resnet_tiny")[0]).eval()
    x = torch.randn(2, 3, 32, 32)

    def saved(policy):
        torch._dynamo.reset()
        return memory.saved_activation_bytes(
            torch.compile(model, backend=backends.light(policy)), model, x)
    auto, plain, keep = saved("auto"), saved(None), saved("keep_weight")
    assert auto <= plain and auto <= keep


# --- The policy's rules, without compiling ------------------------------------------------

def _candidate(act: int | None = 100, weight: int | None = 10, device: str | None = "cpu",
               follower: tuple[Follow, ...] = ()) -> Candidate:
    """An acceptable candidate as match would describe it: only what decide() reads."""
    return Candidate("conv", "bn", "conv2d", "batch_norm", None, "", weight_numel=weight,
                     activation_numel=act, device=device, follower=follower)


RELU6, STEM = (Follow.HARDTANH,), (Follow.RELU, Follow.MAX_POOL)


@pytest.mark.parametrize("policy,candidate,ratio,action,detail", [
    pytest.param("memory", _candidate(act=1, weight=10**6, follower=RELU6), 1.0, Action.TUNE,
                 "policy 'memory'", id="memory-tunes-whatever"),
    pytest.param("keep_weight", _candidate(act=1, weight=10**6), 1.0, Action.TUNE_KEEP_WEIGHT,
                 "policy 'keep_weight'", id="keep_weight-tunes-whatever"),
    pytest.param("auto", _candidate(follower=RELU6), 1.0, Action.SKIP,
                 "on CPU, conv → hardtanh without a BatchNorm", id="auto-cpu-relu6"),
    pytest.param("auto", _candidate(follower=STEM), 1.0, Action.SKIP,
                 "on CPU, conv → relu→max_pool without a BatchNorm", id="auto-cpu-stem"),
    pytest.param("auto", _candidate(device="cuda", follower=STEM), 1.0, Action.TUNE,
                 "activation 100 >= weight 10", id="auto-cuda-stem-by-size"),
    pytest.param("auto", _candidate(follower=(Follow.RELU,)), 1.0, Action.TUNE,
                 "activation 100 >= weight 10", id="auto-cpu-relu-by-size"),
    pytest.param("auto", _candidate(act=None), 1.0, Action.TUNE, "sizes unknown",
                 id="auto-sizes-unknown"),
    pytest.param("auto", _candidate(act=10, weight=10), 1.0, Action.TUNE,
                 "activation 10 >= weight 10", id="auto-equal-sizes-tuned"),
    pytest.param("auto", _candidate(act=9, weight=10), 1.0, Action.SKIP,
                 "activation 9 < weight 10 elements; rebuilding W' would cost more",
                 id="auto-weight-outweighs"),
    pytest.param("auto", _candidate(act=100, weight=10), 16.0, Action.SKIP,
                 "activation 100 < weight 10", id="auto-ratio16-eval"),
    pytest.param("auto", _candidate(act=3, weight=10), 0.25, Action.TUNE,
                 "activation 3 >= weight 10", id="auto-ratio0.25-tuned"),
])
def test_decide(policy, candidate, ratio, action, detail):
    choice = policy_module.decide(candidate, policy, ratio)
    assert choice.action is action and detail in choice.detail


@pytest.mark.parametrize("call,message", [
    pytest.param(lambda: policy_module.check_policy("fast"), "unknown policy 'fast'",
                 id="policy"),
    pytest.param(lambda: convbn_pass.ConvBNPass("auto", ratio=0), "ratio must be positive",
                 id="ratio"),
])
def test_bad_policy_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ratio_reaches_the_pass_and_its_cache_key():
    """The ratio is an argument of the pass, not a global: two passes with other
    ratios decide differently in one process, and key the cache apart."""
    model = _pair(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    x = torch.randn(1, 8, 4, 4)  # activation 128, weight 576
    assert _decide(model, x)[0][0] == "policy_eval"
    torch._dynamo.reset()
    seen = []
    model = zoo.randomize_bn(model).eval()
    torch.compile(model, backend=backends.light("auto", ratio=0.2, on_graph=seen.append))(x)
    assert [d.reason for d in seen[0].decisions] == ["tuned"]
    assert (convbn_pass.ConvBNPass("auto", ratio=0.2).uuid()
            != convbn_pass.ConvBNPass("auto").uuid())


def test_auto_tunes_where_eval_cannot_run():
    """BatchNorm weights in bfloat16 with float32 statistics (FSDP2's bfloat16
    MixedPrecisionPolicy casts parameters, not buffers): F.batch_norm refuses it, so
    Eval mode cannot run, and `auto` tunes the block whatever its sizes."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64))).eval()
    model[0].to(torch.bfloat16)
    model[1].weight.data, model[1].bias.data = (model[1].weight.data.bfloat16(),
                                                model[1].bias.data.bfloat16())
    x = torch.randn(1, 64, 3, 3, dtype=torch.bfloat16)  # activation 64 < weight 36,864
    with pytest.raises(RuntimeError, match="expected scalar type"):
        model(x)
    out = torch.compile(model, backend=backends.light("auto"))(x)
    assert out.dtype == torch.bfloat16
    assert [d.reason for d in convbn_pass.decisions()] == ["tuned"]
    assert "Eval mode cannot run it" in convbn_pass.decisions()[0].detail
