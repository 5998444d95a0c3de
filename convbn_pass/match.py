"""Find Conv→BatchNorm candidates in an FX graph, in every form the graph may hold.

A *candidate* is a BatchNorm node whose input is produced by a conv, transposed
conv or linear node, or a per-channel affine ``conv(x) * scale + shift`` (what a
FrozenBatchNorm2d becomes once traced; the same algebra with nothing to train). Each candidate is read into named fields once (no argument
indices past this module) and carries either ``reject=None`` (it may be
rewritten) or a stable reject key with a sentence saying why not.

Forms understood:

- functional nodes, Dynamo's default: ``torch.conv2d(x, w, b, stride, …)``,
  ``F.conv_transpose2d``, ``F.linear``, ``F.batch_norm`` (3 to 8 arguments, any
  of them by keyword), ``torch.batch_norm``;
- aten nodes from ``make_fx``/export-style graphs: ``aten.conv2d``,
  ``aten.convolution``, ``aten.linear``, ``aten.batch_norm``,
  ``aten._native_batch_norm_legit_no_training``;
- module nodes from ``torch.fx.symbolic_trace`` (or Dynamo with module inlining
  off): ``nn.Conv*``, ``nn.ConvTranspose*``, ``nn.Linear`` and any ``_BatchNorm``
  subclass whose ``forward`` is the stock one.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Candidate", "ConvSite", "BNSite", "find_candidates", "REASONS"]

aten = torch.ops.aten

# Stable reject keys and the sentence each stands for. Counters, records, the
# CLI and the tests all use these keys.
REASONS: dict[str, str] = {
    "bn_training": "BatchNorm runs in training mode (batch statistics)",
    "training_not_constant": "BatchNorm's training flag is not a constant in the graph",
    "no_running_stats": "BatchNorm has no running statistics",
    "conv_multi_user": "the conv output has users other than the BatchNorm",
    "bn_extra_outputs": "the BatchNorm's saved mean/invstd outputs are used",
    "linear_axis": "linear acts on the last axis but BatchNorm1d normalises axis 1 "
    "of a 3-D input",
    "shape_unknown": "shapes are not recorded in the graph",
    "channel_mismatch": "conv output channels differ from BatchNorm's",
    "custom_forward": "a module subclass overrides forward",
    "output_size": "ConvTranspose called with output_size",
    "split_graph": "the conv is in another graph: DDP's bucket split (or a graph break) "
    "separates it from its BatchNorm",
    "policy_eval": "the policy keeps this block in Eval mode",
}


# ---------------------------------------------------------------------------
# Canonical signatures. Each op's arguments are bound to these names once.
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

_DEFAULTS: dict[str, Any] = {
    "bias": None, "groups": 1, "transposed": False, "weight": None,
    "training": False, "momentum": 0.1, "eps": 1e-5,
}


class _Op(NamedTuple):
    role: str          # "conv" or "bn"
    name: str          # printed op kind: "conv2d", "conv_transpose1d", "linear", "batch_norm"
    params: tuple[str, ...]  # canonical argument names, positional order


def _conv_ops() -> dict[Callable[..., Any], _Op]:
    table: dict[Callable[..., Any], _Op] = {}
    for d in (1, 2, 3):
        conv, conv_t = f"conv{d}d", f"conv_transpose{d}d"
        table[getattr(torch, conv)] = _Op("conv", conv, _CONV)  # is F.conv{d}d
        table[getattr(torch, conv_t)] = _Op("conv", conv_t, _CONV_T)
        for overload in getattr(aten, conv).overloads():  # default, padding
            table[getattr(getattr(aten, conv), overload)] = _Op("conv", conv, _CONV)
        for overload in getattr(aten, conv_t).overloads():  # default or input
            table[getattr(getattr(aten, conv_t), overload)] = _Op("conv", conv_t, _CONV_T)
    table[F.linear] = _Op("conv", "linear", _LINEAR)
    table[aten.linear.default] = _Op("conv", "linear", _LINEAR)
    table[aten.convolution.default] = _Op("conv", "convolution", _CONVOLUTION)
    return table


_FUNCTION_OPS: dict[Callable[..., Any], _Op] = {
    **_conv_ops(),
    F.batch_norm: _Op("bn", "batch_norm", _F_BN),
    torch.batch_norm: _Op("bn", "batch_norm", _T_BN),
    aten.batch_norm.default: _Op("bn", "batch_norm", _T_BN),
    aten._native_batch_norm_legit_no_training.default: _Op("bn", "batch_norm",
                                                           _BN_NO_TRAIN),
}

# Module classes whose stock forward the rewrite reproduces, with their functional form.
_CONV_MODULES: dict[type[nn.Module], tuple[str, Callable[..., Any]]] = {
    nn.Conv1d: ("conv1d", F.conv1d),
    nn.Conv2d: ("conv2d", F.conv2d),
    nn.Conv3d: ("conv3d", F.conv3d),
    nn.ConvTranspose1d: ("conv_transpose1d", F.conv_transpose1d),
    nn.ConvTranspose2d: ("conv_transpose2d", F.conv_transpose2d),
    nn.ConvTranspose3d: ("conv_transpose3d", F.conv_transpose3d),
    nn.Linear: ("linear", F.linear),
}
_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


# ---------------------------------------------------------------------------
# What match hands to the rewrite.
# ---------------------------------------------------------------------------

# A tensor argument: a graph node, the dotted path of a module attribute (module
# form, turned into a ``get_attr`` by the rewrite), or None.
TensorArg = fx.Node | str | None


@dataclasses.dataclass
class ConvSite:
    node: fx.Node
    op: str                  # "conv2d", "conv_transpose2d", "linear", …
    transposed: bool
    input: fx.Node
    weight: TensorArg
    bias: TensorArg
    groups: Any              # int, or a node if the graph computes it
    params: tuple[str, ...] = ()  # functional form: the op's canonical argument names
    # Module form only: the module and the functional call that replaces it.
    module: nn.Module | None = None
    module_path: str | None = None
    functional: Callable[..., Any] | None = None


@dataclasses.dataclass
class BNSite:
    """The normalisation after the conv: a BatchNorm, or a per-channel affine
    ``y * scale + shift`` (FrozenBatchNorm2d and the like)."""

    node: fx.Node            # the node that consumes the conv output
    running_mean: TensorArg
    running_var: TensorArg
    weight: TensorArg
    bias: TensorArg
    training: Any            # bool, or a node
    eps: float
    module: nn.Module | None = None
    module_path: str | None = None
    # The node whose value the block yields, when not ``node`` itself: aten's
    # _native_batch_norm_legit_no_training's getitem(0), or the affine's add.
    output: fx.Node | None = None
    kind: str = "batch_norm"  # or "affine"
    scale: TensorArg = None   # affine: per-channel tensors, broadcastable to the output
    shift: TensorArg = None

    @property
    def last(self) -> fx.Node:
        return self.output if self.output is not None else self.node


@dataclasses.dataclass
class Candidate:
    conv: ConvSite
    bn: BNSite
    conv_path: str           # module path, "layer1.0.conv1", or the node name
    bn_path: str
    reject: str | None       # a key of REASONS, or None when it may be rewritten
    detail: str              # the sentence for reject, with specifics
    weight_numel: int | None     # elements of W
    activation_numel: int | None  # elements of the conv output (this batch)
    out_channels: int | None
    norm: str = "batch_norm"  # what follows the conv: "batch_norm" or "affine"
    out_dtype: torch.dtype | None = None  # the conv output's dtype, where recorded
    stats_dtype: torch.dtype | None = None  # dtype of running_var (or the affine's scale)
    device: str | None = None  # the conv output's device type ("cpu", "cuda"), where recorded
    follower: str | None = None  # what consumes the block's output, where the policy cares

    @property
    def op(self) -> str:
        return self.conv.op


# ---------------------------------------------------------------------------
# Reading nodes.
# ---------------------------------------------------------------------------

def _bind(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(params, node.args))
    bound.update(node.kwargs)
    for name in params:
        bound.setdefault(name, _DEFAULTS.get(name))
    return bound


def _fetch_attr(gm: torch.nn.Module | None, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        if obj is None or not hasattr(obj, atom):
            return None
        obj = getattr(obj, atom)
    return obj


def _owning_module(graph: fx.Graph) -> torch.nn.Module | None:
    return graph.owning_module


def _example_value(node: fx.Node) -> torch.Tensor | None:
    """The (fake) tensor Dynamo or export recorded for ``node``, or None."""
    for key in ("example_value", "val"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _attr_tensor(arg: Any, gm: torch.nn.Module | None) -> torch.Tensor | None:
    """The module's tensor behind an attribute path or a ``get_attr`` node, or None."""
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            return None
        arg = str(arg.target)
    value = _fetch_attr(gm, arg) if isinstance(arg, str) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(arg: Any, gm: torch.nn.Module | None) -> tuple[Any, ...] | None:
    """The shape of a tensor argument, from graph metadata or the module, or None."""
    if isinstance(arg, fx.Node):
        value = _example_value(arg)
        if value is not None:
            return tuple(value.shape)
        tensor_meta = arg.meta.get("tensor_meta")
        if tensor_meta is not None and hasattr(tensor_meta, "shape"):
            return tuple(tensor_meta.shape)
    value = _attr_tensor(arg, gm)
    return tuple(value.shape) if value is not None else None


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = _example_value(node)
    if value is not None:
        return value.dtype
    tensor_meta = node.meta.get("tensor_meta")
    return getattr(tensor_meta, "dtype", None)


