"""Graph goldens: the normalised Dynamo graph after the pass, for representative blocks.

Refresh with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_goldens.py``.
"""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import backends, zoo
from convbn_pass.printing import format_graph

pytestmark = pytest.mark.version  # in the version suite (pytest -m version)


class Block(nn.Module):
    """``relu(bn(conv(x)))``; with ``reuse`` the conv output is also added back."""

    def __init__(self, conv: nn.Module, bn: nn.Module, reuse: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.reuse = conv, bn, reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = torch.relu(self.bn(y))
        return out + y if self.reuse else out


def rewritten(conv: nn.Module, bn: nn.Module, x_shape: tuple[int, ...],
              reuse: bool = False, policy: str = "memory",
              autocast: torch.dtype | None = None) -> str:
    """The Dynamo graph of ``relu(bn(conv(x)))`` after the pass, normalised."""
    return _dynamo_graph(zoo.randomize_bn(Block(conv, bn, reuse)).eval(), x_shape, policy,
                         autocast)


def _dynamo_graph(model: nn.Module, x_shape: tuple[int, ...], policy: str = "memory",
                  autocast: torch.dtype | None = None) -> str:
    seen: list[convbn_pass.GraphRewrite] = []
    compiled = torch.compile(model, backend=backends.light(policy, on_graph=seen.append))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        compiled(torch.randn(x_shape))
    assert len(seen) == 1
    return format_graph(seen[0].after)


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d, as it computes: ``x * scale + shift``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def _module_graph(model: nn.Module, x: torch.Tensor) -> str:
    """``symbolic_trace`` (module calls) then ``convbn_pass.apply``, normalised."""
    return _applied(torch.fx.symbolic_trace(zoo.randomize_bn(model).eval()), x)


def _exported_graph(model: nn.Module, x: torch.Tensor) -> str:
    """``torch.export`` (aten ops) then ``convbn_pass.apply``, normalised. The call of
    the guard function that ``export(...).module()`` puts first in its graph from torch
    2.9 on (``_guards_fn = self._guards_fn(input_1)``; 2.8 has none) is left out: the
    pass leaves it where it is, and the golden is the same on every version."""
    text = _applied(torch.export.export(zoo.randomize_bn(model).eval(), (x,)).module(), x)
    return "".join(line for line in text.splitlines(keepends=True)
                   if "= self._guards_fn(" not in line)


def _applied(gm: torch.fx.GraphModule, x: torch.Tensor) -> str:
    convbn_pass.apply(gm, [x], policy="memory")
    return format_graph(gm)


class TestGoldens(expecttest.TestCase):
    def test_conv2d_bn(self):
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), (2, 4, 8, 8)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv2d(x, scale_weight, fuse_bias, (1, 1), (1, 1), (1, 1), 1)
    out = torch.relu(y)
    return (out,)
""")

    def test_conv_without_bias(self):
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6),
                      (2, 4, 8, 8)), """\
