"""Every IR form the pass must match, and every guard that must leave a block alone.

Each case is one line: a model, an input, and how many blocks must be tuned (and
which skip reasons recorded). The helper checks structure (decisions and
counters) and numbers (float64 output and gradients against eager).
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import convbn_pass
from convbn_pass import backends, deploy, zoo
from convbn_pass.core import forms
from convbn_pass.printing import format_graph
from torch.fx.experimental.proxy_tensor import make_fx
from helpers import KINDS, Step, block, counts, dims, errors, light, rel_err, sample

TOL = 1e-10


def _check(model: nn.Module, x: torch.Tensor, tuned: int, skipped: dict[str, int] | None = None,
           policy: str = "memory", train: bool = False) -> None:
    """Through Dynamo and the light backend, in float64; ``train``: the model in
    training mode (else eval)."""
    model = zoo.randomize_bn(model).train(train)
    ref = Step(model, x, dtype=torch.float64)
    got = Step(model, x, light(policy),
               dtype=torch.float64)
    expected = {"tuned": tuned} if tuned else {}
    expected.update({f"skipped_{k}": n for k, n in (skipped or {}).items()})
    assert counts() == expected
    errs = errors(got, ref)
    assert max(errs.values()) <= TOL, errs
    # Running statistics: unchanged in eval mode, updated alike where batch statistics are.
    buffers = dict(got.model.named_buffers())
    for name, buf in ref.model.named_buffers():
        torch.testing.assert_close(buffers[name], buf, rtol=0, atol=TOL)


def _check_fx(model: nn.Module, x: torch.Tensor, tuned: int,
              skipped: dict[str, int] | None = None, example: bool = True) -> fx.GraphModule:
    """Through ``symbolic_trace`` (module nodes) and ``convbn_pass.apply``, in float64."""
    model = zoo.randomize_bn(model).eval().double()
    x = x.double()
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    decided = convbn_pass.apply(gm, [x] if example else None, policy="memory")
    assert sum(d.tuned for d in decided) == tuned
    assert {d.reason: sum(e.reason == d.reason for e in decided)
            for d in decided if not d.tuned} == (skipped or {})
    ref, got = Step(model, x), Step(gm, x)
    errs = errors(got, ref)
    assert max(errs.values()) <= TOL, errs
    return gm


class _LeafTracer(fx.Tracer):
    """symbolic_trace, with user subclasses of conv and BN kept as module calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase,
                              nn.Linear)) or super().is_leaf_module(m, qualname)


# --- Small modules for the forms ---------------------------------------------------

class Functional(nn.Module):
    """Parameters used through functional calls written in different ways."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, bn = self.conv, self.bn
        if self.style == "kwargs":
            y = F.conv2d(x, c.weight, bias=c.bias, stride=2, padding=1)
            return F.batch_norm(y, bn.running_mean, bn.running_var, weight=bn.weight,
                                bias=bn.bias, training=False, eps=1e-3)
        if self.style == "three_args":
            y = F.conv2d(x, c.weight, c.bias, padding=1)
            return F.batch_norm(y, bn.running_mean, bn.running_var)
        if self.style == "torch_batch_norm":  # aten argument order
            y = torch.conv2d(x, c.weight, None, 1, "same")
            return torch.batch_norm(y, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    False, 0.1, 1e-5, False)
        raise AssertionError(self.style)


class CalledTwice(nn.Module):
    """One conv module, two calls; only the first call's output feeds a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)).relu())


class MultiUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Linear3d(nn.Module):
    """(N, C, L) → linear on L → BatchNorm1d on C. Shapes fit (L_out == C) but the
    BN channel axis is 1 while linear's output features are the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class ActBN(nn.BatchNorm2d):
    """A BN subclass whose forward adds an activation (timm's BatchNormAct2d does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class PlainBN(nn.BatchNorm2d):
    """A BN subclass with the stock forward."""


class TransposeOutputSize(nn.Module):
    def __init__(self, style: str = "keyword") -> None:
        super().__init__()
        self.style = style
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "keyword":
            return self.bn(self.up(x, output_size=[14, 12]))
        if self.style == "positional":
            return self.bn(self.up(x, [14, 12]))
        if self.style == "none":  # the same call as self.up(x)
            return self.bn(self.up(x, output_size=None))
        if self.style == "input_keyword":
            return self.bn(self.up(input=x))
        raise AssertionError(self.style)


class FunctionalTranspose(nn.Module):
    """``F.conv_transpose2d`` with ``output_padding`` (and the rest) by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.up.weight, bias=self.up.bias, stride=2, padding=1,
                               output_padding=1, groups=1, dilation=1)
        return self.bn(y)


class FunctionalIN(nn.Module):
    """``F.instance_norm`` / ``torch.instance_norm`` written in different ways. Its
    argument order is BatchNorm's, but ``use_input_stats`` defaults to True (batch
    statistics): a call that leaves it out must not be rewritten as running statistics."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(4, 6, 3)
        self.norm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, n = self.conv(x), self.norm
        if self.style == "running":
            return F.instance_norm(y, n.running_mean, n.running_var, n.weight, n.bias, False,
                                   0.1, 1e-3)
        if self.style == "kwargs":
            return F.instance_norm(y, running_mean=n.running_mean, running_var=n.running_var,
                                   weight=n.weight, use_input_stats=False, eps=1e-3)
        if self.style == "default_flag":  # use_input_stats left out: True
            return F.instance_norm(y, n.running_mean, n.running_var, n.weight, n.bias)
        if self.style == "kwargs_default_flag":
            return F.instance_norm(y, running_mean=n.running_mean, running_var=n.running_var,
                                   eps=1e-3)
        if self.style == "no_stats":
            return F.instance_norm(y, weight=n.weight, bias=n.bias)
        if self.style == "torch_instance_norm":  # aten argument order
            return torch.instance_norm(y, n.weight, n.bias, n.running_mean, n.running_var,
                                       False, 0.1, 1e-5, False)
        raise AssertionError(self.style)


