"""Deploy mode (BN folded once) computes what Eval mode computes, for stock BatchNorm and
for a BatchNorm subclass whose forward does more than normalise."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from convbn_pass import deploy, zoo


class _BNAct(nn.BatchNorm2d):
    """BN, then an activation, in one forward (timm's BatchNormAct2d is shaped so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.0, self.eps)
        return torch.relu(y) - 0.5  # folding it to an Identity would lose both


def _check(model: nn.Module, kept: type) -> None:
    model = zoo.randomize_bn(model).eval().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded = deploy.fold(model, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert isinstance(folded[1], kept)
    assert type(folded[0]) is type(model[0])  # the conv, with W′ and b′ as its parameters


def test_stock_batchnorm_becomes_identity() -> None:
    _check(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Identity)


def test_batchnorm_with_an_activation_keeps_the_activation() -> None:
    _check(nn.Sequential(nn.Conv2d(3, 4, 3), _BNAct(4)), deploy._AfterNorm)


def test_a_conv_called_twice_is_not_folded() -> None:
    # folding it for its second call would change its first
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.conv(x)))

    model = zoo.randomize_bn(Twice()).eval().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert deploy.pairs(model, x) == []
    with torch.no_grad():
        torch.testing.assert_close(deploy.fold(model, x)(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_frozen_stage_stays_frozen() -> None:
    # a detector's frozen stem: folded weights that trained would keep the conv input
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model.requires_grad_(False)
    folded = deploy.fold(model, torch.randn(1, 3, 9, 9))
    assert not folded[0].weight.requires_grad and not folded[0].bias.requires_grad
    model[1].weight.requires_grad_(True)  # γ trains: so do W′ and b′
    folded = deploy.fold(model, torch.randn(1, 3, 9, 9))
    assert folded[0].weight.requires_grad and folded[0].bias.requires_grad