def _device(node: fx.Node, weight: Any, gm: torch.nn.Module | None) -> str | None:
    """The device type of the conv output, else of its weight (module graphs carry
    no device in their shape metadata)."""
    value = _example_value(node)
    if value is None:
        value = _attr_tensor(weight, gm)
    return value.device.type if value is not None else None


# Module calls (symbolic_trace graphs) named as their functional forms, for _follower.
_MODULE_BASENAMES: tuple[tuple[type, str], ...] = (
    (nn.Hardtanh, "hardtanh"),  # nn.ReLU6 included
    (nn.ReLU, "relu"),
    (nn.MaxPool1d, "max_pool1d"), (nn.MaxPool2d, "max_pool2d"), (nn.MaxPool3d, "max_pool3d"),
)


def _op_basename(node: fx.Node, gm: torch.nn.Module | None = None) -> str:
    """``relu`` for F.relu, torch.relu, .relu_(), aten.relu.default and an nn.ReLU
    module call (given ``gm``); "" for anything else that is not a call."""
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    if node.op == "call_module":
        module = _module_of(node, gm)
        return next((name for kind, name in _MODULE_BASENAMES if isinstance(module, kind)), "")
    if node.op != "call_function":
        return ""
    target = node.target
    name = target.__name__ if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__name__", "")
    return name.split(".")[0].rstrip("_")


