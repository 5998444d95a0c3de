"""Every Conv/Linear and normalisation form the pass understands, one row each.

This is the one place a form is added. ``match`` reads nodes through these rows,
``rewrite`` builds the Tune-mode computation from them and ``deploy`` folds
modules with them; none of them names an op, a module class or a BatchNorm
variant of its own.

A :class:`ConvForm` row says how to read a conv, transposed conv or linear
call: its canonical signature, whether its weight is transposed, the output
axis that holds its channels, the graph targets and module class it covers,
and how a module of that class is written as a functional call.

A :class:`NormForm` row says how to read what normalises the conv's output and
how that gives the Tune-mode terms ``c``, ``μ̂`` and ``β`` (see ``algebra.py``)::

    batch_norm, instance_norm:  c = γ / sqrt(σ̂² + ε)   μ̂ = running_mean   β = bias
    affine:                     c = scale               μ̂ = 0              β = shift

Each row carries the op's own defaults and the name of the flag that chooses
batch statistics (``training`` for BatchNorm, ``use_input_stats`` for
InstanceNorm, whose default is True), so a call that leaves the flag out is read
as the op would run it; the skip reason for batch statistics is the row's too.

Example: ``aten.native_batch_norm`` (what make_fx graphs hold) was added as one
row of :data:`NORM_FORMS`, plus its tests; a row reads a call's arguments by name,
the op's own defaults filled in::

    >>> row = _bn_row(_T_BN[:8], aten.native_batch_norm.default, output_index=0)
    >>> norm_form(aten.native_batch_norm.default) == row
    True
    >>> bound = row.bind(("y", "γ", "β", "μ̂", "σ̂²", False, 0.1, 1e-5), {})
    >>> bound["running_mean"], row.batch_stats(bound), bound["eps"]
    ('μ̂', False, 1e-05)

``F.instance_norm`` takes BatchNorm's order, but a call that leaves its flag out
normalises with batch statistics, and its row says so::

    >>> instance = norm_form(F.instance_norm)
    >>> instance.batch_stats(instance.bind(("y", "μ̂", "σ̂²"), {}))
    True
    >>> instance.batch_stats(instance.bind(("y", "μ̂", "σ̂²"), {"use_input_stats": False}))
    False
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import types
from typing import Any, Callable, Generic, Mapping, NamedTuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import algebra
from .records import Reason

__all__ = ["ConvForm", "NormForm", "TuneTerms", "ModuleCall", "Follow",
           "CONV_FORMS", "NORM_FORMS", "conv_form", "conv_module_form", "norm_form",
           "norm_module_form", "AFFINE", "follow_kind"]

aten = torch.ops.aten

# ---------------------------------------------------------------------------
# Canonical signatures: each op's arguments are bound to these names once.
# ---------------------------------------------------------------------------

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
           "dilation")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation",
                "transposed", "output_padding", "groups")
_LINEAR = ("input", "weight", "bias")
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training",
         "momentum", "eps")
_T_BN = ("input", "weight", "bias", "running_mean", "running_var", "training",
         "momentum", "eps", "cudnn_enabled")
_BN_NO_TRAIN = ("input", "weight", "bias", "running_mean", "running_var", "momentum",
                "eps")
_F_IN = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
         "momentum", "eps")
_T_IN = ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats",
         "momentum", "eps", "cudnn_enabled")


def _mapping(**values: Any) -> Mapping[str, Any]:
    """A read-only mapping (rows are frozen and shared)."""
    return types.MappingProxyType(values)


NO_DEFAULTS: Mapping[str, Any] = _mapping()


def bind(args: tuple[Any, ...], kwargs: Mapping[str, Any], params: tuple[str, ...],
         defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by canonical name; those it leaves out take the row's
    ``defaults`` (the op's own: they differ between ops, e.g. ``F.batch_norm``'s
    ``training`` is False where ``F.instance_norm``'s ``use_input_stats`` is True)."""
    bound = dict(defaults)
    bound.update(zip(params, args))
    bound.update(kwargs)
    return bound


# ---------------------------------------------------------------------------
# Conv / linear rows.
# ---------------------------------------------------------------------------

class ModuleCall(NamedTuple):
    """A conv/linear module written as its functional call."""

    args: dict[str, Any]                 # non-tensor arguments by canonical name
    pad: tuple[int, ...] | None = None   # F.pad(input, pad, mode=pad_mode) first, if set
    pad_mode: str | None = None


def _conv_module_call(module: nn.Module) -> ModuleCall:
    assert isinstance(module, nn.modules.conv._ConvNd)
    args = {"stride": module.stride, "padding": module.padding,
            "dilation": module.dilation, "groups": module.groups}
    if module.padding_mode == "zeros":
        return ModuleCall(args)
    # nn.ConvNd pads explicitly first for reflect/replicate/circular modes.
    args["padding"] = (0,) * len(module.kernel_size)
    return ModuleCall(args, tuple(module._reversed_padding_repeated_twice), module.padding_mode)


