"""A detector's training step with frozen-BN backbone, with and without convbn_pass.

Detection is where the paper reports the largest savings: detectors fine-tune a
pretrained ResNet with its BatchNorm frozen (MMDetection's ``norm_eval=True``:
running statistics fixed, γ and β still trained), on large images and small
batches, so the backbone's conv outputs dominate what a step keeps for backward.

This script builds ``convbn_pass.zoo.Detector`` (a ResNet-50 backbone, an FPN and
a shared conv-BN head, RetinaNet-shaped), sets it up as MMDetection does (BN
frozen in the backbone, stem and first stage frozen: ``frozen_stages=1``; the
head's BN trains), and runs training steps on the two real photographs that
scikit-learn ships (427×640, padded to 448×640 as detectors pad to a multiple
of 32) at batch sizes 1 and 2. For each batch size it measures, compiled without
and with the pass: activation memory kept for backward (exact, via saved-tensor
hooks), step time, compile time; and prints one table.

The backbone is randomly initialised with realistic BN statistics (no download);
memory and time do not depend on the weights. The loss is a stand-in for
RetinaNet's (every anchor background, box targets zero); it is computed outside
the compiled model and does not change what the model keeps.

Run::

    python examples/detection_backbone.py                # CPU: about 6 minutes on 2 cores
    python examples/detection_backbone.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import convbn_pass
from convbn_pass import zoo
from convbn_pass.memory import saved_activation_bytes

import examples_common
from examples_common import compile_model, mb, process_settings, sync

BACKBONES = {
    "resnet18": (zoo.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (zoo.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (zoo.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (zoo.Bottleneck, [3, 4, 23, 3]),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_images(scale: float) -> list[torch.Tensor]:
    """scikit-learn's two sample photographs as normalised [3, H, W] tensors."""
    from sklearn.datasets import load_sample_images

    images = []
    for array in load_sample_images().images:                         # [427, 640, 3] uint8
        image = torch.tensor(array).permute(2, 0, 1).float() / 255      # [3, 427, 640]
        if scale != 1.0:
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                  align_corners=False)[0]
        images.append((image - MEAN) / STD)
    return images


