"""Real torchvision and timm models through the light backend, in float64.

Each model of :data:`zoo_models.CASES` (random weights, random BatchNorm
statistics, eval mode) is measured once by :func:`zoo_models.zoo_run`: one
forward/backward eagerly and through ``convbn_pass.backends.light`` without the
pass and under the ``auto`` and ``memory`` policies. The tests below each judge
one kind of result of that measurement:

- numbers: outputs and every gradient (parameters and input) within 1e-10 of
  eager float64, on one scale per model (its largest output or gradient entry);
- coverage: under ``memory`` the tuned pairs are exactly the pairs counted
  without the pass in the same Dynamo graphs, and those are every pair an eager
  forward shows;
- memory: activation bytes kept for backward, ``auto`` <= no pass and
  ``memory`` <= ``auto``;
- reasons: every pair left alone carries the reason this model's entry
  expects, and ``auto``'s Eval-mode choices follow the README's rule.
"""

from __future__ import annotations

import collections

import pytest

from convbn_pass import REASONS, Reason
from tests_zoo import zoo_models
from tests_zoo.zoo_models import Case, zoo_run

TOLERANCE = 1e-10  # float64: the rewrite reorders a few roundings, nothing more


def _params(cases: tuple[Case, ...]) -> list[pytest.param]:
    return [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])
            for case in cases]


CASES = _params(zoo_models.CASES)


@pytest.mark.parametrize("policy", ["auto", "memory"])
@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_eager(case: Case, policy: str) -> None:
    """Outputs and every gradient within 1e-10 of eager float64, on the model's
    own scale (its largest output entry, its largest gradient entry)."""
    errors = zoo_run(case).runs[policy].errors
    assert errors.output <= TOLERANCE, f"output off by {errors.output:.2e} of its largest entry"
    assert errors.gradient <= TOLERANCE, (
        f"gradient of {errors.worst} off by {errors.gradient:.2e} of the largest gradient entry")


@pytest.mark.parametrize("case", CASES)
def test_memory_tunes_every_eligible_pair(case: Case) -> None:
    """Under ``memory`` the pass tunes exactly the pairs that
    :func:`zoo_models.eligible_pairs` counts in the same graphs, by module path."""
    run = zoo_run(case).runs["memory"]
    eligible = collections.Counter(p.key for p in run.eligible)
    tuned = collections.Counter((d.conv, d.bn) for d in run.tuned)
    left = {key: [d.reason for d in run.decisions if (d.conv, d.bn) == key and not d.tuned]
            for key in eligible - tuned}
    assert not left, f"eligible pairs not tuned (with the pass's reasons): {left}"
    assert not tuned - eligible, f"tuned pairs the independent count does not see: " \
                                 f"{sorted(tuned - eligible)}"


def _same_module(eager_path: str, graph_path: str) -> bool:
    """A graph that Dynamo compiled from a frame inside the model (after a graph
    break) names modules from that frame's ``self``: ``0.0`` for
    ``roi_heads.box_head.0.0``."""
    return eager_path == graph_path or eager_path.endswith("." + graph_path)


def _unmatched(eager: list[tuple[str, str]], graph: list[tuple[str, str]]
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The pairs of each list without a partner in the other, matched by module
    path (see :func:`_same_module`), one to one."""
    left = list(eager)
    graph_only = []
    for conv, norm in graph:
        match = next((p for p in left if _same_module(p[0], conv) and _same_module(p[1], norm)),
                     None)
        if match is None:
            graph_only.append((conv, norm))
        else:
            left.remove(match)
    return left, graph_only


@pytest.mark.parametrize("case", CASES)
def test_graphs_hold_every_eager_pair(case: Case) -> None:
    """Every conv → norm pair an eager forward shows (module hooks) is a pair in a
    Dynamo graph: no graph break or other rewriting hides one from the pass, unless
    the model's entry says why."""
    zoo = zoo_run(case)
    eager_only, graph_only = _unmatched(zoo.eager_pairs,
                                        [p.key for p in zoo.runs["memory"].eligible])
    assert not graph_only, f"pairs in graphs that eager hooks do not see: {graph_only[:8]}"
    if case.unseen is None:
        assert not eager_only, f"pairs in no graph: {eager_only[:8]}"
    else:
        assert eager_only, f"expected pairs in no graph ({case.unseen}), found none"


@pytest.mark.parametrize("case", CASES)
def test_activation_bytes_ordered(case: Case) -> None:
    """Activation bytes kept for backward (light backend, float64): ``auto`` keeps
    no more than no pass, ``memory`` no more than ``auto``."""
    runs = zoo_run(case).runs
    none, auto, memory = (runs[p].saved_bytes for p in (None, "auto", "memory"))
    assert auto <= none, f"auto keeps {auto:,} bytes, more than no pass's {none:,}"
    assert memory <= auto, f"memory keeps {memory:,} bytes, more than auto's {auto:,}"


@pytest.mark.parametrize("case", CASES)
def test_skip_reasons_expected(case: Case) -> None:
    """Under ``memory`` the reasons recorded are exactly those the model's entry
    expects (each with why); ``auto`` adds ``policy_eval`` alone."""
    unknown = set(case.skips) - set(REASONS)
    assert not unknown, f"the entry expects reasons the pass does not have: {unknown}"
    runs = zoo_run(case).runs
    assert set(runs["memory"].skips) == set(case.skips), dict(runs["memory"].skips)
    assert set(runs["auto"].skips) - {str(Reason.POLICY_EVAL)} == set(case.skips), \
        dict(runs["auto"].skips)


@pytest.mark.parametrize("case", CASES)
def test_auto_follows_its_rule(case: Case) -> None:
    """``auto`` leaves a pair in Eval mode (``policy_eval``) exactly where the
    README's rule says, judged on the independently counted pairs: its conv output
    has fewer elements than its weight, or (on CPU) BN feeds a ReLU6 or a ReLU that
    feeds a max-pool. Every other eligible pair is tuned."""
    run = zoo_run(case).runs["auto"]
    by_key: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for d in run.decisions:
        by_key[(d.conv, d.bn)].append("eval" if d.reason is Reason.POLICY_EVAL
                                      else str(d.action))
    wrong = []
    for pair in run.eligible:
        expect = ("eval" if pair.activation_numel < pair.weight_numel
                  or pair.follower is not None else "tune")
        got = by_key[pair.key].pop(0) if by_key[pair.key] else "missing"
        if got != expect:
            wrong.append(f"{pair.conv}→{pair.norm}: {got}, rule says {expect} "
                         f"(activation {pair.activation_numel}, weight {pair.weight_numel}, "
                         f"follower {pair.follower})")
    assert not wrong, "\n".join(wrong)