def _follower(node: fx.Node, gm: torch.nn.Module | None) -> str | None:
    """The activation pattern after the block, where it decides speed: "hardtanh"
    (ReLU6), or "relu→max_pool" where a max-pool is among the ReLU's users (a ResNet
    stem; a U-Net encoder stage, whose output also goes to the skip concat); None
    otherwise."""
    users = list(node.users)
    if len(users) != 1:
        return None
    first = _op_basename(users[0], gm)
    if first in ("hardtanh", "relu6"):
        return "hardtanh"
    if first == "relu" and any("max_pool" in _op_basename(u, gm) for u in users[0].users):
        return "relu→max_pool"
    return None


def _arg_dtype(arg: Any, gm: torch.nn.Module | None) -> torch.dtype | None:
    if isinstance(arg, fx.Node):
        return _dtype(arg)
    value = _attr_tensor(arg, gm)
    return value.dtype if value is not None else None


def _hint(size: Any) -> int | None:
    """A concrete size for a possibly symbolic one (its hint), or None."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = getattr(size.node, "hint", None)
        return int(hint) if hint is not None else None
    return None


def _numel(shape: tuple[Any, ...] | None) -> int | None:
    if shape is None:
        return None
    total = 1
    for size in shape:
        value = _hint(size)
        if value is None:
            return None
        total *= value
    return total


_PATH_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


def _normalise_path(path: str) -> str:
    path = _PATH_PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def module_path(node: fx.Node) -> str:
    """The module a node came from (``layer1.0.conv1``), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = _normalise_path(str(list(stack.values())[-1][0]))
        if path:
            return path
    return node.name


