"""Deploy mode: a copy of a model with each eval-mode BatchNorm folded into its conv.

``W′`` and ``b′`` are computed once (with core/algebra.py's functions) and become the
conv's own parameters; the BatchNorm becomes ``nn.Identity``. This is the memory
floor no training-capable mode can beat, and the reference the pass is measured
against; training in this mode changes what is learnt, so it is a yardstick, not
an alternative.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from torch.overrides import TorchFunctionMode

from .core import algebra
from .core.forms import conv_module_form, norm_form, norm_module_form

__all__ = ["fold", "pairs"]


def pairs(model: nn.Module, *example_inputs: Any) -> list[tuple[str, str]]:
    """``(conv path, bn path)`` of every pair that can be folded, from the data flow of
    ``model(*example_inputs)`` (:func:`convbn_pass.regions.trace_pairs`): the pass would
    accept it, both are modules that a row of ``forms.py`` reads (a frozen BN traced as
    an affine has no module row to fold), and each module runs once in an eager forward
    (:func:`convbn_pass.eager.module_calls`: a module called twice cannot be folded for
    one call only)."""
    from . import regions
    from .eager import module_calls
    with torch.no_grad():
        calls, _ = module_calls(model, example_inputs)
    found = []
    for traced in regions.trace_pairs(model, example_inputs):
        conv, bn = traced.pair.conv, traced.pair.bn
        if traced.pair.reject is None and _foldable(model, conv, bn) and all(
                calls[id(model.get_submodule(path))] == 1 for path in (conv, bn)):
            found.append((conv, bn))
    return found


def _foldable(model: nn.Module, conv_path: str, bn_path: str) -> bool:
    try:
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
    except AttributeError:
        return False
    return conv_module_form(conv) is not None and norm_module_form(bn) is not None


@torch.no_grad()
def fold(model: nn.Module, *example_inputs: Any) -> nn.Module:
    """A deep copy of ``model`` (in eval mode) in Deploy mode."""
    folded = copy.deepcopy(model).eval()
    for conv_path, bn_path in pairs(folded, *example_inputs):
        conv = folded.get_submodule(conv_path)
        bn = folded.get_submodule(bn_path)
        conv_row, norm_row = conv_module_form(conv), norm_module_form(bn)
        assert conv_row is not None and norm_row is not None
        tensors = {name: getattr(bn, name) for name in norm_row.tensors}
        scale, mean, shift = norm_row.terms(lambda fn, *args: fn(*args), tensors, bn.eps)
        groups = getattr(conv, "groups", 1)
        new = copy.deepcopy(conv)
        # W′ and b′ train where what they are made of trains: a frozen stage stays frozen
        # (trained, it would keep each conv's input for a weight gradient Eval mode
        # never computes).
        trains = [t.requires_grad for t in (conv.weight, conv.bias, bn.weight, bn.bias)
                  if isinstance(t, torch.Tensor)]
        new.weight = nn.Parameter(algebra.scale_weight(conv.weight, scale, conv_row.transposed,
                                                    groups), requires_grad=any(trains))
        new.bias = nn.Parameter(algebra.fuse_bias(conv.bias, mean, scale, shift, conv.weight),
                                requires_grad=any(trains))
        _set_submodule(folded, conv_path, new)
        stock = type(bn).forward in norm_row.forwards
        _set_submodule(folded, bn_path, nn.Identity() if stock else _AfterNorm(bn))
    return folded


class _AfterNorm(nn.Module):
    """A BatchNorm subclass whose forward does more than normalise (timm's
    ``BatchNormAct2d``: BN, then drop and activation) with its normalisation folded
    away: its forward runs, and its one batch-norm call returns its input as it is."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> Any:
        with _PassThrough(x):
            return self.norm(x)


class _PassThrough(TorchFunctionMode):
    """The first normalisation call (a row of ``forms.NORM_FORMS``) on ``x`` returns ``x``."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.done = x, False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.done and norm_form(func) is not None and args and args[0] is self.x:
            self.done = True
            return self.x
        return func(*args, **(kwargs or {}))


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
