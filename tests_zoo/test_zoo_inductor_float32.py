"""Real models end to end through Inductor in float32, judged against float64.

Float32 results have no exact reference: eager float32 on CPU is itself some
1e-6 (relative norm) away from float64, and compiling without the pass another
distance. So each gradient of the pass's float32 run is judged by its distance
to eager float64, next to the distances of compile-without-pass and of eager
float32 (:func:`violations`).

Only gradients that are well conditioned at float32's noise level are judged.
With ReLU and max-pool networks and random statistics, a few pre-activations
lie within float32 rounding of a kink; one of them landing on the other side
changes every upstream gradient by ~1e-3 while every activation is as accurate
as without the pass. Measured on the ResNet-50 below at batch 2, 96 px, input
seed 1, policy ``memory``: one ReLU input of layer3.4 (bn2, element
[0, 212, 5, 4]) is +1.7e-5 in float64 and -8.6e-6 in float32 (the tensor's
largest entry is 238; all its entries are within 3.4e-6 of that entry of
float64, eager float32 within 1.6e-6), and every gradient above it is 4e-4 to
8e-4 off while those below it stay at 1e-6. Such a gradient is discontinuous at
the test point and says nothing about the rewrite.

:func:`sensitivity` finds them in float64: the input moved by 1e-4 of its mean
magnitude, DRAWS random directions; a gradient that moves by more than 1e-4 is
not judged. 1e-5 was too small: it moved that layer3.4 element by ~2e-5 (median
over the tensor), less than float32's own error there (2.6e-5), and three draws
left it unflipped. A smooth gradient moves by ~4e-6 under 1e-4; one flip moves
gradients by 5e-4 to 2e-3. Even so, most gradients are discontinuous at many
inputs (ResNet-50, batch 2 at 96 px: 22 to 68 of 162 judged over three input
seeds; Faster R-CNN's backbone, batch 1 at 128 px: 16 to 26 of 70 over eight), so
the test point is chosen without the pass, by :func:`choose_input`: a small input
(batch 1 at 64 px: fewer elements, fewer near-ties) and, of eight seeds, the one
at which the most gradients are well conditioned. How many are judged is printed
and recorded, and at least half must be.

The judge can fail: :func:`test_judge_catches_a_wrong_rewrite` feeds it a
rewrite whose only fault is BatchNorm's eps taken ten times too large.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import convbn_pass
import convbn_pass.backends
from tests_zoo import zoo_models
from tests_zoo.zoo_models import Case, Step

PERTURBATION = 1e-4   # of the input's mean magnitude, for the conditioning probe
DRAWS = 8             # one near-tie escapes all draws with probability ~2**-8
SEEDS = tuple(range(1, 9))  # input seeds choose_input tries
ENOUGH = 0.9          # choose_input stops at a seed where this share of gradients is judged
SENSITIVITY_LIMIT = 1e-4  # a gradient moving more than this under the probe is not judged
RATIO = 4.0           # the pass's error may be this many times the larger baseline's
FLOOR = 1e-6          # baselines below this count as this (~8 float32 ulps)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of ``got`` against ``ref``."""
    scale = float(ref.double().norm())
    return float((got.double() - ref.double()).norm()) / (scale if scale > 0 else 1.0)


def gradient_errors(step: Step, ref: Step) -> dict[str, float]:
    """Each gradient's (and the outputs', as "output") relative error against ``ref``."""
    errors = {name: rel_err(step.grads[name], g)  # type: ignore[arg-type]
              for name, g in ref.grads.items() if g is not None}
    errors["output"] = max(rel_err(o, r) for o, r in zip(step.outputs, ref.outputs))
    return errors