def _module_of(node: fx.Node, gm: torch.nn.Module | None) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = _fetch_attr(gm, str(node.target))
    return module if isinstance(module, nn.Module) else None


def _read_bn(node: fx.Node, gm: torch.nn.Module | None) -> BNSite | str | None:
    """A BNSite, None if ``node`` is not a BatchNorm, or a reject key."""
    if node.op == "call_function":
        op = _FUNCTION_OPS.get(node.target)  # type: ignore[arg-type]
        if op is None or op.role != "bn":
            return None
        a = _bind(node, op.params)
        training = False if "training" not in op.params else a["training"]
        output = None
        if node.target is aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                return "bn_extra_outputs"
            output = users[0] if len(users) == 1 else None
            if output is None:
                return "bn_extra_outputs"
        return BNSite(node, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                      training, a["eps"], output=output)
    module = _module_of(node, gm)
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    if type(module).forward not in _BN_FORWARDS:
        return "custom_forward"
    path = str(node.target)

    def attr(name: str) -> str | None:
        return f"{path}.{name}" if getattr(module, name, None) is not None else None

    return BNSite(node, attr("running_mean"), attr("running_var"), attr("weight"),
                  attr("bias"), module.training, module.eps, module, path)


_MUL = (operator.mul, torch.mul, aten.mul.Tensor, "mul")
_ADD = (operator.add, torch.add, aten.add.Tensor, "add")


def _is(node: fx.Node, ops: tuple[Any, ...]) -> bool:
    if node.op == "call_method":
        return node.target in ops
    return node.op == "call_function" and node.target in ops and "alpha" not in node.kwargs


def _per_channel(arg: Any, out_shape: tuple[Any, ...], axis: int,
                 gm: torch.nn.Module | None) -> bool:
    """Whether ``arg`` is a tensor that varies only along ``axis`` of the output:
    shape ``[1, C, 1, 1]`` or ``[C, 1, 1]`` for a conv, ``[C]`` for a linear."""
    shape = _shape(arg, gm)
    if shape is None or len(shape) > len(out_shape) or not isinstance(arg, (fx.Node, str)):
        return False
    dims = [1] * (len(out_shape) - len(shape)) + list(shape)
    axis %= len(out_shape)
    return all(isinstance(d, int) and d == (out_shape[axis] if i == axis else 1)
               for i, d in enumerate(dims))


