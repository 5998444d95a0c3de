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
AUTO_RATIO = 1.0


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
    act, weight = candidate.activation_numel, candidate.weight_numel
    if act is None or weight is None:
        return Choice(Action.TUNE, "sizes unknown: tuned, which never keeps more than Eval")
    if act >= AUTO_RATIO * weight:
        return Choice(Action.TUNE, f"activation {act:,} >= weight {weight:,} elements")
    return Choice(Action.EVAL, f"activation {act:,} < weight {weight:,} elements; "
                  "rebuilding W' would cost more than the BatchNorm it replaces")