def sensitivity(model: torch.nn.Module, x: torch.Tensor, ref: Step) -> dict[str, float]:
    """How far each float64 gradient moves when the input moves by PERTURBATION of
    its mean magnitude: the largest relative change over DRAWS random directions."""
    gen = torch.Generator().manual_seed(11)
    worst: dict[str, float] = {}
    for _ in range(DRAWS):
        delta = torch.randn(x.shape, generator=gen, dtype=x.dtype) * PERTURBATION * x.abs().mean()
        probe = copy.deepcopy(model)
        moved = gradient_errors(zoo_models.train_step(probe, probe, x + delta), ref)
        worst = {name: max(worst.get(name, 0.0), err) for name, err in moved.items()}
    return worst


def choose_input(case: Case, model: torch.nn.Module
                 ) -> tuple[int, torch.Tensor, Step, dict[str, float]]:
    """Of the input seeds SEEDS, the one at which the most float64 gradients are
    well conditioned (the first at which a share ENOUGH is): seed, input,
    reference step and sensitivities. Chosen without running the pass."""
    best: tuple[int, int, torch.Tensor, Step, dict[str, float]] | None = None
    for seed in SEEDS:
        x = zoo_models.sample(case, seed=seed)
        reference = copy.deepcopy(model)
        ref = zoo_models.train_step(reference, reference, x)
        sens = sensitivity(model, x, ref)
        judged = sum(s <= SENSITIVITY_LIMIT for s in sens.values())
        if best is None or judged > best[0]:
            best = (judged, seed, x, ref, sens)
        if judged >= ENOUGH * len(sens):
            break
    assert best is not None
    return best[1:]


def violations(errors: dict[str, float], baselines: list[dict[str, float]],
               judged: list[str]) -> list[str]:
    """The judged gradients whose error exceeds RATIO times the larger baseline
    error (at least FLOOR)."""
    found = []
    for name in judged:
        bound = RATIO * max(FLOOR, *(b[name] for b in baselines))
        if errors[name] > bound:
            found.append(f"{name}: {errors[name]:.2e} > {bound:.2e} "
                         f"(baselines {', '.join(f'{b[name]:.1e}' for b in baselines)})")
    return found


@dataclasses.dataclass
class Float32Run:
    """Everything measured once per model, shared by the tests."""

    model32: torch.nn.Module
    seed: int                              # the input seed choose_input took
    x32: torch.Tensor
    ref: Step                              # eager float64
    sensitivity: dict[str, float]
    eager: dict[str, float]                # errors of eager float32
    errors: dict[str | None, dict[str, float]]  # Inductor float32, by policy (None: no pass)
    tuned: dict[str | None, int]

    @property
    def judged(self) -> list[str]:
        return [n for n, s in self.sensitivity.items() if s <= SENSITIVITY_LIMIT]


def _inductor_step(model: torch.nn.Module, x: torch.Tensor, policy: str | None
                   ) -> tuple[Step, int]:
    """One step through Inductor with the pass under ``policy`` (None: without it)
    in this compile's options, and the pairs the pass tuned in the graphs Dynamo
    kept, as its ``on_graph`` callback reports them."""
    torch._dynamo.reset()
    rewrites: list[convbn_pass.GraphRewrite] = []
    options = ({"fx_graph_cache": False} if policy is None
               else convbn_pass.options(policy, on_graph=rewrites.append, fx_graph_cache=False))
    model = copy.deepcopy(model)
    step = zoo_models.train_step(torch.compile(model, options=options), model, x)
    kept = zoo_models.kept_graphs((r.compile_id, r.attempt) for r in rewrites)
    tuned = sum(d.tuned for r in rewrites if (r.compile_id, r.attempt) in kept
                for d in r.decisions)
    return step, tuned


def _measure(case: Case, policies: tuple[str, ...]) -> Float32Run:
    """Everything but the judging: the test point, float64 and float32 eager
    steps, and one Inductor compile per policy (and one without the pass)."""
    model64 = zoo_models.build(case)
    seed, x64, ref, sens = choose_input(case, model64)
    model32, x32 = zoo_models.build(case, dtype=torch.float32), x64.float()
    eager_model = copy.deepcopy(model32)
    eager = gradient_errors(zoo_models.train_step(eager_model, eager_model, x32), ref)
    errors: dict[str | None, dict[str, float]] = {}
    tuned: dict[str | None, int] = {}
    for policy in (None, *policies):
        step, tuned[policy] = _inductor_step(model32, x32, policy)
        errors[policy] = gradient_errors(step, ref)
    return Float32Run(model32, seed, x32, ref, sens, eager, errors, tuned)


