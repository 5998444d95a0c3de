"""Tune mode without the compiler: ``convbn_pass.tune(model, example_inputs)``.

::

    import convbn_pass
    model.eval()                                       # or any mode: see below
    plan = convbn_pass.tune(model.backbone, (images,))  # in place; returns the plan
    plan.tuned          # the Decisions of the pairs now in Tune mode
    ...                 # train eagerly as before
    convbn_pass.untune(model.backbone)                  # back to the stock forwards

Each Conv→BatchNorm pair that the data flow shows to be sound (found as the
compiled pass finds it: one Dynamo trace with a recording backend, the pass's
own matcher, module call stacks; see :func:`convbn_pass.regions.trace_pairs`)
gets two forwards of its own:

- the conv computes ``c``, ``W′``, ``b′`` (``core.algebra``) and ``y = conv(x, W′, b′)``
  in one ``torch.autograd.Function`` that saves ``x`` alone (parameters and
  running statistics are the module's own tensors and cost nothing) and rebuilds
  ``W′`` and ``c`` in backward: Deploy mode's activation memory with Eval mode's
  gradients. Under ``keep_weight`` it saves ``W′`` as well.
- the BatchNorm passes that very tensor through: its normalisation is already in
  ``y``. Only the normalisation is skipped: a BatchNorm subclass whose forward does
  more (timm's ``BatchNormAct2d``: BN, drop, activation) runs its forward with its
  one ``batch_norm`` call answered by ``y`` itself.

Each call decides afresh, reading the BatchNorm as it is then: in training mode
(``model.train()``), under ``torch.no_grad()``/``inference_mode()`` and for inputs
the trace did not cover, the stock forwards run unchanged. Running statistics and
parameters are read at every call, never captured, so ``load_state_dict`` and
optimizers act as without tune. The conv and its BatchNorm are linked by a plain
attribute (not a submodule: parameter names and ``state_dict`` keys are unchanged)
that ``copy.deepcopy`` maps to the copy's modules.

A pair is tuned only where the trace shows the conv module's output read by that
BatchNorm module alone, each module called once. At run time each tuned conv
hands its output to its BatchNorm by the tensor itself; a forward that routes it
elsewhere (data flow unlike the traced one) raises instead of computing a wrong
number.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from . import coverage, regions
from .core import algebra
from .core.forms import conv_module_form, norm_form, norm_module_form
from .core.policy import AUTO_RATIO, check_policy, check_ratio, decide
from .core.records import Action, Decision, Reason

__all__ = ["tune", "untune", "plan_tune", "TunePlan", "is_tuned"]

_LINK = "_convbn_tune"        # a tuned conv's and BatchNorm's _Link, in their __dict__
_ROOT = "_convbn_tune_root"   # the tuned root's _Root, in its __dict__

Modules = Sequence[str] | type | tuple[type, ...] | None


# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TunePlan:
    """What :func:`tune` does to a model: one :class:`~convbn_pass.Decision` per
    candidate pair, in the order the forward runs them.

    In these decisions ``conv``/``bn`` are module paths from the tuned model,
    ``graph`` is the graph of the tracing forward that holds the pair (1, 2, …:
    graph breaks split a forward), ``compile_id`` is None. Reasons are the
    pass's (``convbn_pass.REASONS``); two are tune's own: ``module_reused`` and
    ``not_module``.
    """

    decisions: tuple[Decision, ...]
    policy: str
    ratio: float
    modules: tuple[str, ...]  # the submodules tune was limited to ("" : the whole model)

    @property
    def tuned(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.tuned)

    @property
    def skipped(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.tuned)

    def counts(self) -> dict[str, int]:
        """Decisions by the pass's counter keys (``tuned``, ``skipped_<reason>``)."""
        return dict(Counter(d.counter_key for d in self.decisions))

    def describe(self) -> str:
        """The plan as text: a summary line, then one line per pair."""
        counts = Counter(d.action for d in self.decisions)
        lines = [f"{len(self.decisions)} conv-BN pair{'s' * (len(self.decisions) != 1)}: "
                 f"{counts[Action.TUNE]} tuned, {counts[Action.TUNE_KEEP_WEIGHT]} tuned "
                 f"keeping W', {counts[Action.SKIP]} left in Eval mode "
                 f"(policy {self.policy!r})"]
        for d in self.decisions:
            lines.append(f"  {d.conv} -> {d.bn}  {d.op}  {d.action}  {d.reason}: {d.detail}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Normalisation modules tune can replace.
# ---------------------------------------------------------------------------

def _identity(module: nn.Module, y: Tensor) -> Tensor:
    return y


def _drop_act(module: nn.Module, y: Tensor) -> Tensor:
    return module.act(module.drop(y))


class _Frozen(NamedTuple):
    """A frozen BatchNorm class whose forward is ``after(y · scale + shift)`` with
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias − running_mean · scale``
    (all four buffers): the BatchNorm algebra with nothing to update. Matched by
    its forward function, so a subclass that overrides forward is not taken."""

    module: str   # where the class is defined
    name: str
    after: str    # key of _AFTER: what the forward does after the affine


_AFTER: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "identity": _identity, "drop_act": _drop_act}