def _conv_t_module_call(module: nn.Module) -> ModuleCall:
    assert isinstance(module, nn.modules.conv._ConvTransposeNd)
    return ModuleCall({"stride": module.stride, "padding": module.padding,
                       "output_padding": module.output_padding, "groups": module.groups,
                       "dilation": module.dilation})


def _linear_module_call(module: nn.Module) -> ModuleCall:
    return ModuleCall({})


@dataclasses.dataclass(frozen=True)
class ConvForm:
    name: str                        # the op kind printed: "conv2d", "conv_transpose1d", "linear"
    params: tuple[str, ...]          # canonical argument names, positional order
    transposed: bool                 # weight laid out [C_in, C_out/g, k…] (else [C_out, …])
    targets: tuple[Any, ...] = ()    # graph call targets (functions, aten overloads)
    module: type[nn.Module] | None = None   # the module class this row also reads
    module_call: Callable[[nn.Module], ModuleCall] | None = None
    channel_axis: int = 1            # the output axis that holds the channels
    transposed_arg: str | None = None  # aten.convolution: the argument that says transposed
    # The op's values for arguments a call leaves out (read-only).
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: NO_DEFAULTS,
                                                    hash=False)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return bind(args, kwargs, self.params, self.defaults)

    @property
    def functional(self) -> Callable[..., Any]:
        """The call that computes this op from canonical arguments."""
        return self.targets[0]

    def is_transposed(self, bound: Mapping[str, Any]) -> Any:
        """Whether this call is transposed (a graph node when the graph computes it)."""
        return bound[self.transposed_arg] if self.transposed_arg else self.transposed

    def groups(self, bound: Mapping[str, Any]) -> Any:
        return bound["groups"] if "groups" in self.params else 1


def _overloads(packet: Any) -> tuple[Any, ...]:
    return tuple(getattr(packet, name) for name in packet.overloads())


# The arguments the pass reads that a conv call may leave out (the rewrite keeps
# stride, padding and the rest as the call wrote them).
_CONV_DEFAULTS = _mapping(bias=None, groups=1)


def _conv_rows() -> tuple[ConvForm, ...]:
    rows = []
    for d in (1, 2, 3):
        conv, conv_t = f"conv{d}d", f"conv_transpose{d}d"
        rows.append(ConvForm(conv, _CONV, False,
                             (getattr(torch, conv), *_overloads(getattr(aten, conv))),
                             getattr(nn, f"Conv{d}d"), _conv_module_call,
                             defaults=_CONV_DEFAULTS))
        rows.append(ConvForm(conv_t, _CONV_T, True,
                             (getattr(torch, conv_t), *_overloads(getattr(aten, conv_t))),
                             getattr(nn, f"ConvTranspose{d}d"), _conv_t_module_call,
                             defaults=_CONV_DEFAULTS))
    rows.append(ConvForm("linear", _LINEAR, False, (F.linear, aten.linear.default),
                         nn.Linear, _linear_module_call, channel_axis=-1,
                         defaults=_mapping(bias=None)))
    rows.append(ConvForm("convolution", _CONVOLUTION, False, (aten.convolution.default,),
                         transposed_arg="transposed"))
    return tuple(rows)


CONV_FORMS: tuple[ConvForm, ...] = _conv_rows()
_CONV_BY_TARGET = {target: row for row in CONV_FORMS for target in row.targets}


def conv_form(target: Any) -> ConvForm | None:
    """The row of a graph call target, or None."""
    try:
        return _CONV_BY_TARGET.get(target)
    except TypeError:  # an unhashable target
        return None


def conv_module_form(module: nn.Module | type) -> ConvForm | None:
    """The row of a conv/linear module (or class), its subclasses included, or None."""
    cls = module if isinstance(module, type) else type(module)
    for row in CONV_FORMS:  # a loop: see norm_module_form
        if row.module is not None and issubclass(cls, row.module):
            return row
    return None


# ---------------------------------------------------------------------------
# Normalisation rows.
# ---------------------------------------------------------------------------

T = TypeVar("T")


class TuneTerms(NamedTuple, Generic[T]):
    """What a normalisation contributes to ``W′ = W·c`` and ``b′ = β + (b − μ̂)·c``."""

    scale: T         # c, [C_out]
    mean: T | None   # μ̂ (None: 0)
    shift: T | None  # β (None: 0)


# ``call(fn, *args)``: graph.call_function when building a graph, fn(*args) on tensors.
Call = Callable[..., Any]


def _batch_norm_terms(call: Call, t: Mapping[str, Any], eps: float) -> TuneTerms[Any]:
    return TuneTerms(call(algebra.bn_scale, t["running_var"], t["weight"], eps),
                     t["running_mean"], t["bias"])