def forward(conv.weight, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(None, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
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
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale, transposed=True, groups=2)  # recompute
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv_transpose2d(x, scale_weight, fuse_bias, (2, 2), (0, 0), (0, 0), 2, (1, 1))
    out = torch.relu(y)
    return (out,)
""")

    def test_linear_bn1d(self):
        self.assertExpectedInline(
            rewritten(nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), (4, 8)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var):
    bn_scale = algebra.bn_scale(bn.running_var, None, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, None, conv.weight)  # recompute
    y = F.linear(x, scale_weight, fuse_bias)
    out = torch.relu(y)
    return (out,)
""")

    def test_conv2d_instance_norm(self):
        # InstanceNorm with running statistics, in eval mode: the same terms as BatchNorm.
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3, padding=1),
                      nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                      (2, 4, 8, 8)), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv2d(x, scale_weight, fuse_bias, (1, 1), (1, 1), (1, 1), 1)
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

    def test_frozen_bn_affine(self):
        # y·scale + shift: c = scale, b′ = b·c + shift; nothing of the affine is trained
        self.assertExpectedInline(
            _dynamo_graph(nn.Sequential(nn.Conv2d(4, 6, 3), FrozenBN(6)), (2, 4, 8, 8)), """\
def forward(0.weight, 0.bias, args_0, 1.weight, 1.running_var, 1.bias, 1.running_mean):
    add = operator.add(1.running_var, 1e-05)
    rsqrt = add.rsqrt()
    scale = operator.mul(1.weight, rsqrt)
    mul_1 = operator.mul(1.running_mean, scale)
    shift = operator.sub(1.bias, mul_1)
    reshape = scale.reshape(1, -1, 1, 1)
    reshape_1 = shift.reshape(1, -1, 1, 1)
    channel_scale = algebra.channel_scale(reshape)  # recompute
    scale_weight = algebra.scale_weight(0.weight, channel_scale)  # recompute
    fuse_bias = algebra.fuse_bias(0.bias, None, channel_scale, reshape_1, 0.weight)  # recompute
    input_1 = F.conv2d(args_0, scale_weight, fuse_bias, (1, 1), (0, 0), (1, 1), 1)
    return (input_1,)
""")

    def test_autocast_adds_the_bias_after_the_conv(self):
        # bfloat16 conv, float32 statistics: b′ is added in float32 after a bias-free conv
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), (2, 4, 8, 8),
                      autocast=torch.bfloat16), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)  # recompute
    y = F.conv2d(x, scale_weight, None, (1, 1), (0, 0), (1, 1), 1)
    add_channel_bias = algebra.add_channel_bias(y, fuse_bias)
    out = torch.relu(add_channel_bias)
    return (out,)
""")

    def test_keep_weight_has_no_recompute_tags(self):
        # W′ saved for backward: the same nodes, untagged
        self.assertExpectedInline(
            rewritten(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), (2, 4, 8, 8),
                      policy="keep_weight"), """\
def forward(conv.weight, conv.bias, x, bn.running_mean, bn.running_var, bn.weight, bn.bias):
    bn_scale = algebra.bn_scale(bn.running_var, bn.weight, 1e-05)
    scale_weight = algebra.scale_weight(conv.weight, bn_scale)
    fuse_bias = algebra.fuse_bias(conv.bias, bn.running_mean, bn_scale, bn.bias, conv.weight)
    y = F.conv2d(x, scale_weight, fuse_bias, (1, 1), (0, 0), (1, 1), 1)
    out = torch.relu(y)
    return (out,)
""")

    def test_module_graph_with_reflect_padding(self):
        # symbolic_trace graph: the conv module becomes F.pad + F.conv2d(padding 0)
        self.assertExpectedInline(
            _module_graph(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                                        nn.BatchNorm2d(6)), torch.randn(2, 4, 8, 8)), """\
def forward(input_1):
    _0_weight = self.0.weight
    _0_bias = self.0.bias
    _1_running_mean = self.1.running_mean
    _1_running_var = self.1.running_var
    _1_weight = self.1.weight
    _1_bias = self.1.bias
    bn_scale = algebra.bn_scale(_1_running_var, _1_weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(_0_weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(_0_bias, _1_running_mean, bn_scale, _1_bias, _0_weight)  # recompute
    pad = F.pad(input_1, (1, 1, 1, 1), mode='reflect')
    conv2d = F.conv2d(pad, scale_weight, fuse_bias, (1, 1), (0, 0), (1, 1), 1)
    return conv2d
""")

    def test_exported_aten_graph(self):
        # torch.export graph: aten.conv2d and aten.batch_norm
        self.assertExpectedInline(
            _exported_graph(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)),
                            torch.randn(2, 4, 8, 8)), """\
def forward(input_1):
    _0_weight = self.0.weight
    _0_bias = self.0.bias
    _1_weight = self.1.weight
    _1_bias = self.1.bias
    _1_running_mean = self.1.running_mean
    _1_running_var = self.1.running_var
    _1_num_batches_tracked = self.1.num_batches_tracked
    bn_scale = algebra.bn_scale(_1_running_var, _1_weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(_0_weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(_0_bias, _1_running_mean, bn_scale, _1_bias, _0_weight)  # recompute
    conv2d = aten.conv2d.default(input_1, scale_weight, fuse_bias)
    return (conv2d,)
""")
