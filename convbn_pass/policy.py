"""Per-block choice: tune and recompute W′, tune and keep W′, or leave Eval mode.

What each choice keeps alive from forward to backward, per block (``x`` is the
conv input, which every choice keeps for the conv's own weight gradient):

============================  ===================  ==========================
choice                        kept for backward    extra work per step
============================  ===================  ==========================
Eval (no rewrite)             x, conv output       BatchNorm fwd+bwd over the
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

import enum
from typing import NamedTuple

from .match import Candidate

__all__ = ["Action", "Choice", "POLICIES", "decide", "check_policy"]


class Action(str, enum.Enum):
    TUNE = "tune"                    # rewrite, W′ rebuilt in backward
    TUNE_KEEP_WEIGHT = "tune_keep_weight"  # rewrite, W′ saved for backward
    EVAL = "eval"                    # leave the block as it is


class Choice(NamedTuple):
    action: Action
    detail: str  # why, in a sentence the CLI prints


POLICIES: dict[str, str] = {
    "auto": "tune where the conv output outweighs the weight, else keep Eval mode",
    "memory": "tune every block and rebuild W′ in backward: Deploy mode's memory",
    "keep_weight": "tune every block and keep W′ for backward (what the built-in "
    "PyTorch pass does)",
}

# ``auto`` tunes a block when activation elements >= AUTO_RATIO * weight elements.
# Single blocks on CPU break even at 0.15–0.3; whole models gave no clear winner
# between 0.25 and 1 (benchmarks/NOTES.md, finding 7), and above 1 a tuned block
# could keep more than the built-in pass's W′: 1 is the largest safe value.
AUTO_RATIO = 1.0

# Activation patterns after which, on CPU, Inductor's code for conv → activation
# without a BatchNorm in between is slower than Eval mode's fused BN kernels
# (the activation's saved mask is written in the other memory layout): ReLU6
# blocks measured 1.6–6× slower alone, the ResNet-18 stem 5–7% of the whole step,
# a U-Net's encoder stages (ReLU → max-pool and skip concat) 1.172 → 1.011 of
# compile (benchmarks/results/cpu, cpu-unet).
# Deploy mode pays the same; the rewrite cannot avoid it. Not measured on GPUs.
CPU_SLOW_FOLLOWERS = ("hardtanh", "relu→max_pool")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def decide(candidate: Candidate, policy: str) -> Choice:
    """The choice for one acceptable candidate under ``policy``."""
    if policy == "memory":
        return Choice(Action.TUNE, "policy 'memory'")
    if policy == "keep_weight":
        return Choice(Action.TUNE_KEEP_WEIGHT, "policy 'keep_weight'")
    if candidate.device == "cpu" and candidate.follower in CPU_SLOW_FOLLOWERS:
        return Choice(Action.EVAL, f"on CPU, conv → {candidate.follower} without a BatchNorm "
                      "between compiles to slower code than Eval mode")
    act, weight = candidate.activation_numel, candidate.weight_numel
    if act is None or weight is None:
        return Choice(Action.TUNE, "sizes unknown: tuned, which never keeps more than Eval")
    if act >= AUTO_RATIO * weight:
        return Choice(Action.TUNE, f"activation {act:,} >= weight {weight:,} elements")
    return Choice(Action.EVAL, f"activation {act:,} < weight {weight:,} elements; "
                  "rebuilding W' would cost more than the BatchNorm it replaces")