def _affine_terms(call: Call, t: Mapping[str, Any], eps: float) -> TuneTerms[Any]:
    return TuneTerms(call(algebra.channel_scale, t["scale"]), None, t.get("shift"))


@dataclasses.dataclass(frozen=True)
class NormForm:
    name: str                        # "batch_norm", "instance_norm", or "affine" (frozen BN)
    params: tuple[str, ...]          # canonical argument names (call rows), positional order
    tensors: tuple[str, ...]         # the tensor arguments the terms read
    required: tuple[str, ...]        # of those, the ones it cannot do without
    channels: str                    # the per-channel tensor that gives C and the dtype
    terms: Callable[[Call, Mapping[str, Any], float], TuneTerms[Any]]
    targets: tuple[Any, ...] = ()    # graph call targets
    modules: tuple[type[nn.Module], ...] = ()   # module classes read by attribute
    forwards: tuple[Callable[..., Any], ...] = ()  # their forward, as stock (else custom)
    output_index: int | None = None  # ops returning a tuple: the index of the output
    axis: int | None = 1             # the channel axis it normalises (None: the conv's)
    # The op's values for arguments a call leaves out (read-only).
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: NO_DEFAULTS,
                                                    hash=False)
    stats_flag: str | None = None    # the argument that chooses the statistics ("training",
    #                                  "use_input_stats"); None: always the running ones
    flag_means_batch: bool = True    # the flag set means batch statistics (False: running)
    batch_reason: Reason = Reason.BN_TRAINING  # the skip reason when batch statistics are used
    # Module rows: whether the module's stock forward normalises with batch statistics.
    module_batch_stats: Callable[[nn.Module], bool] | None = None

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return bind(args, kwargs, self.params, self.defaults)

    def batch_stats(self, bound: Mapping[str, Any]) -> Any:
        """Whether a call (its bound arguments) normalises with batch statistics: a
        bool, or the flag itself (a graph node) when the graph computes it."""
        if self.stats_flag is None:
            return False
        flag = bound[self.stats_flag]
        if isinstance(flag, (bool, int)):
            return bool(flag) == self.flag_means_batch
        return flag


_BN_TENSORS = ("running_mean", "running_var", "weight", "bias")
_BN_STATS = ("running_mean", "running_var")


def _bn_row(params: tuple[str, ...], *targets: Any, defaults: Mapping[str, Any] = NO_DEFAULTS,
            stats_flag: str | None = "training", output_index: int | None = None) -> NormForm:
    return NormForm("batch_norm", params, _BN_TENSORS, _BN_STATS, "running_mean",
                    _batch_norm_terms, targets=targets, output_index=output_index,
                    defaults=defaults, stats_flag=stats_flag)


def _instance_norm_row(params: tuple[str, ...], *targets: Any,
                       defaults: Mapping[str, Any] = NO_DEFAULTS) -> NormForm:
    # Running statistics make InstanceNorm the same per-channel affine as BatchNorm.
    return NormForm("instance_norm", params, _BN_TENSORS, _BN_STATS, "running_mean",
                    _batch_norm_terms, targets=targets, defaults=defaults,
                    stats_flag="use_input_stats", batch_reason=Reason.INPUT_STATS)


def _batch_norm_module_stats(module: nn.Module) -> bool:
    # nn.BatchNorm's forward: batch statistics in training mode, or without buffers.
    return bool(module.training or (module.running_mean is None and module.running_var is None))


def _instance_norm_module_stats(module: nn.Module) -> bool:
    # nn.InstanceNorm's forward: use_input_stats = training or not track_running_stats.
    return bool(module.training or not module.track_running_stats)


_BN_MODULE = nn.modules.batchnorm._BatchNorm
_IN_MODULE = nn.modules.instancenorm._InstanceNorm

NORM_FORMS: tuple[NormForm, ...] = (
    _bn_row(_F_BN, F.batch_norm, defaults=_mapping(weight=None, bias=None, training=False,
                                                    momentum=0.1, eps=1e-5)),
    _bn_row(_T_BN, torch.batch_norm, aten.batch_norm.default),
    _bn_row(_BN_NO_TRAIN, aten._native_batch_norm_legit_no_training.default,
            stats_flag=None, output_index=0),
    # make_fx / AOT-level graphs: (output, save_mean, save_invstd)
    _bn_row(_T_BN[:8], aten.native_batch_norm.default, output_index=0),
    # nn.BatchNorm1d/2d/3d, SyncBatchNorm and subclasses that keep the stock forward
    NormForm("batch_norm", (), _BN_TENSORS, _BN_STATS, "running_mean", _batch_norm_terms,
             modules=(_BN_MODULE,), forwards=(_BN_MODULE.forward, nn.SyncBatchNorm.forward),
             module_batch_stats=_batch_norm_module_stats),
    # BatchNorm's argument order, but batch statistics unless use_input_stats=False
    _instance_norm_row(_F_IN, F.instance_norm,
                       defaults=_mapping(running_mean=None, running_var=None, weight=None,
                                         bias=None, use_input_stats=True, momentum=0.1,
                                         eps=1e-5)),
    _instance_norm_row(_T_IN, torch.instance_norm, aten.instance_norm.default),
    # nn.InstanceNorm1d/2d/3d: foldable in eval mode with track_running_stats=True
    NormForm("instance_norm", (), _BN_TENSORS, _BN_STATS, "running_mean", _batch_norm_terms,
             modules=(_IN_MODULE,), forwards=(_IN_MODULE.forward,),
             batch_reason=Reason.INPUT_STATS, module_batch_stats=_instance_norm_module_stats),
)