class CustomIN(nn.InstanceNorm2d):
    """An InstanceNorm subclass whose forward adds an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def inorm(d: int, channels: int = 6, affine: bool = True,
          track_running_stats: bool = True) -> nn.Module:
    """``nn.InstanceNorm{d}d``; with running statistics, by default (foldable in eval)."""
    return getattr(nn, f"InstanceNorm{d}d")(channels, affine=affine,
                                            track_running_stats=track_running_stats)


X2 = torch.randn(2, 4, 7, 6)


# --- Forms through Dynamo ---------------------------------------------------------------

@pytest.mark.parametrize("model,tuned", [
    pytest.param(Functional("kwargs"), 1, id="functional-kwargs"),
    pytest.param(Functional("three_args"), 1, id="functional-batch_norm-3-args"),
    pytest.param(Functional("torch_batch_norm"), 1, id="torch.batch_norm-aten-order"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding="same"), nn.BatchNorm2d(6)), 1,
                 id="conv2d-padding-same"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding="valid"), nn.BatchNorm2d(6)), 1,
                 id="conv2d-padding-valid"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                     nn.BatchNorm2d(6)), 1, id="conv2d-reflect"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular"),
                     nn.BatchNorm2d(6)), 1, id="conv2d-circular"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
                     nn.BatchNorm2d(6)), 1, id="conv2d-replicate"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2), nn.BatchNorm2d(6)),
                 1, id="conv2d-stride2-dilation2"),
    pytest.param(seq(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4)), 1,
                 id="conv2d-depthwise-nobias"),
    pytest.param(seq(nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
                     nn.BatchNorm2d(6)), 1, id="conv_transpose2d-output_padding-groups2"),
    # eval SyncBatchNorm is plain BN
    pytest.param(seq(nn.Conv2d(4, 6, 3), nn.SyncBatchNorm(6)), 1, id="conv2d-syncbn"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), PlainBN(6)), 1, id="conv2d-bn-subclass"),
    # inlined: BN then silu, both kept
    pytest.param(seq(nn.Conv2d(4, 6, 3), ActBN(6)), 1, id="conv2d-bn-act-subclass"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True)), 1,
                 id="conv2d-bn-relu-inplace"),
    pytest.param(TransposeOutputSize(), 1, id="conv_transpose2d-output_size"),
    pytest.param(FunctionalTranspose(), 1, id="F.conv_transpose2d-output_padding-kwarg"),
    pytest.param(CalledTwice(), 1, id="conv-module-called-twice"),
    # InstanceNorm with running statistics, in eval mode: a per-channel affine
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2)), 1, id="conv2d-instance_norm2d"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2, affine=False)), 1,
                 id="conv2d-instance_norm2d-no-affine"),
    pytest.param(seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), inorm(2)), 1,
                 id="conv_transpose2d-groups2-instance_norm2d"),
    pytest.param(FunctionalIN("running"), 1, id="F.instance_norm-running"),
    pytest.param(FunctionalIN("kwargs"), 1, id="F.instance_norm-kwargs"),
    pytest.param(FunctionalIN("torch_instance_norm"), 1, id="torch.instance_norm-aten-order"),
])
def test_dynamo_forms(model, tuned):
    _check(model, X2, tuned)


@pytest.mark.parametrize("kind", ["conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d"])
def test_dynamo_instance_norm_kinds(kind):
    conv = block(kind, groups=2)[0]
    _check(seq(conv, inorm(dims(kind))), sample(kind), tuned=1)


# --- Forms through symbolic_trace (module nodes) -----------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fx_module_kinds(kind):
    model = block(kind, groups=1 if kind == "linear" else 2)
    _check_fx(model, sample(kind), tuned=1)


@pytest.mark.parametrize("model,tuned,skipped", [
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6)),
                 1, {}, id="conv2d-reflect"),
    pytest.param(seq(nn.Conv2d(4, 6, 3, padding="same", dilation=2), nn.BatchNorm2d(6)), 1, {},
                 id="conv2d-same-dilation2"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), nn.SyncBatchNorm(6)), 1, {}, id="conv2d-syncbn"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), PlainBN(6)), 1, {}, id="conv2d-bn-subclass"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), ActBN(6)), 0, {"custom_forward": 1},
                 id="conv2d-bn-act-subclass-custom-forward"),
    pytest.param(CalledTwice(), 1, {}, id="conv-module-called-twice"),
    pytest.param(MultiUser(), 0, {"conv_multi_user": 1}, id="conv-multi-user"),
    pytest.param(TransposeOutputSize(), 0, {"output_size": 1},
                 id="conv_transpose2d-output_size"),
    pytest.param(TransposeOutputSize("positional"), 0, {"output_size": 1},
                 id="conv_transpose2d-output_size-positional"),
    pytest.param(TransposeOutputSize("none"), 1, {}, id="conv_transpose2d-output_size-None"),
    pytest.param(TransposeOutputSize("input_keyword"), 1, {},
                 id="conv_transpose2d-input-by-keyword"),
    pytest.param(Functional("kwargs"), 1, {}, id="functional-kwargs"),
    pytest.param(Functional("torch_batch_norm"), 1, {}, id="torch.batch_norm-aten-order"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2)), 1, {}, id="conv2d-instance_norm2d"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2, track_running_stats=False)), 0,
                 {"no_running_stats": 1}, id="instance_norm2d-no-running-stats"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), CustomIN(6, track_running_stats=True)), 0,
                 {"custom_forward": 1}, id="instance_norm2d-subclass-custom-forward"),
    pytest.param(FunctionalIN("default_flag"), 0, {"input_stats": 1},
                 id="F.instance_norm-default-flag"),
])
def test_fx_forms(model, tuned, skipped):
    _check_fx(model, X2, tuned, skipped)


def _with_instance_norm(kind: str) -> nn.Module:
    return zoo.randomize_bn(seq(block(kind, groups=2)[0], inorm(dims(kind)))).eval()


@pytest.mark.parametrize("model,kind,norm", [
    pytest.param(block("conv2d", groups=2), "conv2d", "batch_norm", id="conv2d"),
    pytest.param(block("conv_transpose2d", groups=2), "conv_transpose2d", "batch_norm",
                 id="conv_transpose2d"),
    pytest.param(block("conv1d", groups=2), "conv1d", "batch_norm", id="conv1d"),
    pytest.param(block("linear"), "linear", "batch_norm", id="linear"),
    # aten.instance_norm: aten.batch_norm's order, use_input_stats=False in eval
    pytest.param(_with_instance_norm("conv2d"), "conv2d", "instance_norm",
                 id="conv2d-instance_norm"),
    pytest.param(_with_instance_norm("conv_transpose1d"), "conv_transpose1d", "instance_norm",
                 id="conv_transpose1d-instance_norm"),
])
def test_exported_aten_graph(model, kind, norm):
    """torch.export graphs hold aten ops (aten.conv2d, aten.batch_norm, …)."""
    model = model.double()
    x = sample(kind, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).module()
    assert f"aten.{norm}" in format_graph(gm)
    decided = convbn_pass.apply(gm, [x], policy="memory")
    assert [(d.norm, d.reason) for d in decided] == [(norm, "tuned")]
    assert norm not in format_graph(gm)
    errs = errors(Step(gm, x), Step(model, x))
    assert max(errs.values()) <= TOL, errs


def _make_fx(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The model traced by make_fx: parameters and buffers as inputs, aten ops,
    BatchNorm as ``aten.native_batch_norm`` with three getitems, two of them unused."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(tensors, values)), (x,))
    return make_fx(f)(x, *tensors.values()), list(tensors.values())


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_make_fx_aten_graph(kind):
    """make_fx graphs: aten.convolution (transposed as an argument) and
    aten.native_batch_norm, whose unused save_mean/save_invstd getitems go with it."""
    model = block(kind, groups=2).double()
    x = sample(kind, dtype=torch.float64)
    gm, tensors = _make_fx(model, x)
    assert "aten.native_batch_norm" in format_graph(gm)
    decided = convbn_pass.apply(gm, [x, *tensors], policy="memory")
    assert [(d.op, d.reason) for d in decided] == [("convolution", "tuned")]
    assert "batch_norm" not in format_graph(gm) and "getitem" not in format_graph(gm)
    # The parameters are graph inputs here: gradients are taken with respect to them.
    inputs = [x.clone().requires_grad_(True),
              *(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)]
    out = gm(*inputs)
    upstream = torch.randn_like(out)
    n_params = len(list(model.parameters()))  # W, b, γ, β come first among the inputs
    grads = torch.autograd.grad((out * upstream).sum(), inputs[:1 + n_params])
    ref_x = x.clone().requires_grad_(True)
    ref_out = model(ref_x)
    ref_grads = torch.autograd.grad((ref_out * upstream).sum(), [ref_x, *model.parameters()])
    assert rel_err(out, ref_out) <= TOL
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= TOL


def test_make_fx_instance_norm_is_no_candidate():
    """make_fx decomposes InstanceNorm into a reshape of the conv output to
    ``[1, N·C, …]`` and a batch norm over N·C channels: the conv's user is the reshape,
    so there is no pair, and nothing is rewritten."""
    model = _with_instance_norm("conv2d").double()
    x = sample("conv2d", dtype=torch.float64)
    gm, tensors = _make_fx(model, x)
    text = format_graph(gm)
    assert "aten.native_batch_norm" in text and "aten.view" in text
    assert convbn_pass.apply(gm, [x, *tensors], policy="memory") == []
    assert format_graph(gm) == text


def test_make_fx_used_save_mean_is_left_alone():
    """A used second output (save_mean) keeps the BatchNorm: bn_extra_outputs."""
    def build(g, t):
        x = g.placeholder("x")
        y = g.call_function(torch.ops.aten.convolution.default,
                            (x, t["0.weight"], t["0.bias"], [1, 1], [0, 0], [1, 1], False,
                             [0, 0], 1))
        bn = g.call_function(torch.ops.aten.native_batch_norm.default,
                             (y, t["1.weight"], t["1.bias"], t["1.running_mean"],
                              t["1.running_var"], False, 0.1, 1e-5))
        g.output((g.call_function(operator.getitem, (bn, 0)),
                  g.call_function(operator.getitem, (bn, 1))))
    assert _reasons(_graph(build)) == ["bn_extra_outputs"]


# --- Guards: each leaves the block alone, with its reason, and the numbers right --------

@pytest.mark.parametrize("model,x,skipped", [
    pytest.param(seq(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)), X2,
                 "no_running_stats", id="no_running_stats"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2, track_running_stats=False)), X2,
                 "no_running_stats", id="instance_norm-no_running_stats"),
    # Rewritten as if running statistics, these would give wrong numbers.
    pytest.param(FunctionalIN("default_flag"), X2, "input_stats",
                 id="F.instance_norm-use_input_stats-default"),
    pytest.param(FunctionalIN("kwargs_default_flag"), X2, "input_stats",
                 id="F.instance_norm-kwargs-use_input_stats-default"),
    pytest.param(FunctionalIN("no_stats"), X2, "no_running_stats",
                 id="F.instance_norm-no-running-stats"),
    pytest.param(MultiUser(), X2, "conv_multi_user", id="conv_multi_user"),
    # The built-in PyTorch pass fuses this one and returns wrong values.
    pytest.param(Linear3d(), torch.randn(3, 6, 5), "linear_axis", id="linear_axis"),
])
def test_guards_dynamo(model, x, skipped):
    _check(model, x, tuned=0, skipped={skipped: 1})


@pytest.mark.parametrize("model,skipped", [
    pytest.param(block("conv2d"), "bn_training", id="batch_norm"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2)), "input_stats", id="instance_norm"),
])
def test_guard_training_mode(model, skipped):
    """Training mode: batch statistics, running statistics updated alike."""
    _check(model, X2, tuned=0, skipped={skipped: 1}, train=True)


def test_guard_shape_unknown():
    """A symbolic_trace graph has no shapes: linear→BN1d cannot be told from the
    3-D case without example inputs."""
    _check_fx(block("linear"), sample("linear"), 0, {"shape_unknown": 1}, example=False)


def _graph(build) -> fx.GraphModule:
    """A hand-built graph over a conv→BN module pair's tensors."""
    root = block("conv2d").double()
    graph = fx.Graph()
    build(graph, {n: graph.get_attr(n) for n in
                  ("0.weight", "0.bias", "1.running_mean", "1.running_var", "1.weight",
                   "1.bias")})
    return fx.GraphModule(root, graph)