_FROZEN: tuple[_Frozen, ...] = (
    _Frozen("torchvision.ops.misc", "FrozenBatchNorm2d", "identity"),
    _Frozen("timm.layers.norm_act", "FrozenBatchNormAct2d", "drop_act"),
)


def _frozen_form(module: nn.Module) -> _Frozen | None:
    forward = type(module).forward
    for row in _FROZEN:
        cls = getattr(sys.modules.get(row.module), row.name, None)
        if cls is not None and forward is cls.forward:
            return row
    return None


_STOCK_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _norm_kind(module: nn.Module, norm: str) -> str | None:
    """How a tuned normalisation module runs: ``"identity"`` (stock BatchNorm
    forward, or a frozen form), ``"drop_act"`` (a frozen form with more after the
    affine), ``"intercept"`` (a BatchNorm subclass with a forward of its own: it
    runs, with its one batch_norm call answered by the tuned conv's output), or
    None: not a module tune can replace for this form."""
    if norm == "batch_norm" and norm_module_form(module) is not None:
        return "identity" if type(module).forward in _STOCK_BN_FORWARDS else "intercept"
    if norm == "affine":
        frozen = _frozen_form(module)
        return frozen.after if frozen is not None else None
    return None


# ---------------------------------------------------------------------------
# The Tune-mode block as one autograd Function.
# ---------------------------------------------------------------------------

class _ConvSpec(NamedTuple):
    """The non-tensor arguments of one conv call (empty tuples for a linear)."""

    linear: bool
    transposed: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int