# ``conv(x) * scale (+ shift)`` with per-channel scale and shift: what torchvision's
# and detectron2's FrozenBatchNorm2d become once traced. Matched as a pattern.
AFFINE = NormForm("affine", (), ("scale", "shift"), ("scale",), "scale", _affine_terms, axis=None)

_NORM_BY_TARGET = {target: row for row in NORM_FORMS for target in row.targets}


def norm_form(target: Any) -> NormForm | None:
    """The row of a graph call target, or None."""
    try:
        return _NORM_BY_TARGET.get(target)
    except TypeError:
        return None


def norm_module_form(module: nn.Module) -> NormForm | None:
    """The row of a normalisation module, or None. (A loop, not ``next(genexpr, None)``:
    a tuned model's forward calls this and conv_module_form under ``torch.compile``, and
    Dynamo 2.8 breaks the graph on ``next`` with a default.)"""
    for row in NORM_FORMS:
        if row.modules and isinstance(module, row.modules):
            return row
    return None


# Per-channel affine ops, with the method names of the same ops.
MUL_OPS = (operator.mul, torch.mul, aten.mul.Tensor)
ADD_OPS = (operator.add, torch.add, aten.add.Tensor)
MUL_METHODS, ADD_METHODS = ("mul",), ("add",)


# ---------------------------------------------------------------------------
# Ops the policy looks at after a block.
# ---------------------------------------------------------------------------

class Follow(enum.Enum):
    """Kinds of ops that consume a block's output, where the policy cares."""

    RELU = "relu"
    HARDTANH = "hardtanh"   # ReLU6 included
    MAX_POOL = "max_pool"


def _with_overloads(*packets: Any) -> tuple[Any, ...]:
    return tuple(op for packet in packets for op in _overloads(packet))


_FOLLOW_FUNCTIONS: dict[Any, Follow] = {
    **{fn: Follow.RELU for fn in (F.relu, F.relu_, torch.relu, torch.relu_,
                                  *_with_overloads(aten.relu, aten.relu_))},
    **{fn: Follow.HARDTANH for fn in (F.relu6, F.hardtanh, F.hardtanh_,
                                      torch._C._nn.hardtanh, torch._C._nn.hardtanh_,
                                      *_with_overloads(aten.hardtanh, aten.hardtanh_,
                                                       aten.relu6))},
    **{fn: Follow.MAX_POOL for fn in (
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
        F.max_pool2d_with_indices, F.max_pool3d_with_indices, torch.max_pool1d,
        torch.max_pool2d, torch.max_pool3d, torch._C._nn.max_pool2d_with_indices,
        torch._C._nn.max_pool3d_with_indices,
        *_with_overloads(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d,
                         aten.max_pool2d_with_indices, aten.max_pool3d_with_indices))},
}
_FOLLOW_METHODS = {"relu": Follow.RELU, "relu_": Follow.RELU}
_FOLLOW_MODULES: tuple[tuple[type[nn.Module], Follow], ...] = (
    (nn.ReLU, Follow.RELU), (nn.Hardtanh, Follow.HARDTANH),  # nn.ReLU6 is a Hardtanh
    (nn.MaxPool1d, Follow.MAX_POOL), (nn.MaxPool2d, Follow.MAX_POOL),
    (nn.MaxPool3d, Follow.MAX_POOL),
)


def follow_kind(op: str, target: Any, module: nn.Module | None = None) -> Follow | None:
    """The kind of a node (``op`` and ``target`` as in torch.fx; ``module`` for
    ``call_module``), or None for anything else."""
    if op == "call_method":
        return _FOLLOW_METHODS.get(str(target))
    if op == "call_module":
        return next((kind for cls, kind in _FOLLOW_MODULES if isinstance(module, cls)), None)
    if op != "call_function":
        return None
    try:
        return _FOLLOW_FUNCTIONS.get(target)
    except TypeError:
        return None