def _reasons(gm: fx.GraphModule) -> list[str]:
    return [d.reason for d in convbn_pass.apply(gm, policy="memory")]


def _bn(g, y, t):
    return g.call_function(F.batch_norm, (y, t["1.running_mean"], t["1.running_var"],
                                          t["1.weight"], t["1.bias"]))


def _conv_groups_from_input(g, t):
    x, groups = g.placeholder("x"), g.placeholder("groups")
    g.output(_bn(g, g.call_function(F.conv2d, (x, t["0.weight"], t["0.bias"], 1, 0, 1, groups)),
                 t))


def _weight_without_shape(g, t):
    x, weight = g.placeholder("x"), g.placeholder("weight")  # no recorded shape
    g.output(_bn(g, g.call_function(F.conv2d, (x, weight)), t))


def _transposed_from_input(g, t):
    x, transposed = g.placeholder("x"), g.placeholder("transposed")
    y = g.call_function(torch.ops.aten.convolution.default,
                        (x, t["0.weight"], t["0.bias"], [1, 1], [0, 0], [1, 1], transposed,
                         [0, 0], 1))
    g.output(_bn(g, y, t))


@pytest.mark.parametrize("build,detail", [
    pytest.param(_conv_groups_from_input, "the conv's groups is not a constant",
                 id="groups-computed"),
    pytest.param(_weight_without_shape, "(weight or running_mean)", id="weight-shape-unrecorded"),
    pytest.param(_transposed_from_input,
                 "(convolution's transposed flag is not a constant in the graph)",
                 id="convolution-transposed-computed"),
])
def test_guard_shape_unknown_causes(build, detail):
    """Every other cause of shape_unknown (the linear one is above), each in a
    hand-built graph."""
    (decision,) = convbn_pass.apply(_graph(build), policy="memory")
    assert decision.reason == "shape_unknown" and detail in decision.detail