def _read_affine(node: fx.Node, gm: torch.nn.Module | None
                 ) -> tuple[fx.Node, BNSite] | None:
    """``conv * scale (+ shift)`` with per-channel scale and shift: the form
    torchvision's and detectron2's FrozenBatchNorm2d take once traced. Returns
    (conv node, site), or None."""
    if not _is(node, _MUL) or len(node.args) != 2:
        return None
    for source, scale in (node.args, node.args[::-1]):
        if isinstance(source, fx.Node) and isinstance(_read_conv(source, gm), ConvSite):
            break
    else:
        return None
    out_shape = _shape(source, gm)
    axis = -1 if _read_conv(source, gm).op == "linear" else 1  # type: ignore[union-attr]
    if out_shape is None or not _per_channel(scale, out_shape, axis, gm):
        return None
    site = BNSite(node, None, None, None, None, False, 0.0, kind="affine", scale=scale)
    users = list(node.users)
    if len(users) == 1 and _is(users[0], _ADD) and len(users[0].args) == 2:
        add = users[0]
        shift = add.args[1] if add.args[0] is node else add.args[0]
        if shift is not node and _per_channel(shift, out_shape, axis, gm):
            site.output, site.shift = add, shift
    return source, site


def _read_conv(node: fx.Node, gm: torch.nn.Module | None) -> ConvSite | str | None:
    """A ConvSite, None if ``node`` is not a conv/linear, or a reject key."""
    if node.op == "call_function":
        op = _FUNCTION_OPS.get(node.target)  # type: ignore[arg-type]
        if op is None or op.role != "conv":
            return None
        a = _bind(node, op.params)
        if op.params is _CONVOLUTION:  # aten.convolution carries its own flag
            transposed = a["transposed"]
            if isinstance(transposed, fx.Node):
                return "shape_unknown"
        else:
            transposed = op.params is _CONV_T
        name = op.name
        groups = 1 if op.params is _LINEAR else a["groups"]
        return ConvSite(node, name, bool(transposed), a["input"], a["weight"], a["bias"],
                        groups, op.params)
    module = _module_of(node, gm)
    if module is None:
        return None
    for cls, (name, functional) in _CONV_MODULES.items():
        if isinstance(module, cls):
            break
    else:
        return None
    if type(module).forward is not cls.forward:
        return "custom_forward"
    if len(node.args) != 1 or node.kwargs:
        return "output_size"  # ConvTranspose's optional output_size argument
    path = str(node.target)
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return ConvSite(node, name, transposed, node.args[0], f"{path}.weight",  # type: ignore[arg-type]
                    bias, getattr(module, "groups", 1), (), module, path, functional)


# ---------------------------------------------------------------------------
# Candidates.
# ---------------------------------------------------------------------------

def _out_channels(conv: ConvSite, gm: torch.nn.Module | None) -> int | None:
    w = _shape(conv.weight, gm)
    if w is None or len(w) < 2:
        return None
    if not conv.transposed:
        return _hint(w[0])
    groups = conv.groups if isinstance(conv.groups, int) else None
    c_out_g = _hint(w[1])
    return None if groups is None or c_out_g is None else groups * c_out_g


def _check(conv: ConvSite, bn: BNSite, gm: torch.nn.Module | None,
           out_shape: tuple[Any, ...] | None) -> tuple[str | None, str]:
    """(None, "") if the pair may be rewritten, else (reject key, sentence)."""
    if bn.kind == "affine":  # _read_affine checked the shapes already
        other = [u.name for u in conv.node.users if u is not bn.node]
        if other:
            return "conv_multi_user", f"{REASONS['conv_multi_user']} ({', '.join(other)})"
        return None, ""
    if bn.running_mean is None or bn.running_var is None:
        return "no_running_stats", REASONS["no_running_stats"]
    if isinstance(bn.training, fx.Node):
        return "training_not_constant", REASONS["training_not_constant"]
    if bn.training:
        return "bn_training", REASONS["bn_training"]
    other = [u.name for u in conv.node.users if u is not bn.node]
    if other:
        return "conv_multi_user", f"{REASONS['conv_multi_user']} ({', '.join(other)})"
    if not isinstance(conv.groups, int):
        return "shape_unknown", "the conv's groups is not a constant"
    bn_shape = _shape(bn.running_mean, gm)
    out_channels = _out_channels(conv, gm)
    if bn_shape is None or out_channels is None:
        return "shape_unknown", f"{REASONS['shape_unknown']} (weight or running_mean)"
    if conv.op == "linear":
        if out_shape is None:
            return "shape_unknown", (f"{REASONS['shape_unknown']} (linear output; "
                                     "pass example inputs)")
        if len(out_shape) != 2:
            return "linear_axis", f"{REASONS['linear_axis']} (output {len(out_shape)}-D)"
    if _hint(bn_shape[0]) != out_channels:
        return "channel_mismatch", (f"{REASONS['channel_mismatch']} "
                                    f"({out_channels} vs {bn_shape[0]})")
    return None, ""


