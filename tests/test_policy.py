"""The per-block policy: what `auto` tunes and what it leaves in Eval mode, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import backends, memory, zoo


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
    (_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), torch.randn(2, 3, 32, 32),
     "tuned", "activation 16,384 >= weight 216"),
    # a late-stage shape: output 1·64·2·2 = 256, weight 64·64·3·3 = 36,864: Eval
    (_pair(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)), torch.randn(1, 64, 2, 2),
     "policy_eval", "activation 256 < weight 36,864"),
    # ReLU6 after the BN, on CPU: Eval, whatever the sizes
    (_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()),
     torch.randn(2, 3, 32, 32), "policy_eval", "conv → hardtanh"),
    # a ResNet stem: BN → ReLU → max-pool, on CPU: Eval
    (_pair(nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
     torch.randn(2, 3, 32, 32), "policy_eval", "conv → relu→max_pool"),
    # a U-Net encoder stage: the ReLU feeds the max-pool and the skip concat: Eval
    (_UNetStage(), torch.randn(2, 3, 32, 32), "policy_eval", "conv → relu→max_pool"),
    # ReLU alone is fine
    (_pair(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
     torch.randn(2, 3, 32, 32), "tuned", "activation"),
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
