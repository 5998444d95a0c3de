"""Per-block choice: tune and recompute W′, tune and keep W′, or leave Eval mode.

What each choice keeps alive from forward to backward, per block (``x`` is the
conv input, which every choice keeps for the conv's own weight gradient):

============================  ===================  ==========================
choice                        kept for backward    extra work per step
============================  ===================  ==========================
skip (Eval mode, unchanged)   x, conv output       BatchNorm fwd+bwd over the
                                                   activation
tune, recompute W′            x                    W′ built twice (weight-sized)
tune, keep W′                 x, W′                W′ built once
============================  ===================  ==========================

So "tune, recompute" is always at the activation floor (Deploy mode's), and the
question the ``auto`` policy answers is only whether the weight-sized work costs
more than the activation-sized work it replaces. It compares the conv output's
element count with the weight's, both read from the graph's shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .forms import Follow
from .match import Candidate
from .records import Action

__all__ = ["Choice", "POLICIES", "AUTO_RATIO", "CPU_SLOW_FOLLOWERS", "decide", "check_policy"]


class Choice(NamedTuple):
    action: Action
    detail: str  # why, in a sentence the CLI prints


POLICIES: dict[str, str] = {
    "auto": "tune where the conv output outweighs the weight, else keep Eval mode",
    "memory": "tune every block and rebuild W′ in backward: Deploy mode's memory",
    "keep_weight": "tune every block and keep W′ for backward (what the built-in "
    "PyTorch pass does)",
}

# ``auto`` tunes a block when activation elements >= ratio * weight elements; this is
# the default ratio. Single blocks on CPU break even at 0.15–0.3; whole models gave
# no clear winner between 0.25 and 1 (benchmarks/NOTES.md, finding 7), and above 1 a
# tuned block could keep more than the built-in pass's W′: 1 is the largest safe value.
AUTO_RATIO = 1.0

# Ops after the block for which, on CPU, Inductor's code for conv → activation
# without a BatchNorm in between is slower than Eval mode's fused BN kernels (the
# activation's saved mask is written in the other memory layout): ReLU6 blocks
# measured 1.6–6× slower alone, the ResNet-18 stem 5–7% of the whole step, a
# U-Net's encoder stages (ReLU → max-pool and skip concat) 1.172 → 1.011 of
# compile (benchmarks/results/cpu, cpu-unet). Deploy mode pays the same; the
# rewrite cannot avoid it. Not measured on GPUs.
CPU_SLOW_FOLLOWERS: tuple[tuple[Follow, ...], ...] = (
    (Follow.HARDTANH,),
    (Follow.RELU, Follow.MAX_POOL),
)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def check_ratio(ratio: float) -> float:
    if not ratio > 0:
        raise ValueError(f"the auto policy's ratio must be positive, not {ratio!r}")
    return float(ratio)


def eval_fails(candidate: Candidate) -> bool:
    """Whether Eval mode cannot run this block: ``F.batch_norm`` refuses half-precision
    weights with float32 running statistics ("expected scalar type BFloat16 but found
    Float"), the state FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``
    leaves a BatchNorm in (it casts parameters, not buffers). Tune mode computes c in
    float32 from the statistics and runs."""
    half = (torch.float16, torch.bfloat16)
    return candidate.weight_dtype in half and candidate.stats_dtype not in (None, *half)


def decide(candidate: Candidate, policy: str, ratio: float = AUTO_RATIO) -> Choice:
    """The choice for one acceptable candidate under ``policy`` (``ratio``: the
    ``auto`` policy's activation-to-weight threshold)."""
    if policy == "auto" and eval_fails(candidate):
        return Choice(Action.TUNE, "Eval mode cannot run it: half-precision BatchNorm "
                      "weights with float32 statistics")
    if policy == "memory":
        return Choice(Action.TUNE, "policy 'memory'")
    if policy == "keep_weight":
        return Choice(Action.TUNE_KEEP_WEIGHT, "policy 'keep_weight'")
    if candidate.device == "cpu" and candidate.follower in CPU_SLOW_FOLLOWERS:
        ops = "→".join(kind.value for kind in candidate.follower)
        return Choice(Action.SKIP, f"on CPU, conv → {ops} without a BatchNorm "
                      "between compiles to slower code than Eval mode")
    act, weight = candidate.activation_numel, candidate.weight_numel
    if act is None or weight is None:
        return Choice(Action.TUNE, "sizes unknown: tuned, which never keeps more than Eval")
    if act >= ratio * weight:
        return Choice(Action.TUNE, f"activation {act:,} >= weight {weight:,} elements")
    return Choice(Action.SKIP, f"activation {act:,} < weight {weight:,} elements; "
                  "rebuilding W' would cost more than the BatchNorm it replaces")