def find_candidates(graph: fx.Graph) -> list[Candidate]:
    """Every BatchNorm fed by a conv/linear in ``graph``, in graph order."""
    gm = _owning_module(graph)
    found: list[Candidate] = []
    for node in graph.nodes:
        bn: BNSite | str | None = _read_bn(node, gm)
        if bn is not None:
            source = node.args[0] if node.args else node.kwargs.get("input")
        elif (affine := _read_affine(node, gm)) is not None:
            source, bn = affine
        else:
            continue
        if not isinstance(source, fx.Node):
            continue
        split_op = _split_source_op(source)
        if split_op is not None and not isinstance(bn, str):
            found.append(_rejected(source, node, None, module_path(source), module_path(node),
                                   "split_graph", split_op))
            continue
        conv = _read_conv(source, gm)
        if conv is None:
            continue
        conv_path, bn_path = module_path(source), module_path(node)
        if isinstance(bn, str) or isinstance(conv, str):
            key = bn if isinstance(bn, str) else conv
            site = conv if isinstance(conv, ConvSite) else None
            found.append(_rejected(source, node, site, conv_path, bn_path, key))
            continue
        out_shape = _shape(source, gm)
        key, detail = _check(conv, bn, gm, out_shape)
        found.append(Candidate(
            conv, bn, conv_path, bn_path, key, detail,
            weight_numel=_numel(_shape(conv.weight, gm)),
            activation_numel=_numel(out_shape),
            out_channels=_out_channels(conv, gm),
            norm=bn.kind,
            out_dtype=_dtype(source),
            stats_dtype=_arg_dtype(bn.running_var if bn.kind == "batch_norm" else bn.scale, gm),
            device=_device(source, conv.weight, gm),
            follower=_follower(bn.last, gm),
        ))
    return found


def _split_source_op(node: fx.Node) -> str | None:
    """For an input of a graph split out of a larger one (DDP's bucketing uses
    split_module, which keeps the producer's metadata on the new input): the op
    kind if that producer was a conv/linear, else None."""
    if node.op != "placeholder" or not node.meta.get("source_fn_stack"):
        return None
    producer = node.meta["source_fn_stack"][-1][1]
    if isinstance(producer, type):
        for cls, (name, _) in _CONV_MODULES.items():
            if issubclass(producer, cls):
                return name
        return None
    op = _FUNCTION_OPS.get(producer)
    return op.name if op is not None and op.role == "conv" else None


def _rejected(conv_node: fx.Node, bn_node: fx.Node, conv: ConvSite | None,
              conv_path: str, bn_path: str, key: str, op: str | None = None) -> Candidate:
    """A candidate that could not even be read, kept so that it is reported."""
    site = conv or ConvSite(conv_node, op or _op_name(conv_node), False, conv_node, None,
                            None, 1)
    bn = BNSite(bn_node, None, None, None, None, False, 0.0)
    return Candidate(site, bn, conv_path, bn_path, key, REASONS[key], None, None, None)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        module = _module_of(node, node.graph.owning_module)
        return type(module).__name__ if module is not None else str(node.target)
    op = _FUNCTION_OPS.get(node.target)  # type: ignore[arg-type]
    return op.name if op is not None else str(node.target)
