"""Real torchvision and timm models through ``convbn_pass.tune``, eagerly, in float64.

Each model of :data:`zoo_models.CASES` (random weights, random BatchNorm
statistics, eval mode) is tuned under the ``memory`` policy and takes one
forward/backward step next to the same model untuned (eager Eval mode), in the
fresh process that also measures it through the light backend
(:func:`zoo_models.zoo_run`):

- numbers: outputs and every gradient within 1e-10 of Eval mode on the model's
  own scale (:func:`zoo_models.scaled_errors`);
- coverage: the tuned pairs are exactly the module pairs an eager forward shows
  (:func:`zoo_models.eager_pairs`: a normalisation module whose input is the very
  tensor a conv or linear module returned, found with module hooks, without tune),
  less those the model's entry in :data:`LEFT_IN_EVAL` explains, each with the
  reason tune records;
- memory: the step keeps no more activation bytes than Eval mode.

And a torchvision Faster R-CNN with a FrozenBatchNorm2d backbone is fine-tuned
for a few SGD steps with ``tune(model.backbone, ...)``, its losses equal to the
same steps without tune.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import REASONS
from tests_zoo import zoo_models
from tests_zoo.zoo_models import Case

TOLERANCE = 1e-10  # float64: Tune mode reorders a few roundings, nothing more

# Module pairs of an eager forward that tune leaves in Eval mode, per model: the
# reason tune records, and why it is the right one for the model.
LEFT_IN_EVAL: dict[str, dict[str, str]] = {
    "timm-tf_efficientnet_b0": {
        "custom_forward": "Conv2dSame pads its input in a forward of its own (TF 'same' "
                          "padding); tune replaces stock conv forwards only"},
    "timm-tf_mobilenetv3_small_100": {
        "custom_forward": "Conv2dSame pads its input in a forward of its own (TF 'same' "
                          "padding); tune replaces stock conv forwards only"},
}


def eager_run(case: Case) -> zoo_models.TuneRun:
    """The tune part of the model's one measurement (:func:`zoo_models.zoo_run`,
    shared with the light-backend tests, in a fresh process)."""
    run = zoo_models.zoo_run(case)
    assert run.tune is not None
    return run.tune


CASES = [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])
         for case in zoo_models.CASES]


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_eval(case: Case) -> None:
    errors = eager_run(case).errors
    assert errors.output <= TOLERANCE, f"output off by {errors.output:.2e} of its largest entry"
    assert errors.gradient <= TOLERANCE, (
        f"gradient of {errors.worst} off by {errors.gradient:.2e} of the largest gradient entry")


@pytest.mark.parametrize("case", CASES)
def test_tunes_every_module_pair(case: Case) -> None:
    """Tuned pairs = the module pairs eager hooks see, less those the entry explains."""
    run = eager_run(case)
    expected = LEFT_IN_EVAL.get(case.id, {})
    assert set(expected) <= set(REASONS), set(expected) - set(REASONS)
    eager_pairs = zoo_models.zoo_run(case).eager_pairs
    tuned = [(d.conv, d.bn) for d in run.plan.tuned]
    assert not set(tuned) - set(eager_pairs), "tuned pairs the hooks do not see"
    left = {pair for pair in eager_pairs if pair not in tuned}
    reasons = {(d.conv, d.bn): str(d.reason) for d in run.plan.skipped}
    unexplained = {pair: reasons.get(pair, "no decision") for pair in left
                   if reasons.get(pair) not in expected}
    assert not unexplained, f"module pairs left in Eval mode: {unexplained}"
    assert len(tuned) == len(eager_pairs) - len(left)
    assert {str(d.reason) for d in run.plan.skipped if (d.conv, d.bn) in left} == set(expected)


@pytest.mark.parametrize("case", CASES)
def test_keeps_no_more_than_eval(case: Case) -> None:
    run = eager_run(case)
    assert run.kept_tuned <= run.kept_eval
    if run.plan.tuned and not any(d.norm == "affine" for d in run.plan.tuned):
        assert run.kept_tuned < run.kept_eval


# --- Faster R-CNN fine-tuned eagerly ---------------------------------------------------------------

STEPS = 3


def _faster_rcnn() -> nn.Module:
    """torchvision's Faster R-CNN, random weights, backbone BatchNorms frozen as
    torchvision builds them for pretrained backbones, images resized to 128 px."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=128, max_size=128)
    zoo_models.freeze_batchnorm(model.backbone.body)
    return zoo_models.randomize_norms(model).double().train()


def _data() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=gen, dtype=torch.float64) for _ in range(2)]
    targets = [{"boxes": zoo_models._fixed_boxes(128, 128, 2)[:3],
                "labels": torch.tensor([1, 2, 3])} for _ in images]
    return images, targets


def _fine_tune(model: nn.Module) -> list[dict[str, float]]:
    images, targets = _data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # the RoI heads sample proposals at random
        for _ in range(STEPS):
            loss = model(images, targets)
            opt.zero_grad()
            sum(loss.values()).backward()
            opt.step()
            losses.append({k: float(v) for k, v in loss.items()})
    return losses


def test_faster_rcnn_fine_tuned_with_tune() -> None:
    reference = _faster_rcnn()
    tuned = copy.deepcopy(reference)
    plan = convbn_pass.tune(tuned.backbone, (torch.rand(2, 3, 128, 128, dtype=torch.float64),),
                            policy="memory")
    # The ResNet-50 body: 53 conv -> FrozenBatchNorm2d pairs; the FPN has no BatchNorm.
    assert len(plan.tuned) == 53 and all(d.norm == "affine" for d in plan.tuned)
    want, got = _fine_tune(reference), _fine_tune(tuned)
    for step, (a, b) in enumerate(zip(got, want)):
        for name in b:
            assert abs(a[name] - b[name]) <= TOLERANCE * max(1.0, abs(b[name])), (step, name)
    for (name, p), q in zip(tuned.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
