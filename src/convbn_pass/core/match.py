"""Find Conv→BatchNorm candidates in an FX graph, in every form the graph may hold.

A *candidate* is a normalisation node whose input is produced by a conv,
transposed conv or linear node: a BatchNorm, an InstanceNorm (foldable when it
uses running statistics), or a per-channel affine
``conv(x) * scale + shift`` (what a FrozenBatchNorm2d becomes once traced; the
same algebra with nothing to train). Which calls and modules count is the rows
of ``forms.py``; this module reads a node through its row once, into named
fields (no argument indices past this point), and gives each candidate either
``reject=None`` (it may be rewritten) or a :class:`~convbn_pass.core.records.Reason`
with a sentence saying why not (a :class:`Reject` while reading).

Graphs come as functional nodes (Dynamo's default), aten nodes (``make_fx``,
``torch.export``) or module nodes (``torch.fx.symbolic_trace``, or Dynamo with
module inlining off); all three read through the same rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import re
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from .forms import (ADD_METHODS, ADD_OPS, AFFINE, MUL_METHODS, MUL_OPS, ConvForm, Follow,
                    NormForm, conv_form, conv_module_form, follow_kind, norm_form,
                    norm_module_form)
from .records import Reason

__all__ = ["Candidate", "ConvSite", "NormSite", "Reject", "find_candidates", "module_path"]

# A tensor argument: a graph node, the dotted path of a module attribute (module
# form, turned into a ``get_attr`` by the rewrite), or None.
TensorArg = fx.Node | str | None


@dataclasses.dataclass
class ConvSite:
    node: fx.Node
    form: ConvForm
    transposed: bool
    input: fx.Node
    weight: TensorArg
    bias: TensorArg
    groups: Any              # int, or a node if the graph computes it
    module: nn.Module | None = None  # module form: the module the rewrite replaces
    op: str = ""             # the op kind printed; the form's name unless read otherwise

    def __post_init__(self) -> None:
        self.op = self.op or self.form.name


@dataclasses.dataclass
class NormSite:
    """The normalisation after the conv: a BatchNorm, or a per-channel affine
    ``y * scale + shift`` (FrozenBatchNorm2d and the like)."""

    node: fx.Node                  # the node that consumes the conv output
    form: NormForm
    tensors: dict[str, TensorArg]  # by the names of ``form.tensors``
    batch_stats: Any = False       # normalises with batch statistics: bool, or the flag's node
    eps: float = 0.0
    module: nn.Module | None = None
    # The node whose value the block yields, when not ``node`` itself: the getitem(0)
    # of an aten op that returns a tuple, or the affine's add.
    output: fx.Node | None = None

    @property
    def last(self) -> fx.Node:
        return self.output if self.output is not None else self.node


@dataclasses.dataclass
class Candidate:
    conv_path: str           # module path, "layer1.0.conv1", or the node name
    bn_path: str
    op: str                  # the conv's kind: "conv2d", "conv_transpose2d", "linear", …
    norm: str                # the normalisation's form: "batch_norm", "instance_norm", "affine"
    reject: Reason | None    # why it may not be rewritten, or None
    detail: str              # the sentence for reject, with specifics
    # Both sites are read when the pair could be; a rewrite needs them.
    conv: ConvSite | None = None
    bn: NormSite | None = None
    weight_numel: int | None = None      # elements of W
    activation_numel: int | None = None  # elements of the conv output (this batch)
    out_channels: int | None = None
    out_dtype: torch.dtype | None = None  # the conv output's dtype, where recorded
    stats_dtype: torch.dtype | None = None  # dtype of the statistics (or the affine's scale)
    weight_dtype: torch.dtype | None = None  # dtype of the BatchNorm's weight (γ), where it has one
    device: str | None = None  # the conv output's device type ("cpu", "cuda"), where recorded
    follower: tuple[Follow, ...] = ()  # what consumes the block's output (see _follower)


class Reject(NamedTuple):
    """Why a pair may not be rewritten: the reason and its sentence, with specifics."""

    reason: Reason
    detail: str


def _reject(reason: Reason, specifics: str = "") -> Reject:
    return Reject(reason, f"{reason.sentence} ({specifics})" if specifics else reason.sentence)


# ---------------------------------------------------------------------------
# Reading nodes.
# ---------------------------------------------------------------------------

def _fetch_attr(gm: torch.nn.Module | None, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        if obj is None or not hasattr(obj, atom):
            return None
        obj = getattr(obj, atom)
    return obj


def _example_value(node: fx.Node) -> torch.Tensor | None:
    """The (fake) tensor export, ``make_fx`` or Dynamo recorded for ``node``, or None.
    ``val`` first: torch 2.7's ``torch.export(...).module()`` keeps a stale
    ``example_value`` on its ``get_attr`` nodes (every parameter carried the graph
    output's shape), beside the right ``val``."""
    for key in ("val", "example_value"):
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


def _dtype(arg: Any, gm: torch.nn.Module | None) -> torch.dtype | None:
    if isinstance(arg, fx.Node):
        value = _example_value(arg)
        if value is not None:
            return value.dtype
        tensor_meta = arg.meta.get("tensor_meta")
        if tensor_meta is not None:
            return getattr(tensor_meta, "dtype", None)
    value = _attr_tensor(arg, gm)
    return value.dtype if value is not None else None


def _device(node: fx.Node, weight: Any, gm: torch.nn.Module | None) -> str | None:
    """The device type of the conv output, else of its weight (module graphs carry
    no device in their shape metadata)."""
    value = _example_value(node)
    if value is None:
        value = _attr_tensor(weight, gm)
    return value.device.type if value is not None else None


def _follow(node: fx.Node, gm: torch.nn.Module | None) -> Follow | None:
    module = _module_of(node, gm) if node.op == "call_module" else None
    return follow_kind(node.op, node.target, module)


def _follower(node: fx.Node, gm: torch.nn.Module | None) -> tuple[Follow, ...]:
    """The ops after the block, where they decide speed: ``(HARDTANH,)`` when its one
    user is a ReLU6/hardtanh, ``(RELU, MAX_POOL)`` when its one user is a ReLU with a
    max-pool among the ReLU's users (a ResNet stem; a U-Net encoder stage, whose
    output also goes to the skip concat), ``(RELU,)`` for another ReLU, else ()."""
    users = list(node.users)
    if len(users) != 1:
        return ()
    first = _follow(users[0], gm)
    if first is Follow.RELU and any(_follow(u, gm) is Follow.MAX_POOL for u in users[0].users):
        return (Follow.RELU, Follow.MAX_POOL)
    return (first,) if first is not None else ()


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
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")


def _normalise_path(path: str) -> str:
    """A module's path from Dynamo's spelling of its source: ``L['self'].layer1[0].conv1``
    (2.10 on), ``L['self']._modules['layer1']._modules['0'].conv1`` (2.9) or
    ``getattr(getattr(L['self'].layer1, '0'), 'conv1')`` (2.7's export), all
    ``layer1.0.conv1``."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = _PATH_PREFIX.sub("", path)
    path = re.sub(r"(?:^|\.)_modules\['([^']*)'\]", r".\1", path)
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


def _tuple_output(node: fx.Node, index: int) -> fx.Node | Reason:
    """The one ``getitem(node, index)`` user of an op that returns a tuple; other
    outputs may only appear as getitems nobody uses (make_fx leaves those)."""
    wanted = [u for u in node.users
              if u.target is operator.getitem and u.args[1] == index]
    others = [u for u in node.users if u not in wanted]
    if len(wanted) != 1 or any(u.target is not operator.getitem or u.users for u in others):
        return Reason.BN_EXTRA_OUTPUTS
    return wanted[0]


def _read_norm(node: fx.Node, gm: torch.nn.Module | None
               ) -> tuple[NormForm, NormSite | Reject] | None:
    """None if ``node`` is no normalisation a row reads, else its row and either a
    NormSite or why it cannot be read."""
    if node.op == "call_function":
        form = norm_form(node.target)
        if form is None:
            return None
        a = form.bind(node.args, node.kwargs)
        output = None
        if form.output_index is not None:
            found = _tuple_output(node, form.output_index)
            if isinstance(found, Reason):
                return form, _reject(found)
            output = found
        return form, NormSite(node, form, {name: a[name] for name in form.tensors},
                              form.batch_stats(a), a["eps"], output=output)
    module = _module_of(node, gm)
    form = None if module is None else norm_module_form(module)
    if module is None or form is None:
        return None
    if type(module).forward not in form.forwards:
        return form, _reject(Reason.CUSTOM_FORWARD)
    path = str(node.target)
    tensors = {name: f"{path}.{name}" if getattr(module, name, None) is not None else None
               for name in form.tensors}
    assert form.module_batch_stats is not None
    return form, NormSite(node, form, tensors, form.module_batch_stats(module), module.eps,
                          module)


def _is(node: fx.Node, ops: tuple[Any, ...], methods: tuple[str, ...]) -> bool:
    if node.op == "call_method":
        return node.target in methods
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
                 ) -> tuple[fx.Node, NormSite] | None:
    """``conv * scale (+ shift)`` with per-channel scale and shift (the AFFINE row).
    Returns (conv node, site), or None."""
    if not _is(node, MUL_OPS, MUL_METHODS) or len(node.args) != 2:
        return None
    for source, scale in (node.args, node.args[::-1]):
        conv = _read_conv(source, gm) if isinstance(source, fx.Node) else None
        if isinstance(conv, ConvSite):
            break
    else:
        return None
    out_shape = _shape(source, gm)
    axis = conv.form.channel_axis
    if out_shape is None or not _per_channel(scale, out_shape, axis, gm):
        return None
    site = NormSite(node, AFFINE, {"scale": scale, "shift": None})
    users = list(node.users)
    if len(users) == 1 and _is(users[0], ADD_OPS, ADD_METHODS) and len(users[0].args) == 2:
        add = users[0]
        shift = add.args[1] if add.args[0] is node else add.args[0]
        if shift is not node and _per_channel(shift, out_shape, axis, gm):
            site.output, site.tensors["shift"] = add, shift
    return source, site


def _read_conv(node: fx.Node, gm: torch.nn.Module | None) -> ConvSite | Reject | None:
    """A ConvSite, None if ``node`` is not a conv/linear, or why it cannot be read."""
    if node.op == "call_function":
        form = conv_form(node.target)
        if form is None:
            return None
        a = form.bind(node.args, node.kwargs)
        transposed = form.is_transposed(a)
        if isinstance(transposed, fx.Node):
            # Which axis of the weight holds the output channels is unknown.
            return _reject(Reason.SHAPE_UNKNOWN, f"{form.name}'s {form.transposed_arg} flag "
                                                 "is not a constant in the graph")
        return ConvSite(node, form, bool(transposed), a["input"], a["weight"], a["bias"],
                        form.groups(a))
    module = _module_of(node, gm)
    form = None if module is None else conv_module_form(module)
    if module is None or form is None:
        return None
    assert form.module is not None
    if type(module).forward is not form.module.forward:
        return _reject(Reason.CUSTOM_FORWARD)
    call = _module_call(form.module.forward, node)
    if isinstance(call, Reject):
        return call
    path = str(node.target)
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    return ConvSite(node, form, form.transposed, call,
                    f"{path}.weight", bias, getattr(module, "groups", 1), module)


def _module_call(forward: Any, node: fx.Node) -> fx.Node | Reject:
    """The input of a conv/linear module call, or why the call cannot be rewritten:
    ConvTranspose's ``output_size`` (the rewrite computes no output size), or
    arguments the stock forward does not take (eager would raise)."""
    try:
        bound = inspect.signature(forward).bind(None, *node.args, **node.kwargs).arguments
    except TypeError as error:
        return _reject(Reason.MODULE_CALL_ARGS, str(error))
    if bound.get("output_size") is not None:
        return _reject(Reason.OUTPUT_SIZE)
    if not isinstance(bound["input"], fx.Node):
        return _reject(Reason.MODULE_CALL_ARGS, "its input is not a tensor of the graph")
    return bound["input"]


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


def _check(conv: ConvSite, bn: NormSite, gm: torch.nn.Module | None,
           out_shape: tuple[Any, ...] | None) -> Reject | None:
    """None if the pair may be rewritten, else why not."""
    form = bn.form
    if any(bn.tensors.get(name) is None for name in form.required):
        return _reject(Reason.NO_RUNNING_STATS)
    if isinstance(bn.batch_stats, fx.Node):
        return _reject(Reason.TRAINING_NOT_CONSTANT, f"{form.name}: {form.stats_flag}")
    if bn.batch_stats:
        return _reject(form.batch_reason)
    other = [u.name for u in conv.node.users if u is not bn.node]
    if other:
        return _reject(Reason.CONV_MULTI_USER, ", ".join(other))
    if not isinstance(conv.groups, int):
        return Reject(Reason.SHAPE_UNKNOWN, "the conv's groups is not a constant")
    channels = _numel(_shape(bn.tensors[form.channels], gm))
    out_channels = _out_channels(conv, gm)
    if channels is None or out_channels is None:
        return _reject(Reason.SHAPE_UNKNOWN, f"weight or {form.channels}")
    if form.axis is not None and conv.form.channel_axis != form.axis:
        # The normalised axis must be the conv's channel axis: a linear's is the
        # last, so only a 2-D linear output qualifies.
        if out_shape is None:
            return _reject(Reason.SHAPE_UNKNOWN, f"{conv.op} output; pass example inputs")
        if conv.form.channel_axis % len(out_shape) != form.axis % len(out_shape):
            return _reject(Reason.LINEAR_AXIS, f"output {len(out_shape)}-D")
    if channels != out_channels:
        return _reject(Reason.CHANNEL_MISMATCH, f"{out_channels} vs {channels}")
    return None


def find_candidates(graph: fx.Graph) -> list[Candidate]:
    """Every normalisation fed by a conv/linear in ``graph``, in graph order."""
    gm = graph.owning_module
    found: list[Candidate] = []
    for node in graph.nodes:
        bn: NormSite | Reject
        if (read := _read_norm(node, gm)) is not None:
            form, bn = read
            source = node.args[0] if node.args else node.kwargs.get("input")
        elif (affine := _read_affine(node, gm)) is not None:
            (source, bn), form = affine, AFFINE
        else:
            continue
        if not isinstance(source, fx.Node):
            continue
        paths = module_path(source), module_path(node)
        norm = form.name
        split_op = _split_source_op(source)
        if split_op is not None and not isinstance(bn, Reject):
            found.append(Candidate(*paths, split_op, norm, Reason.SPLIT_GRAPH,
                                   Reason.SPLIT_GRAPH.sentence))
            continue
        conv = _read_conv(source, gm)
        if conv is None:
            continue
        if isinstance(bn, Reject) or isinstance(conv, Reject):
            unread = bn if isinstance(bn, Reject) else conv
            assert isinstance(unread, Reject)
            op = conv.op if isinstance(conv, ConvSite) else _op_name(source, gm)
            found.append(Candidate(*paths, op, norm, unread.reason, unread.detail))
            continue
        out_shape = _shape(source, gm)
        reject = _check(conv, bn, gm, out_shape)
        found.append(Candidate(
            *paths, conv.op, norm, reject.reason if reject else None,
            reject.detail if reject else "", conv, bn,
            weight_numel=_numel(_shape(conv.weight, gm)),
            activation_numel=_numel(out_shape),
            out_channels=_out_channels(conv, gm),
            out_dtype=_dtype(source, gm),
            stats_dtype=_dtype(bn.tensors[bn.form.channels], gm),
            weight_dtype=_dtype(bn.tensors.get("weight"), gm),
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
    form = conv_module_form(producer) if isinstance(producer, type) else conv_form(producer)
    return form.name if form is not None else None


def _op_name(node: fx.Node, gm: torch.nn.Module | None) -> str:
    """The op kind of a conv node that could not be read."""
    module = _module_of(node, gm)
    if module is not None:
        form = conv_module_form(module)
        return form.name if form is not None else type(module).__name__
    form = conv_form(node.target)
    return form.name if form is not None else str(node.target)
