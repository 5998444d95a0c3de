"""Numerical equivalence of the rewritten graph with eager Eval mode.

float64: output and every gradient (parameters and input) within 1e-10 relative
error of eager Eval mode. float32: eager float32 is not a precise reference (its
rounding differs from a compiled graph's, and a ReLU or max-pool input within
rounding of a tie flips which way its gradient goes), so float32 results are
judged by their distance to a float64 reference, next to the distance of the
same graph compiled without the pass.
The bulk runs through the light backend (the pass + AOTAutograd, no code
generation); a smaller set runs end to end through Inductor.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import KINDS, Step, block, errors, inductor, light, sample, tuned

F64_TOL = 1e-10
# Rewritten and unrewritten float32 graphs round differently; the rewrite may add
# a few float32 ulps of relative error to what the graph without it already has.
F32_SLACK = 4 * torch.finfo(torch.float32).eps


def check_f64(model, x, compile_fn, expected: int = 1) -> None:
    ref = Step(model, x, dtype=torch.float64)
    got = Step(model, x, compile_fn, dtype=torch.float64)
    assert tuned() == expected
    errs = errors(got, ref)
    assert max(errs.values()) <= F64_TOL, errs
    assert got.buffers_unchanged()


def check_f32(model, x, make, expected: int = 1) -> None:
    """``make(policy)`` gives a compile function; the pass's float32 error against a
    float64 reference is no larger than the error without the pass (plus slack)."""
    ref = Step(model, x, dtype=torch.float64)
    without = errors(Step(model, x, make(None)), ref)
    assert tuned() == 0
    with_pass = Step(model, x, make("memory"))
    assert tuned() == expected
    errs = errors(with_pass, ref)
    worse = {k: (e, without[k]) for k, e in errs.items() if e > without[k] + F32_SLACK}
    assert not worse, worse
    assert with_pass.buffers_unchanged()


def case_id(kind: str, bias: bool, affine: bool, groups: int) -> str:
    """``conv2d-bias-affine-groups1``: the case, readable in a test report."""
    return (f"{kind}-{'bias' if bias else 'nobias'}-{'affine' if affine else 'noaffine'}"
            f"-groups{groups}")


def cases(rows: list[tuple[str, bool, bool, int]]) -> list[Any]:
    return [pytest.param(*row, id=case_id(*row)) for row in rows]


CASES = [(kind, bias, affine, 1) for kind in KINDS for bias in (True, False)
         for affine in (True, False)]
# in == out channels: scaling the wrong axis of a grouped transposed weight still
# runs, so only the values can tell.
CASES += [(kind, True, True, groups) for kind in KINDS if kind != "linear"
          for groups in (2, 4)]


@pytest.mark.version  # float64 numerics: in the version suite
@pytest.mark.parametrize("kind,bias,affine,groups", cases(CASES))
def test_light_float64(kind, bias, affine, groups, device):
    model = block(kind, bias=bias, affine=affine, groups=groups, c_in=4,
                  c_out=4 if groups == 4 else 6)
    check_f64(model.to(device), sample(kind, device=device), light("memory"))


@pytest.mark.parametrize("kind,bias,affine,groups", cases(CASES))
def test_light_float32(kind, bias, affine, groups, device):
    model = block(kind, bias=bias, affine=affine, groups=groups, c_in=4,
                  c_out=4 if groups == 4 else 6)
    check_f32(model.to(device), sample(kind, device=device), light)


INDUCTOR_CASES = [("conv2d", True, True, 1), ("conv2d", False, False, 2),
                  ("conv_transpose2d", False, True, 2), ("conv1d", True, True, 4),
                  ("conv_transpose3d", True, False, 1), ("linear", True, True, 1)]


@pytest.mark.version  # float64 numerics: in the version suite
@pytest.mark.inductor
@pytest.mark.parametrize("kind,bias,affine,groups", cases(INDUCTOR_CASES))
def test_inductor_float64(kind, bias, affine, groups, device):
    model = block(kind, bias=bias, affine=affine, groups=groups, c_in=4,
                  c_out=4 if groups == 4 else 6)
    check_f64(model.to(device), sample(kind, device=device), inductor("memory"))


@pytest.mark.inductor
@pytest.mark.parametrize("kind,bias,affine,groups", cases(INDUCTOR_CASES[:3]))
def test_inductor_float32(kind, bias, affine, groups, device):
    model = block(kind, bias=bias, affine=affine, groups=groups, c_in=4,
                  c_out=4 if groups == 4 else 6)
    check_f32(model.to(device), sample(kind, device=device), inductor)
