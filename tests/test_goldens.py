"""Graph goldens: the normalised Dynamo graph after the pass, for representative blocks.

Refresh with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_goldens.py``.
"""

from __future__ import annotations

import expecttest
import torch
import torch.nn as nn

from convbn_pass import backends, zoo
from convbn_pass.printing import format_graph


class Pair(nn.Module):
    """``relu(bn(conv(x)))``; with ``reuse`` the conv output is also added back."""

    def __init__(self, conv: nn.Module, bn: nn.Module, reuse: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.reuse = conv, bn, reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = torch.relu(self.bn(y))
        return out + y if self.reuse else out


def rewritten(conv: nn.Module, bn: nn.Module, x_shape: tuple[int, ...],
              reuse: bool = False) -> str:
    graphs: list[str] = []

    def keep(rewrite):
        graphs.append(format_graph(rewrite.after))
    model = zoo.randomize_bn(Pair(conv, bn, reuse)).eval()
    torch.compile(model, backend=backends.light("memory", on_graph=keep))(torch.randn(x_shape))
    assert len(graphs) == 1
    return graphs[0]


class TestGoldens(expecttest.TestCase):
    def test_conv2d_bn(self):
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), (2, 4, 8, 8)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = tune.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = tune.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = tune.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv2d(x, scale_weight, fuse_bias, (1, 1), (1, 1), (1, 1), 1)
    out = torch.relu(y)
    return (out,)
""")

    def test_conv_without_bias(self):
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6),
                      (2, 4, 8, 8)), """\
def forward(conv.weight, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = tune.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = tune.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = tune.fuse_bias(None, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv2d(x, scale_weight, fuse_bias, (2, 2), (0, 0), (1, 1), 1)
    out = torch.relu(y)
    return (out,)
""")

    def test_grouped_transposed_conv(self):
        # W is [C_in, C_out/g, k, k]: the scale goes on axis 1, per group.
        self.assertExpectedInline(
            rewritten(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6),
                      (2, 4, 5, 5)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = tune.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = tune.scale_weight(conv.weight, bn_scale, transposed=True, groups=2)  # recompute
    fuse_bias = tune.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv_transpose2d(x, scale_weight, fuse_bias, (2, 2), (0, 0), (0, 0), 2, (1, 1))
    out = torch.relu(y)
    return (out,)
""")

    def test_linear_bn1d(self):
        self.assertExpectedInline(
            rewritten(nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), (4, 8)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var):
    bn_scale = tune.bn_scale(bn.running_var, None, 1e-05)  # recompute
    scale_weight = tune.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = tune.fuse_bias(conv.bias, bn.running_mean, bn_scale, None, conv.weight)  # recompute
    y = F.linear(x, scale_weight, fuse_bias)
    out = torch.relu(y)
    return (out,)
""")

    def test_multi_user_conv_is_left_alone(self):
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), (2, 4, 8, 8), reuse=True), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    y = F.conv2d(x, conv.weight, conv.bias, (1, 1), (0, 0), (1, 1), 1)
    batch_norm = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, 1e-05)
    out = torch.relu(batch_norm)
    add = operator.add(out, y)
    return (add,)
""")