def make_batch(images: list[torch.Tensor], batch: int) -> torch.Tensor:
    """``batch`` images, zero-padded to a common size that is a multiple of 32."""
    chosen = [images[i % len(images)] for i in range(batch)]
    height = -(-max(im.shape[1] for im in chosen) // 32) * 32
    width = -(-max(im.shape[2] for im in chosen) // 32) * 32
    out = torch.zeros(batch, 3, height, width)
    for i, im in enumerate(chosen):
        out[i, :, :im.shape[1], :im.shape[2]] = im
    return out


def build_detector(args: argparse.Namespace) -> zoo.Detector:
    """A detector set up for fine-tuning as MMDetection does it."""
    torch.manual_seed(args.seed)
    block, layers = BACKBONES[args.backbone]
    backbone = zoo.ResNet(block, layers, width=args.width)
    zoo.randomize_bn(backbone, seed=args.seed)  # a pretrained backbone's BN is no identity
    model = zoo.Detector(backbone, fpn=args.fpn, num_classes=20)
    model.train()
    for module in backbone.modules():           # norm_eval=True: frozen BN in the backbone
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    frozen = [backbone.conv1, backbone.bn1,
              *[getattr(backbone, f"layer{i}") for i in range(1, args.frozen_stages + 1)]]
    for module in frozen:                        # frozen_stages: no gradients at all there
        module.requires_grad_(False)
    return model


def stand_in_loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """RetinaNet-like loss with every anchor background: classification logits
    against 0, box regressions against 0 (outputs alternate cls, box per level)."""
    cls, box = outputs[0::2], outputs[1::2]
    loss = sum(F.binary_cross_entropy_with_logits(c, torch.zeros_like(c)) for c in cls)
    return loss + sum(F.smooth_l1_loss(b, torch.zeros_like(b)) for b in box)


@dataclasses.dataclass
class Mode:
    name: str
    model: nn.Module
    compiled: Callable[..., list]
    optimizer: torch.optim.Optimizer
    # What the pass decided on each graph it compiled (filled by compile_model's callback).
    decisions: list[convbn_pass.Decision] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    saved_bytes: int        # activations one step keeps for backward
    first_call_s: float     # compile for this shape + one forward/backward
    step_s: list[float]     # timed steps
    tuned: int              # blocks the pass rewrote in this compile
    candidates: int         # Conv→BN blocks it saw
    cuda_peak: int = 0      # most memory a step allocated above what was resident
    loss: float = 0.0       # first timed step's loss


def first_call(mode: Mode, x: torch.Tensor) -> Result:
    before = len(mode.decisions)  # this shape's compile appends its own
    sync(x.device)
    start = time.perf_counter()
    saved = saved_activation_bytes(mode.compiled, mode.model, x)
    sync(x.device)
    elapsed = time.perf_counter() - start
    mode.optimizer.zero_grad(set_to_none=True)
    found = mode.decisions[before:]
    return Result(saved, elapsed, [], sum(d.tuned for d in found), len(found))


def train_step(mode: Mode, x: torch.Tensor, result: Result) -> None:
    device = x.device
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    mode.optimizer.zero_grad(set_to_none=True)
    loss = stand_in_loss(mode.compiled(x))
    loss.backward()
    mode.optimizer.step()
    sync(device)
    result.step_s.append(time.perf_counter() - start)
    if not result.loss:
        result.loss = loss.item()
    if device.type == "cuda":
        result.cuda_peak = max(result.cuda_peak,
                               torch.cuda.max_memory_allocated(device) - resident)


def measure(args: argparse.Namespace) -> list[tuple[tuple[int, ...], list[Result]]]:
    from tqdm import tqdm

    device = args.device
    images = load_images(args.scale)
    base = build_detector(args).to(device)
    modes = []
    for name, policy in (("without pass", None), ("with pass", args.policy)):
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        decided: list[convbn_pass.Decision] = []
        compiled = compile_model(model, policy, args.backend, decided, dynamic=False)
        modes.append(Mode(name, model, compiled, opt, decided))

    table = []
    for batch in args.batch_sizes:
        x = make_batch(images, batch).to(device)
        results = []
        for mode in modes:
            if not args.quiet:
                print(f"batch {batch}: compiling {mode.name} ({args.backend}) ...",
                      file=sys.stderr, flush=True)
            results.append(first_call(mode, x))
        steps = args.warmup + args.steps
        for i in tqdm(range(steps), desc=f"batch {batch}: training steps, both modes",
                      file=sys.stderr, disable=args.quiet):
            # The modes take turns, so that a busy machine slows both alike.
            for mode, result in (zip(modes, results) if i % 2 == 0
                                 else zip(modes[::-1], results[::-1])):
                train_step(mode, x, result)
        for result in results:
            del result.step_s[:args.warmup]
        if results[1].tuned == 0:
            raise RuntimeError("the pass rewrote no block: the comparison would be meaningless")
        table.append((tuple(x.shape), results))
    return table


def report(table: list[tuple[tuple[int, ...], list[Result]]], args: argparse.Namespace) -> None:
    """One table: a row per batch size, "without → with" for each figure."""
    groups = [("activations kept for backward", ["without", "with", "saving"])]
    if args.device.type == "cuda":
        groups.append(("CUDA peak of a step", ["without", "with", "saving"]))
    groups += [(f"step time, median of {args.steps}", ["without", "with", "ratio"]),
               ("compile + first step", ["without", "with"]),
               ("", ["blocks tuned"])]
    rows = []
    for shape, (base, tuned) in table:
        row = [str(shape[0]), "x".join(map(str, shape[1:])),
               mb(base.saved_bytes), mb(tuned.saved_bytes),
               f"{1 - tuned.saved_bytes / base.saved_bytes:.1%}"]
        if args.device.type == "cuda":
            row += [mb(base.cuda_peak), mb(tuned.cuda_peak),
                    f"{1 - tuned.cuda_peak / base.cuda_peak:.1%}"]
        base_s, tuned_s = statistics.median(base.step_s), statistics.median(tuned.step_s)
        row += [f"{base_s:.3f} s", f"{tuned_s:.3f} s", f"{tuned_s / base_s:.2f}",
                f"{base.first_call_s:.0f} s", f"{tuned.first_call_s:.0f} s",
                f"{tuned.tuned} of {tuned.candidates}"]
        rows.append(row)
    columns = ["batch", "input"] + [c for _, cols in groups for c in cols]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    # Widen each group's last column until the group title fits over its columns.
    top, i = ["", ""], 2
    for title, cols in groups:
        span = sum(widths[i:i + len(cols)]) + 2 * (len(cols) - 1)
        widths[i + len(cols) - 1] += max(0, len(title) - span)
        top.append(title.center(span + max(0, len(title) - span)))
        i += len(cols)
    top_widths = widths[:2] + [len(t) for t in top[2:]]
    print("  ".join(t.rjust(w) for t, w in zip(top, top_widths)).rstrip())
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    first = table[0][1]
    print(f"\nfirst timed step's loss: without {first[0].loss:.6f}, with {first[1].loss:.6f} "
          f"(same weights, same batch; the steps before it differ only by rounding)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = examples_common.parser(
        "Training step of a detector with frozen-BN ResNet backbone, compiled with and "
        "without convbn_pass: activation memory and time at batch 1 and 2.")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet50")
    parser.add_argument("--width", type=int, default=64, help="backbone stem channels (64)")
    parser.add_argument("--fpn", type=int, default=128, help="FPN channels (default 128)")
    parser.add_argument("--frozen-stages", type=int, choices=range(0, 5), default=1,
                        help="backbone stages with no gradients, as MMDetection's "
                             "frozen_stages (default 1: stem and layer1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="resize the 427x640 photographs by this factor (default 1)")
    parser.add_argument("--batch-sizes", default="1,2", help="default 1,2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    return examples_common.parse(parser, argv, _check)


def _check(args: argparse.Namespace, fail: examples_common.Fail) -> None:
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        fail(f"--batch-sizes takes integers such as 1,2, not {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1:
        fail("--batch-sizes must be positive")
    if args.steps < 1 or args.warmup < 0 or args.width < 1 or args.fpn < 1:
        fail("--steps, --width and --fpn must be at least 1, --warmup at least 0")
    if not 0 < args.scale <= 4:
        fail(f"--scale must be in (0, 4], not {args.scale}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    print(f"torch {torch.__version__}, device {args.device}, backend {args.backend}, "
          f"policy {args.policy}; Detector: {args.backbone} (width {args.width}, BN frozen, "
          f"frozen_stages={args.frozen_stages}) + FPN {args.fpn} + conv-BN head; "
          f"batch sizes {args.batch_sizes}\n")
    with process_settings(args.threads):
        table = measure(args)
    report(table, args)
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    if any(tuned.saved_bytes >= base.saved_bytes for _, (base, tuned) in table):
        print("detection_backbone.py: error: the pass kept no less activation memory than "
              "compiling without it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
