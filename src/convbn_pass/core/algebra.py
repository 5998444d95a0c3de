"""The Tune-mode algebra, written once.

A Conv→BatchNorm block whose BatchNorm uses its running statistics computes::

    y = γ · (conv(x, W, b) − μ̂) / sqrt(σ̂² + ε) + β

Convolution is linear in its weight, so with the per-output-channel scale

    c  = γ / sqrt(σ̂² + ε)                         # [C_out]
    W′ = W · c     (c on the output-channel axis)
    b′ = β + (b − μ̂) · c

the block is one convolution, ``y = conv(x, W′, b′)``. Rebuilding ``W′`` and ``b′``
from the real parameters on every step keeps forward and gradients identical to
Eval mode while the conv output no longer has to be kept for BatchNorm's backward
("Tune mode": Huang et al., "Efficient ConvBN Blocks for Transfer Learning and
Beyond", ICLR 2024, arXiv:2305.11624). Linear followed by BatchNorm1d is the same
algebra with a 2-D weight.

These functions are what the rewritten graph calls: each is one node in the
graph, traced through by AOTAutograd like any other Python code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bn_scale", "channel_scale", "scale_weight", "fuse_bias", "add_channel_bias"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half-precision statistics are widened: c and b′ are computed in at least
    # float32 and only the results are cast back to the weight's dtype.
    return torch.promote_types(t.dtype, torch.float32)


def bn_scale(running_var: Tensor, bn_weight: Tensor | None, eps: float) -> Tensor:
    """``c = γ / sqrt(σ̂² + ε)``, shape ``[C_out]``, in at least float32."""
    c = torch.rsqrt(running_var.to(_compute_dtype(running_var)) + eps)  # [C_out]
    if bn_weight is not None:
        c = c * bn_weight.to(c.dtype)
    return c


def channel_scale(scale: Tensor) -> Tensor:
    """A per-channel multiplier (``[1, C, 1, 1]``, ``[C, 1, 1]`` or ``[C]``) as ``c``,
    shape ``[C_out]``: a frozen BatchNorm computed as ``y * scale + shift``."""
    return scale.reshape(-1).to(_compute_dtype(scale))


def scale_weight(
    weight: Tensor, scale: Tensor, transposed: bool = False, groups: int = 1
) -> Tensor:
    """``W′ = W · c`` with ``c`` on the output-channel axis of ``weight``.

    Layouts (``k…`` are the kernel dims, none for linear):

    - conv / linear: ``W`` is ``[C_out, C_in/g, k…]``; ``c`` goes on axis 0.
    - transposed conv: ``W`` is ``[C_in, C_out/g, k…]`` and output channel
      ``o = group·(C_out/g) + j`` lives at ``W[group·(C_in/g) + i, j]``; so ``W`` is
      viewed as ``[g, C_in/g, C_out/g, k…]`` and ``c`` as ``[g, 1, C_out/g, 1…]``.
    """
    w = weight.to(_compute_dtype(weight))
    ones = [1] * (weight.dim() - 2)
    if not transposed:
        out = w * scale.reshape([-1, 1] + ones)  # [C_out, 1, 1…]
    elif groups == 1:
        out = w * scale.reshape([1, -1] + ones)  # [1, C_out, 1…]
    else:
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        grouped = w.reshape([groups, c_in // groups, c_out_g] + list(weight.shape[2:]))
        out = (grouped * scale.reshape([groups, 1, c_out_g] + ones)).reshape(weight.shape)
    return out.to(weight.dtype)


def fuse_bias(
    conv_bias: Tensor | None,
    running_mean: Tensor | None,
    scale: Tensor,
    bn_bias: Tensor | None,
    like: Tensor,
) -> Tensor:
    """``b′ = β + (b − μ̂) · c``, shape ``[C_out]``, in the dtype of ``like`` (the weight).

    ``b = 0`` when the conv has no bias, ``μ̂ = 0`` for a per-channel affine (whose
    shift ``β`` may come shaped ``[1, C, 1, 1]``)."""
    # Built from the terms present only: a constant such as zeros_like would be
    # folded by Inductor's joint-graph passes into nodes that lose the recompute tag.
    out: Tensor | None = None
    if conv_bias is not None:
        out = conv_bias.to(scale.dtype)
    if running_mean is not None:
        mean = running_mean.to(scale.dtype)
        out = -mean if out is None else out - mean
    if out is not None:
        out = out * scale
    if bn_bias is not None:
        shift = bn_bias.reshape(-1).to(scale.dtype)
        out = shift if out is None else out + shift
    if out is None:
        raise ValueError("fuse_bias: no term (conv bias, mean or shift); the conv needs no bias")
    return out.to(like.dtype)


def add_channel_bias(y: Tensor, bias: Tensor, axis: int = 1) -> Tensor:
    """``y + b′`` on the channel axis, computed in ``b′``'s dtype and cast back to ``y``'s.

    Used instead of the conv's own bias when the conv runs in half precision: the
    sum and the gradient of ``b′`` (``Σ dy``) then stay in float32, as BatchNorm's do.
    """
    shape = [1] * y.dim()
    shape[axis] = -1
    return (y + bias.reshape(shape)).to(y.dtype)