def _channel_sum(t: Tensor, spec: _ConvSpec) -> Tensor:
    """Σ of a weight-shaped tensor over everything but the output channel, ``[C_out]``:
    the adjoint of ``algebra.scale_weight`` (same layouts)."""
    if not spec.transposed:
        return t.sum(dim=tuple(range(1, t.dim())))  # [C_out]
    c_in, c_out_g = t.shape[0], t.shape[1]
    grouped = t.reshape([spec.groups, c_in // spec.groups, c_out_g] + list(t.shape[2:]))
    dims = (1,) + tuple(range(3, grouped.dim()))
    return grouped.sum(dim=dims).reshape(-1)  # [g, C_out/g] -> [C_out]


def _conv(x: Tensor, w: Tensor, b: Tensor | None, spec: _ConvSpec) -> Tensor:
    if spec.linear:
        return F.linear(x, w, b)
    return torch.ops.aten.convolution(x, w, b, spec.stride, spec.padding, spec.dilation,
                                      spec.transposed, spec.output_padding, spec.groups)


def _conv_backward(dy: Tensor, x: Tensor, w: Tensor, spec: _ConvSpec, need_x: bool,
                   need_w: bool, need_b: bool = False
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``conv(x, w) + b`` for the upstream ``dy``: (dx, dw, db), None where
    not needed (db in ``dy``'s dtype: Σ dy over all but the channel axis)."""
    if spec.linear:  # y = x wᵀ: x [N, C_in], w [C_out, C_in]
        return ((dy.mm(w) if need_x else None), (dy.t().mm(x) if need_w else None),
                (dy.sum(0) if need_b else None))
    # The convolution's own bias gradient reduces dy in one pass, where a separate
    # sum over (N, H, W) of a channels-first tensor took 4 % of a MobileNetV2 step.
    return tuple(torch.ops.aten.convolution_backward(  # type: ignore[return-value]
        dy, x, w, [w.shape[1] * spec.groups if spec.transposed else w.shape[0]] if need_b
        else None, spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding, spec.groups, [need_x, need_w, need_b]))


def _channel_axis(spec: _ConvSpec) -> int:
    return -1 if spec.linear else 1


def _sum_but_channel(t: Tensor, spec: _ConvSpec) -> Tensor:
    axis = _channel_axis(spec) % t.dim()
    return t.sum(dim=tuple(d for d in range(t.dim()) if d != axis))  # [C_out]


def _fused_bias(bias: Tensor | None, mean: Tensor | None, c: Tensor, shift: Tensor | None,
                like: Tensor) -> Tensor | None:
    if bias is None and mean is None and shift is None:
        return None
    return algebra.fuse_bias(bias, mean, c, shift, like)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run this conv in, or None outside autocast (conv,
    transposed conv and linear are on every device's lower-precision list)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _tune_weights(weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None,
                  bn_bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                  spec: _ConvSpec) -> tuple[Tensor, Tensor | None]:
    """``W′`` (the weight's dtype) and ``b′`` (None when it has no term)."""
    c = algebra.bn_scale(var, bn_weight, eps)                           # [C_out], >= float32
    w2 = algebra.scale_weight(weight, c, spec.transposed, spec.groups)  # W′
    return w2, _fused_bias(bias, mean, c, bn_bias, weight)              # b′ [C_out]


def _tuned_conv(x: Tensor, w2: Tensor, b2: Tensor | None,
                spec: _ConvSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``conv(x, W′, b′)``; also the input and weight as the conv got them (cast to
    autocast's dtype where autocast is on)."""
    half = _autocast_dtype(x)
    xc = x if half is None else x.to(half)
    wc = w2 if half is None else w2.to(half)
    # Under autocast the conv runs in half precision; b′ is then added after it in
    # float32 (as BatchNorm keeps β and its gradient), the sum cast back.
    split = b2 is not None and b2.dtype != wc.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = _conv(xc, wc, None if split else b2, spec)
    if split:
        y = algebra.add_channel_bias(y, b2, _channel_axis(spec) % y.dim())  # type: ignore[arg-type]
    return y, xc, wc


def _compiled_block(x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None,
                    bn_bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                    spec: _ConvSpec, keep_weight: bool) -> Tensor:
    """The block as Dynamo traces it: the same algebra as plain differentiable ops,
    W′ and b′ in an activation-checkpoint region, which AOTAutograd's partitioner
    recomputes in backward (the compiled pass tags its own rewrite for the same
    effect), unless W′ is kept. The custom Function is traced too, but the
    partitioner then saves W′ (measured: one weight-sized tensor per block)."""
    args = (weight, bias, bn_weight, bn_bias, mean, var, eps, spec)
    if keep_weight:
        w2, b2 = _tune_weights(*args)
    else:
        w2, b2 = checkpoint(_tune_weights, *args, use_reentrant=False)
    return _tuned_conv(x, w2, b2, spec)[0]


class _TuneFunction(torch.autograd.Function):
    """``y = conv(x, W·c, β + (b − μ̂)·c)``, ``c = γ / sqrt(σ̂² + ε)``, saving ``x`` only.

    Backward, with ``dW′, db′`` the conv's own weight and bias gradients:
    ``dW = dW′·c`` (output-channel axis), ``db = db′·c``, ``dβ = db′``,
    ``dγ = dc / sqrt(σ̂² + ε)`` where ``dc = Σ(dW′·W) + db′·(b − μ̂)`` (per channel).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                bn_weight: Tensor | None, bn_bias: Tensor | None, mean: Tensor,
                var: Tensor, eps: float, spec: _ConvSpec, keep_weight: bool) -> Tensor:
        w2, b2 = _tune_weights(weight, bias, bn_weight, bn_bias, mean, var, eps, spec)
        y, xc, wc = _tuned_conv(x, w2, b2, spec)
        ctx.save_for_backward(xc, weight, bias, bn_weight, var, mean,
                              wc if keep_weight else None)
        ctx.eps, ctx.spec, ctx.x_dtype = eps, spec, x.dtype
        ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
        ctx.has_bias_terms = bias is not None or mean is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xc, weight, bias, bn_weight, var, mean, wc = ctx.saved_tensors
        spec: _ConvSpec = ctx.spec
        need_x, need_w, need_b, need_g, need_beta = ctx.needs_input_grad[:5]
        c = algebra.bn_scale(var, bn_weight, ctx.eps)  # [C_out], rebuilt
        if wc is None and need_x:
            wc = algebra.scale_weight(weight, c, spec.transposed, spec.groups).to(xc.dtype)
        need_dw2 = need_w or need_g
        if wc is None:  # only dW′ wanted: the conv backward reads the weight's shape
            wc = weight.to(xc.dtype)
        need_db2 = need_b or need_beta or (need_g and ctx.has_bias_terms)
        # b′'s gradient in at least float32: from the convolution's backward where dy is
        # in that dtype already, else summed apart (autocast: the conv ran in half).
        fused_db2 = need_db2 and dy.dtype == c.dtype == xc.dtype
        dx, dw2, db2 = _conv_backward(dy.to(xc.dtype), xc, wc, spec, need_x, need_dw2,
                                      fused_db2)
        if need_db2 and not fused_db2:
            db2 = _sum_but_channel(dy.to(c.dtype), spec)
        grads: list[Tensor | None] = [None] * 10
        if need_x:
            grads[0] = dx.to(ctx.x_dtype)  # type: ignore[union-attr]
        if need_w:
            grads[1] = algebra.scale_weight(dw2.to(c.dtype), c, spec.transposed,  # type: ignore[union-attr]
                                            spec.groups).to(weight.dtype)
        if need_b:
            grads[2] = (db2 * c).to(bias.dtype)  # type: ignore[operator]
        if need_g:
            dc = _channel_sum(dw2.to(c.dtype) * weight.to(c.dtype), spec)  # type: ignore[union-attr]
            if ctx.has_bias_terms:
                centre = -mean.to(c.dtype) if bias is None else bias.to(c.dtype) - mean.to(c.dtype)
                dc = dc + db2 * centre  # type: ignore[operator]
            grads[3] = (dc * torch.rsqrt(var.to(c.dtype) + ctx.eps)).to(bn_weight.dtype)
        if need_beta:
            grads[4] = db2.to(ctx.beta_dtype)  # type: ignore[union-attr]
        return tuple(grads)


# ---------------------------------------------------------------------------
# The link between a tuned conv and its BatchNorm, and their forwards.
# ---------------------------------------------------------------------------

class _Link:
    """What a tuned conv and its BatchNorm share: both modules (a plain attribute,
    not a submodule, so parameter names are unchanged; ``copy.deepcopy`` maps the
    modules to the copy's), the choice, and the tensor the conv produced in Tune
    mode until its BatchNorm takes it."""

    def __init__(self, conv: nn.Module, bn: nn.Module, conv_path: str, bn_path: str,
                 keep_weight: bool, norm: str) -> None:
        self.conv, self.bn = conv, bn
        self.conv_path, self.bn_path = conv_path, bn_path
        self.keep_weight = keep_weight
        self.norm = norm                 # a _norm_kind
        self.pending: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["pending"] = None  # a forward in progress is not part of a copy
        return state

    def stale(self) -> RuntimeError:
        self.pending = None
        return RuntimeError(
            f"convbn_pass.tune: the Tune-mode output of {self.conv_path!r} did not reach "
            f"{self.bn_path!r}: this forward's data flow differs from the one traced at "
            "tune time; call convbn_pass.untune(model) (or tune again with inputs that "
            "take this path)")


def _norm_in_eval(bn: nn.Module, frozen: bool) -> bool:
    """Whether the normalisation computes with its running statistics now."""
    if frozen:
        return True
    return (not bn.training and isinstance(bn.running_mean, Tensor)
            and isinstance(bn.running_var, Tensor))


def _spec_and_input(conv: nn.Module, x: Tensor, args: tuple[Any, ...],
                    kwargs: Mapping[str, Any]) -> tuple[_ConvSpec, Tensor] | None:
    """The conv call's arguments (its form's row writes the module as a call), with
    the input padded where the module pads first; None where Tune mode does not
    apply to this call."""
    form = conv_module_form(conv)
    assert form is not None and form.module_call is not None
    if form.name == "linear":
        if x.dim() != 2 or args or kwargs:  # BatchNorm1d normalises axis 1: 2-D only
            return None
        return _ConvSpec(True, False, (), (), (), (), 1), x
    if x.dim() != len(conv.kernel_size) + 2:  # unbatched: BatchNorm would refuse it
        return None
    call = form.module_call(conv)
    a = call.args
    padding = a["padding"]
    if call.pad is not None:
        x = F.pad(x, call.pad, mode=call.pad_mode)  # reflect / replicate / circular
    elif isinstance(padding, str):  # "same" / "valid", as nn.ConvNd resolves them
        pad = conv._reversed_padding_repeated_twice
        left, right = tuple(pad[0::2][::-1]), tuple(pad[1::2][::-1])  # per dim, first to last
        if left != right:  # an even kernel under "same": zeros on one side more
            x = F.pad(x, pad)
            padding = (0,) * len(conv.kernel_size)
        else:
            padding = left
    output_padding: tuple[int, ...] = (0,) * len(conv.kernel_size)
    if form.transposed:
        output_size = kwargs.get("output_size", args[0] if args else None)
        output_padding = tuple(conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size,
            len(conv.kernel_size), conv.dilation))
    elif args or kwargs:
        return None
    return _ConvSpec(False, form.transposed, tuple(a["stride"]), tuple(padding),
                     tuple(a["dilation"]), output_padding, int(a["groups"])), x


def _tuned_conv_forward(conv: nn.Module, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    link: _Link = conv.__dict__[_LINK]
    if link.pending is not None:
        raise link.stale()
    bn = link.bn
    frozen = norm_module_form(bn) is None  # a frozen form: no training mode
    found = None
    if (torch.is_grad_enabled() and _norm_in_eval(bn, frozen)
            and not (bn.running_mean.requires_grad or bn.running_var.requires_grad)):
        found = _spec_and_input(conv, input, args, kwargs)
    if found is None:
        return type(conv).forward(conv, input, *args, **kwargs)
    spec, x = found
    block = _compiled_block if torch.compiler.is_compiling() else _TuneFunction.apply
    y = block(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
              bn.running_var, float(bn.eps), spec, link.keep_weight)
    link.pending = y
    return y


class _AnswerBatchNorm(TorchFunctionMode):
    """While a BatchNorm subclass's own forward runs: its ``batch_norm`` call on the
    tuned conv's output returns that output (the normalisation is in it already),
    provided the call reads the module's own statistics and parameters in eval
    mode, as the trace showed."""

    def __init__(self, bn: nn.Module, y: Tensor, link: _Link) -> None:
        super().__init__()
        self.bn, self.y, self.link = bn, y, link
        self.answered = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        form = norm_form(func)
        if form is None or self.answered or not args or args[0] is not self.y:
            return func(*args, **kwargs)
        a = form.bind(args, kwargs)
        bn = self.bn
        same = (form.name == "batch_norm" and a["running_mean"] is bn.running_mean
                and a["running_var"] is bn.running_var
                and a["weight"] is bn.weight and a["bias"] is bn.bias
                and form.batch_stats(a) is False and float(a["eps"]) == float(bn.eps))
        if not same:
            raise RuntimeError(
                f"convbn_pass.tune: {self.link.bn_path!r} ({type(bn).__name__}) normalised "
                f"{self.link.conv_path!r}'s output with other statistics or settings than "
                "its own in eval mode; call convbn_pass.untune(model)")
        self.answered = True
        return self.y


def _tuned_norm_forward(bn: nn.Module, input: Tensor, *args: Any, **kwargs: Any) -> Any:
    link: _Link = bn.__dict__[_LINK]
    y = link.pending
    if y is None:  # the conv ran its stock forward: so does the BatchNorm
        return type(bn).forward(bn, input, *args, **kwargs)
    link.pending = None
    if y is not input:
        raise RuntimeError(
            f"convbn_pass.tune: {link.bn_path!r} was called on a tensor other than "
            f"{link.conv_path!r}'s output: this forward's data flow differs from the one "
            "traced at tune time; call convbn_pass.untune(model)")
    if link.norm == "intercept":
        mode = _AnswerBatchNorm(bn, y, link)
        with mode:
            out = type(bn).forward(bn, input, *args, **kwargs)
        if not mode.answered:
            raise RuntimeError(
                f"convbn_pass.tune: {link.bn_path!r} ({type(bn).__name__}) did not "
                f"normalise {link.conv_path!r}'s output; call convbn_pass.untune(model)")
        return out
    return _AFTER[link.norm](bn, y)


class _Root:
    """The tuned model's links, and the ids of its two forward hooks."""

    def __init__(self, links: tuple[_Link, ...]) -> None:
        self.links = links
        self.hooks: tuple[int, int] = (-1, -1)


def _root_pre_hook(module: nn.Module, args: Any) -> None:
    # A forward that raised half-way may have left a tensor behind.
    for link in module.__dict__[_ROOT].links:
        link.pending = None


def _root_post_hook(module: nn.Module, args: Any, output: Any) -> None:
    stale = [link for link in module.__dict__[_ROOT].links if link.pending is not None]
    if stale:
        for link in stale[1:]:
            link.pending = None
        raise stale[0].stale()


# ---------------------------------------------------------------------------
# Planning.
# ---------------------------------------------------------------------------

def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}() takes a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(f"{what}(): the model is a torch.compile wrapper; tune the module "
                         "itself (model._orig_mod), then compile it")
    for path, module in model.named_modules():
        name = path or "(root)"
        if _LINK in module.__dict__ or _ROOT in module.__dict__:
            raise ValueError(f"{what}(): module {name!r} is already tuned; call "
                             "convbn_pass.untune(model) first")
        if regions._ATTR in module.__dict__:
            raise ValueError(f"{what}(): module {name!r} is compiled by compile_regions; "
                             "call convbn_pass.uncompile_regions(model) first")
        if "forward" in module.__dict__:
            raise ValueError(f"{what}(): module {name!r} has its own instance attribute "
                             "'forward' (patched by other code); tune replaces forward and "
                             "cannot keep it")


def _scope(model: nn.Module, modules: Modules) -> tuple[str, ...]:
    """The submodule paths tune is limited to ("" : the whole model)."""
    if modules is None:
        return ("",)
    if isinstance(modules, type) or (isinstance(modules, tuple) and modules
                                     and all(isinstance(m, type) for m in modules)):
        classes = modules if isinstance(modules, tuple) else (modules,)
        paths = tuple(p for p, m in model.named_modules() if isinstance(m, classes))
        if not paths:
            names = ", ".join(c.__name__ for c in classes)
            raise ValueError(f"tune(modules=...): no module of class {names} in "
                             f"{type(model).__name__}")
        return paths
    if isinstance(modules, str):
        raise ValueError(f"tune(modules=...): expected a list of module paths, got the "
                         f"string {modules!r}")
    paths = tuple(modules)
    known = dict(model.named_modules())
    for path in paths:
        if not isinstance(path, str) or path not in known:
            raise ValueError(f"tune(modules=...): no submodule {path!r} in "
                             f"{type(model).__name__}")
    return paths


def _within(path: str, scope: tuple[str, ...]) -> bool:
    return any(s == "" or path == s or path.startswith(s + ".") for s in scope)


class _Norms:
    """Every BatchNorm module in eval mode for the trace (the mode Tune mode is
    for, whatever mode the model is in when tuned); the modes are restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()
                      if norm_module_form(m) is not None]

    def __enter__(self) -> None:
        for module, _ in self.modes:
            module.training = False

    def __exit__(self, *exc: Any) -> None:
        for module, training in self.modes:
            module.training = training


@torch.no_grad()
def module_calls(model: nn.Module, args: tuple[Any, ...]
                 ) -> tuple[Counter[int], list[tuple[str, str]]]:
    """How often each module's forward runs in one eager forward (by ``id``): a
    module called twice cannot be tuned for one of its calls; and the conv-BN module
    pairs that forward runs (:class:`coverage.PairHooks`). Buffers and the RNG state
    are restored."""
    calls: Counter[int] = Counter()

    def count(module: nn.Module, inputs: Any) -> None:
        calls[id(module)] += 1

    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    handle = nn.modules.module.register_module_forward_pre_hook(count)
    try:
        with torch.random.fork_rng(devices=regions._cuda_devices(model)), \
                coverage.PairHooks(model) as hooks:
            model(*args)
    finally:
        handle.remove()
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    return calls, hooks.pairs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _decide(model: nn.Module, traced: regions.TracedPair, calls: Counter[int],
            policy: str, ratio: float) -> tuple[Action, Reason, str]:
    pair, cand = traced.pair, traced.candidate
    if cand.reject is not None:
        return Action.SKIP, cand.reject, cand.detail
    conv = _get(model, pair.conv) if pair.conv_calls else None
    bn = _get(model, pair.bn) if pair.bn_calls else None
    form = None if conv is None else conv_module_form(conv)
    if form is None:
        where = f"inside {type(conv).__name__} {pair.conv!r}" if conv is not None else \
            "in the root's forward"
        return Action.SKIP, Reason.NOT_MODULE, f"the {cand.op} is a functional call {where}"
    if type(conv).forward is not form.module.forward:  # type: ignore[union-attr]
        return Action.SKIP, Reason.CUSTOM_FORWARD, (
            f"{Reason.CUSTOM_FORWARD.sentence} ({type(conv).__name__})")
    if bn is None or _norm_kind(bn, cand.norm) is None:
        what = "in the root's forward" if bn is None else f"in {type(bn).__name__} {pair.bn!r}"
        return Action.SKIP, Reason.NOT_MODULE, (
            f"the {cand.norm} {what} is not a BatchNorm module or a frozen BatchNorm tune knows")
    reused = [f"{p} ({calls[id(m)]} calls)" for p, m in ((pair.conv, conv), (pair.bn, bn))
              if calls[id(m)] != 1]
    if reused:
        return Action.SKIP, Reason.MODULE_REUSED, (
            f"{Reason.MODULE_REUSED.sentence}: {', '.join(reused)}")
    choice = decide(cand, policy, ratio)
    if choice.action is Action.SKIP:
        return Action.SKIP, Reason.POLICY_EVAL, f"{Reason.POLICY_EVAL.sentence} ({choice.detail})"
    return choice.action, Reason.TUNED, choice.detail


def plan_tune(model: nn.Module, example_inputs: Any, *, policy: str = "auto",
              modules: Modules = None, ratio: float = AUTO_RATIO) -> TunePlan:
    """The plan :func:`tune` would apply, without changing ``model``."""
    _check_model(model, "tune")
    check_policy(policy)
    check_ratio(ratio)
    scope = _scope(model, modules)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with _Norms(model):
        try:
            calls, seen = module_calls(model, args)
        except Exception as exc:
            raise ValueError(f"tune(): {type(model).__name__} rejects the example inputs "
                             f"({_first_line(exc)})") from exc
        traced = regions.trace_pairs(model, args)
    decisions = []
    for t in traced:
        if not (_within(t.pair.conv, scope) and _within(t.pair.bn, scope)):
            continue
        action, reason, detail = _decide(model, t, calls, policy, ratio)
        cand = t.candidate
        decisions.append(Decision(t.graph, t.pair.conv, t.pair.bn, str(cand.op), action,
                                  reason, detail, cand.weight_numel, cand.activation_numel,
                                  cand.norm))
    # Pairs an eager forward runs that no traced graph holds: their data flow is unknown.
    traced_paths = {(t.pair.conv, t.pair.bn) for t in traced}
    for conv_path, bn_path in dict.fromkeys(seen):
        if (conv_path, bn_path) in traced_paths or not (
                _within(conv_path, scope) and _within(bn_path, scope)):
            continue
        conv = model.get_submodule(conv_path)
        form = conv_module_form(conv)
        decisions.append(Decision(0, conv_path, bn_path, form.name if form else "conv",
                                  Action.SKIP, Reason.NOT_TRACED, Reason.NOT_TRACED.sentence,
                                  conv.weight.numel(), None))
    return TunePlan(tuple(decisions), policy, float(ratio), scope)


# ---------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------

def tune(model: nn.Module, example_inputs: Any, *, policy: str = "auto",
         modules: Modules = None, ratio: float = AUTO_RATIO) -> TunePlan:
    """Put every sound Conv→BatchNorm pair of ``model`` in Tune mode, in place,
    without compiling; returns the plan (one decision per candidate pair).

    ``example_inputs``: a tuple of positional arguments for ``model`` (or one
    tensor), run once eagerly and once under Dynamo to find the pairs; nothing in
    the model changes from it. ``policy``: as for the compiled pass (``auto``,
    ``memory``: rebuild W′ in backward, ``keep_weight``: save W′), ``ratio``: the
    ``auto`` policy's threshold. ``modules``: limit tune to these submodules (module
    paths, as MMEngine's ``efficient_conv_bn_eval = ["backbone"]``, or a module
    class); the trace still runs the whole model.

    Every check runs before anything changes: on an error nothing is tuned.
    """
    plan = plan_tune(model, example_inputs, policy=policy, modules=modules, ratio=ratio)
    links = []
    for d in plan.tuned:
        conv, bn = model.get_submodule(d.conv), model.get_submodule(d.bn)
        kind = _norm_kind(bn, d.norm)
        assert kind is not None
        link = _Link(conv, bn, d.conv, d.bn, d.action is Action.TUNE_KEEP_WEIGHT, kind)
        for module, forward in ((conv, _tuned_conv_forward), (bn, _tuned_norm_forward)):
            module.__dict__[_LINK] = link
            module.__dict__["forward"] = functools.partial(forward, module)
        links.append(link)
    if links:
        root = _Root(tuple(links))
        root.hooks = (model.register_forward_pre_hook(_root_pre_hook).id,
                      model.register_forward_hook(_root_post_hook).id)
        model.__dict__[_ROOT] = root
    return plan


def untune(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """Undo :func:`tune` anywhere in ``model``: every module runs its stock forward
    again. Returns the ``(conv, bn)`` paths restored, relative to the module tune
    was given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"untune() takes a torch.nn.Module, not {type(model).__name__}")
    restored = []
    for module in model.modules():
        root = module.__dict__.pop(_ROOT, None)
        if root is None:
            continue
        pre, post = root.hooks
        module._forward_pre_hooks.pop(pre, None)
        module._forward_hooks.pop(post, None)
        for link in root.links:
            for tuned in (link.conv, link.bn):
                tuned.__dict__.pop(_LINK, None)
                tuned.__dict__.pop("forward", None)
            restored.append((link.conv_path, link.bn_path))
    if not restored:
        inner = next((p for p, m in model.named_modules() if _LINK in m.__dict__), None)
        if inner is not None:
            raise ValueError(f"untune(): module {inner or '(root)'!r} was tuned by tune() on "
                             "a module that encloses this one; untune that module")
    return tuple(restored)


def is_tuned(model: nn.Module) -> bool:
    """Whether :func:`tune` has put a pair of ``model`` (or of a submodule) in Tune mode."""
    return any(_ROOT in m.__dict__ for m in model.modules())
