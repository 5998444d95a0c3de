"""One training step's backward, shared by the memory measurement, ``inspect``,
the examples and the benchmarks: the gradient of the sum of every output.

::

    train_step(compiled, model, x)   # forward, backward of sum(outputs), grads dropped
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

__all__ = ["backward", "train_step"]


def backward(out: Any) -> None:
    """Backward of the sum of every tensor output that requires grad (in float32 at
    least, so that half-precision sums do not overflow); nested lists, tuples and
    dicts of outputs included. Outputs that need no gradient are left alone."""
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors:
        torch.autograd.backward([t.float().sum() for t in tensors])


def train_step(fn: Callable[..., Any], model: nn.Module, *inputs: Any) -> None:
    """``fn(*inputs)``, its :func:`backward`, then ``model``'s gradients dropped."""
    backward(fn(*inputs))
    model.zero_grad(set_to_none=True)