_POLICIES = {"torchvision-resnet50": ("memory", "auto")}
# Each Inductor compile of these models takes 35 s to 4 min on 2 shared cores; the
# default policy's run adds one and tunes 8 of ResNet-50's 53 pairs at this input
# (``memory`` tunes all), so it runs with ``-m slow``.
_SLOW = {("torchvision-resnet50", "auto")}
_RUNS: dict[str, Float32Run] = {}


def float32_run(case: Case) -> Float32Run:
    if case.id not in _RUNS:
        _RUNS[case.id] = _measure(case, _POLICIES.get(case.id, ("memory",)))
    return _RUNS[case.id]


_PARAMS = [pytest.param(case, policy, id=f"{case.id}-{policy}",
                        marks=[pytest.mark.slow] if (case.id, policy) in _SLOW else [])
           for case in zoo_models.FLOAT32_CASES
           for policy in _POLICIES.get(case.id, ("memory",))]


@pytest.mark.inductor
@pytest.mark.parametrize("case,policy", _PARAMS)
def test_float32_as_close_as_without_pass(case: Case, policy: str, record_property: Any) -> None:
    """Every well-conditioned gradient (and the outputs) of the pass's float32 run
    is within RATIO times the larger of compile-without-pass's and eager float32's
    distance to eager float64."""
    run = float32_run(case)
    judged = run.judged
    names = list(run.sensitivity)
    errors = run.errors[policy]
    record_property("judged", f"{len(judged)} of {len(names)}")
    print(f"{case.id} {policy}, input seed {run.seed}: {run.tuned[policy]} pairs tuned; {len(judged)} of "
          f"{len(names)} gradients judged; median error {statistics.median(errors[n] for n in judged):.1e}"
          f" (without pass {statistics.median(run.errors[None][n] for n in judged):.1e}, "
          f"eager float32 {statistics.median(run.eager[n] for n in judged):.1e})")
    assert run.tuned[policy] > 0, "the pass tuned nothing: there is nothing to judge"
    assert len(judged) >= len(names) / 2, f"only {len(judged)} of {len(names)} judged"
    found = violations(errors, [run.errors[None], run.eager], judged)
    assert not found, "\n".join(found)


def _eps_times_ten(gm: fx.GraphModule) -> None:
    """The fault of a wrong rewrite: every BatchNorm's eps ten times too large."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.batch_norm:
            eps = node.kwargs.get("eps", node.args[7] if len(node.args) > 7 else 1e-5)
            if "eps" in node.kwargs or len(node.args) <= 7:
                node.update_kwarg("eps", eps * 10)
            else:
                node.update_arg(7, eps * 10)
    gm.recompile()


def _faulty_backend() -> Callable[..., Any]:
    light = convbn_pass.backends.light("memory")

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        _eps_times_ten(gm)
        return light(gm, example_inputs)
    return backend


@pytest.mark.parametrize("case", [pytest.param(zoo_models.FLOAT32_CASES[0],
                                               id=zoo_models.FLOAT32_CASES[0].id)])
def test_judge_catches_a_wrong_rewrite(case: Case) -> None:
    """The same judge, fed a float32 run whose rewrite takes BatchNorm's eps ten
    times too large (1e-4 for 1e-5: c off by ~5e-5 relative), flags most judged
    gradients."""
    run = float32_run(case)
    model = copy.deepcopy(run.model32)
    faulty = zoo_models.train_step(torch.compile(model, backend=_faulty_backend()), model,
                                   run.x32)
    found = violations(gradient_errors(faulty, run.ref), [run.errors[None], run.eager],
                       run.judged)
    assert len(found) >= len(run.judged) / 2, f"only {len(found)} of {len(run.judged)} flagged"