def _module_graph(conv: nn.Module, *extra: object, **kwargs: object) -> fx.GraphModule:
    """``bn(conv(x, *extra, **kwargs))`` as module calls: a graph eager could not run
    when the conv's forward takes no such argument."""
    root = seq(conv, nn.BatchNorm2d(6)).double()
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("0", (x, *extra), kwargs)
    graph.output(graph.call_module("1", (y,)))
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("gm,reason", [
    pytest.param(_module_graph(nn.ConvTranspose2d(4, 6, 3), output_size=[9, 8]), "output_size",
                 id="conv_transpose-output_size"),
    pytest.param(_module_graph(nn.Conv2d(4, 6, 3), [9, 8]), "module_call_args",
                 id="conv-extra-positional"),
    pytest.param(_module_graph(nn.Conv2d(4, 6, 3), output_size=[9, 8]), "module_call_args",
                 id="conv-output_size-keyword"),
    pytest.param(_module_graph(nn.ConvTranspose2d(4, 6, 3), scale=2), "module_call_args",
                 id="conv_transpose-unknown-keyword"),
])
def test_guard_module_call_args(gm, reason):
    """Only a ConvTranspose's output_size is output_size; any other argument the
    module's forward does not take is module_call_args."""
    (decision,) = convbn_pass.apply(gm, policy="memory")
    assert decision.reason == reason
    assert decision.detail.startswith(convbn_pass.REASONS[reason])


def test_guard_training_not_constant():
    def build(g, t):
        x, flag = g.placeholder("x"), g.placeholder("training")
        y = g.call_function(F.conv2d, (x, t["0.weight"], t["0.bias"]))
        g.output(g.call_function(F.batch_norm, (y, t["1.running_mean"], t["1.running_var"],
                                                t["1.weight"], t["1.bias"], flag)))
    assert _reasons(_graph(build)) == ["training_not_constant"]


def test_guard_bn_extra_outputs():
    def build(g, t):
        x = g.placeholder("x")
        y = g.call_function(torch.ops.aten.conv2d.default, (x, t["0.weight"], t["0.bias"]))
        bn = g.call_function(torch.ops.aten._native_batch_norm_legit_no_training.default,
                             (y, t["1.weight"], t["1.bias"], t["1.running_mean"],
                              t["1.running_var"], 0.1, 1e-5))
        g.output((g.call_function(operator.getitem, (bn, 0)),
                  g.call_function(operator.getitem, (bn, 1))))
    assert _reasons(_graph(build)) == ["bn_extra_outputs"]


def test_guard_channel_mismatch():
    """A BN over fewer channels than the conv gives: eager would raise; the rewrite
    would broadcast silently, so it must not happen."""
    def build(g, t):
        x = g.placeholder("x")
        y = g.call_function(F.conv2d, (x, t["0.weight"], t["0.bias"]))
        first = g.call_function(operator.getitem, (t["1.running_mean"], slice(0, 1)))
        g.output(g.call_function(F.batch_norm, (y, first, first)))
    gm = _graph(build)
    for node in gm.graph.nodes:  # the shape a traced graph would carry
        if node.target is operator.getitem:
            node.meta["example_value"] = torch.empty(1)
    assert _reasons(gm) == ["channel_mismatch"]


@pytest.mark.parametrize("model", [
    pytest.param(block("conv2d"), id="batch_norm"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2)), id="instance_norm"),
])
def test_apply_guards_module_mode(model):
    """apply() read the norm modules' mode when it rewrote: switching one to training
    mode afterwards raises rather than silently staying in Eval mode."""
    model = zoo.randomize_bn(model).eval()
    gm = fx.symbolic_trace(model)
    convbn_pass.apply(gm, [X2], policy="memory")
    gm(X2)
    gm.get_submodule("1").train()
    with pytest.raises(RuntimeError, match="training mode"):
        gm(X2)


# --- The rows' defaults are the ops' own --------------------------------------------------

def _declared_defaults(target: object, params: tuple[str, ...]) -> dict[str, object] | None:
    """The defaults an op declares, by the row's canonical names (position), or None
    where the op does not say (a builtin without a Python signature)."""
    if isinstance(target, torch._ops.OpOverload):
        return {name: arg.default_value for name, arg in zip(params, target._schema.arguments)
                if arg.has_default_value()}
    try:
        signature = inspect.signature(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return {name: p.default for name, p in zip(params, signature.parameters.values())
            if p.default is not inspect.Parameter.empty}


def _target_id(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{target.__module__}.{target.__name__}"  # type: ignore[attr-defined]


_NORM_TARGETS = [pytest.param(row, target, id=_target_id(target))
                 for row in forms.NORM_FORMS for target in row.targets]


@pytest.mark.parametrize("row,target", _NORM_TARGETS)
def test_norm_row_defaults_are_the_ops(row, target):
    """A row's defaults, and so the statistics a call that leaves the flag out reads,
    are those its op declares: F.batch_norm's training=False, F.instance_norm's
    use_input_stats=True."""
    declared = _declared_defaults(target, row.params)
    if declared is None:
        assert not row.defaults  # builtins such as torch.batch_norm take every argument
    else:
        assert dict(row.defaults) == declared


_F_BN_ROW, _F_IN_ROW = forms.norm_form(F.batch_norm), forms.norm_form(F.instance_norm)


@pytest.mark.parametrize("row,args,kwargs,batch", [
    pytest.param(_F_BN_ROW, ("y", "μ", "σ²"), {}, False, id="F.batch_norm-default"),
    pytest.param(_F_BN_ROW, ("y", "μ", "σ²"), {"training": True}, True,
                 id="F.batch_norm-training"),
    pytest.param(_F_IN_ROW, ("y", "μ", "σ²"), {}, True, id="F.instance_norm-default"),
    pytest.param(_F_IN_ROW, ("y", "μ", "σ²", None, None, False), {}, False,
                 id="F.instance_norm-running"),
    pytest.param(forms.norm_form(torch.ops.aten._native_batch_norm_legit_no_training.default),
                 ("y", "γ", "β", "μ", "σ²", 0.1, 1e-5), {}, False, id="no-flag"),
    # A row whose flag, set, means running statistics.
    pytest.param(dataclasses.replace(_F_BN_ROW, flag_means_batch=False), ("y", "μ", "σ²"),
                 {"training": True}, False, id="flag-means-running"),
])
def test_norm_row_batch_stats(row, args, kwargs, batch):
    assert row.batch_stats(row.bind(args, kwargs)) is batch


@pytest.mark.parametrize("row,target", [
    pytest.param(row, target, id=str(target)) for row in forms.CONV_FORMS
    for target in row.targets if isinstance(target, torch._ops.OpOverload)])
def test_conv_row_defaults_are_the_ops(row, target):
    declared = _declared_defaults(target, row.params)
    assert all(declared[name] == value for name, value in row.defaults.items())


# --- Deploy mode folds what the rows read ---------------------------------------------------

@pytest.mark.parametrize("model,x,folded", [
    pytest.param(block("conv2d"), X2, 1, id="batch_norm"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2)), X2, 1, id="instance_norm"),
    pytest.param(seq(nn.ConvTranspose1d(4, 6, 3, groups=2), inorm(1, affine=False)),
                 sample("conv_transpose1d"), 1, id="conv_transpose1d-instance_norm-no-affine"),
    pytest.param(seq(nn.Conv2d(4, 6, 3), inorm(2, track_running_stats=False)), X2, 0,
                 id="instance_norm-no-running-stats"),
])
def test_deploy_fold(model, x, folded):
    model = zoo.randomize_bn(model).eval().double()
    x = x.double()
    deployed = deploy.fold(model, x)
    assert sum(isinstance(m, nn.Identity) for m in deployed.modules()) == folded
    assert rel_err(deployed(x), model(x)) <= TOL


# --- Idempotence ----------------------------------------------------------------------------

def test_idempotent():
    model = zoo.randomize_bn(zoo.build("resnet_tiny")[0]).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fx.symbolic_trace(model)
    first = convbn_pass.apply(gm, [x], policy="memory")
    text = format_graph(gm)
    second = convbn_pass.apply(gm, [x], policy="memory")
    assert sum(d.tuned for d in first) == 12
    assert second == [] and format_graph(gm) == text


def test_idempotent_via_dynamo():
    """The pass run on a graph it already rewrote (e.g. installed twice) does nothing."""
    seen = []
    model = zoo.randomize_bn(block("conv2d"))

    def twice(rewrite):
        seen.append(convbn_pass.core.rewrite.run(rewrite.after, "memory"))
    torch.compile(model, backend=backends.light("memory", on_graph=twice))(X2)
    assert seen == [[]]
