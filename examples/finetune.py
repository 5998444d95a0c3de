"""Fine-tune a ResNet with BatchNorm in eval mode, with and without convbn_pass.

The job the pass exists for, end to end, on real images that ship inside
scikit-learn (its 8×8 handwritten digits, upsampled; nothing is downloaded):

1. Train a small ResNet (``convbn_pass.zoo.ResNet``) from scratch, BatchNorm in
   Train mode, on the digits 0–4: the "pretrained backbone", with real BN
   statistics.
2. Give it a new head and fine-tune the whole network on the digits 5–9 with
   BatchNorm in eval mode (running statistics frozen, γ and β still trained):
   the transfer-learning setting. This is done twice from the same weights and
   on the same batches: once compiled plainly, once compiled with the pass.
   The two runs take turns step by step, so that a busy machine slows both alike.
3. Print the two loss curves side by side, the test accuracy, the activation
   memory each step keeps for backward, compile and step times; save a plot of
   both loss curves. The pass changes what is kept for backward, not what is
   computed: with ``--dtype float64`` the curves agree to ~1e-14 over every
   step. In float32 each step's gradients are as close to float64 with the pass
   as without it (the script checks this), but training amplifies rounding
   differences step by step, so the two curves drift apart: over the 88 steps,
   by at most 7.1e-4 with torch's default threads and 1.2e-2 with one thread
   (measured on 2 CPU cores; the rounding depends on the thread count).

Run::

    python examples/finetune.py                     # CPU: 3-6 minutes on 2 busy cores
    python examples/finetune.py --device cuda
    python examples/finetune.py --help

The part to copy is ``compile_model`` (in ``examples_common.py``): each mode gets
its own ``options``, so Dynamo compiles them apart (a second compile of the same
model class would otherwise reuse the first one's graph, whatever the global
config says).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import pathlib
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

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "finetune_loss.png"


# --- data ---------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    x: torch.Tensor  # [N, 3, size, size], normalised
    y: torch.Tensor  # [N], class indices 0..4


def load_tasks(size: int, limit: int | None, seed: int) -> tuple[Split, Split, Split]:
    """scikit-learn's digits as (source train, target train, target test).

    Source task: the digits 0–4. Target task: the digits 5–9 (labels 0–4), 80 %
    for fine-tuning and 20 % held out for the accuracy. Images are upsampled
    from 8×8 to ``size``×``size`` and repeated over 3 channels for the ResNet stem.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)      # [N, 1, 8, 8], 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1)                     # [N, 3, size, size]
    y = torch.tensor(digits.target, dtype=torch.long)

    gen = torch.Generator().manual_seed(seed)
    source = torch.nonzero(y < 5).squeeze(1)
    target = torch.nonzero(y >= 5).squeeze(1)
    source = source[torch.randperm(len(source), generator=gen)][:limit]
    target = target[torch.randperm(len(target), generator=gen)][:limit]
    n_test = max(1, len(target) // 5)
    test, train = target[:n_test], target[n_test:]
    return (Split(x[source], y[source]), Split(x[train], y[train] - 5),
            Split(x[test], y[test] - 5))


def batches(split: Split, batch: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``epochs`` shuffled epochs; the last partial batch of an
    epoch is dropped, so every step has the same shape (no recompile)."""
    gen = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(epochs):
        perm = torch.randperm(len(split.y), generator=gen)
        order += [perm[i:i + batch] for i in range(0, len(perm) - batch + 1, batch)]
    return order


# --- model ----------------------------------------------------------------------

def build_model(layers: Sequence[int], width: int, seed: int) -> zoo.ResNet:
    torch.manual_seed(seed)
    return zoo.ResNet(zoo.BasicBlock, list(layers), num_classes=5, width=width)


def pretrain(model: nn.Module, data: Split, args: argparse.Namespace,
             device: torch.device) -> None:
    """Step 1: train from scratch in Train mode (BN on batch statistics), eagerly."""
    from tqdm import tqdm

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.pretrain_lr, momentum=0.9,
                          weight_decay=5e-4)
    order = batches(data, args.batch, args.pretrain_epochs, args.seed)
    for idx in tqdm(order, desc="pretrain (Train-mode BN, eager)", file=sys.stderr,
                    disable=args.quiet):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x[idx].to(device)), data.y[idx].to(device))
        loss.backward()
        opt.step()


# --- one fine-tuning run ----------------------------------------------------------

@dataclasses.dataclass
class Run:
    name: str
    model: nn.Module
    compiled: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    device: torch.device
    saved_bytes: int = 0          # activations kept for backward by one step
    first_call_s: float = 0.0     # compile + one forward/backward
    grad_error: float = 0.0       # first step's gradients vs float64 eager (relative norm)
    tuned: int = 0                # blocks the pass rewrote
    candidates: int = 0           # Conv→BN blocks it looked at
    losses: list[float] = dataclasses.field(default_factory=list)
    step_s: list[float] = dataclasses.field(default_factory=list)
    cuda_peak: int = 0            # most memory a step allocated above what was resident
    # What the pass decided on each graph it compiled (filled by compile_model's callback).
    decisions: list[convbn_pass.Decision] = dataclasses.field(default_factory=list)

    def first_call(self, x: torch.Tensor, reference: dict[str, torch.Tensor]) -> None:
        """Compile; measure what one step keeps for backward and how far its
        gradients are from the float64 ``reference``."""
        start = time.perf_counter()
        self.saved_bytes = saved_activation_bytes(self.compiled, self.model, x)
        sync(self.device)
        self.first_call_s = time.perf_counter() - start
        self.grad_error = max(
            float((p.grad.double() - reference[n]).norm() / reference[n].norm().clamp_min(1e-30))
            for n, p in self.model.named_parameters())
        self.tuned = sum(d.tuned for d in self.decisions)
        self.candidates = len(self.decisions)
        self.optimizer.zero_grad(set_to_none=True)  # drop the measuring step's gradients

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.device.type == "cuda":
            resident = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.compiled(x), y)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        self.step_s.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - resident
            self.cuda_peak = max(self.cuda_peak, peak)

    @torch.no_grad()
    def accuracy(self, data: Split) -> float:
        # The eager module shares the compiled one's weights; evaluating eagerly
        # avoids compiling an inference graph for each run.
        correct = 0
        for i in range(0, len(data.y), 256):
            logits = self.model(data.x[i:i + 256].to(self.device))
            correct += int((logits.argmax(1).cpu() == data.y[i:i + 256]).sum())
        return correct / len(data.y)


def reference_gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``model(x).sum()`` in float64, eagerly: the yardstick both
    compiled runs are held to (eager float32 is itself no precise reference)."""
    ref = copy.deepcopy(model).double()
    ref(x.double()).sum().backward()
    return {name: p.grad for name, p in ref.named_parameters()}


def finetune(backbone: zoo.ResNet, train: Split, args: argparse.Namespace,
             device: torch.device) -> list[Run]:
    """Step 2: the two fine-tuning runs, from identical weights, on identical batches."""
    from tqdm import tqdm

    torch.manual_seed(args.seed + 1)
    head = nn.Linear(backbone.fc.in_features, 5)
    backbone.fc = head.to(device, backbone.fc.weight.dtype)  # a new head for the new task
    backbone.eval()  # BN on running statistics; ResNet has no dropout

    runs = []
    for name, policy in (("without pass", None), (f"with pass ({args.policy})", args.policy)):
        model = copy.deepcopy(backbone)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        decided: list[convbn_pass.Decision] = []
        compiled = compile_model(model, policy, args.backend, decided)
        runs.append(Run(name, model, compiled, opt, device, decisions=decided))

    order = batches(train, args.batch, args.epochs, args.seed + 2)
    first = train.x[order[0]].to(device)
    reference = reference_gradients(backbone, first)
    for run in runs:
        if not args.quiet:
            print(f"compiling {run.name} ({args.backend}) ...", file=sys.stderr, flush=True)
        run.first_call(first, reference)
    if runs[1].tuned == 0:
        raise RuntimeError("the pass rewrote no block: the comparison would be meaningless")

    for i, idx in enumerate(tqdm(order, desc="fine-tune (eval-mode BN, both runs)",
                                 file=sys.stderr, disable=args.quiet)):
        x, y = train.x[idx].to(device), train.y[idx].to(device)
        # Alternate which run goes first, so neither always runs on a warm cache.
        for run in (runs if i % 2 == 0 else runs[::-1]):
            run.step(x, y)
    return runs


# --- report -----------------------------------------------------------------------

def report(runs: list[Run], test: Split, args: argparse.Namespace) -> None:
    """Print the loss curves side by side and the summary table."""
    base, tuned = runs
    diffs = [abs(a - b) for a, b in zip(base.losses, tuned.losses)]
    rels = [d / max(abs(a), 1e-12) for d, a in zip(diffs, base.losses)]
    close = next((i for i, r in enumerate(rels) if r > 1e-5), len(rels))

    print(f"\nLoss curves ({len(base.losses)} fine-tuning steps, batch {args.batch}):")
    print(f"{'step':>6}  {base.name:>14}  {tuned.name:>20}  {'|difference|':>12}")
    shown = sorted({*range(0, len(diffs), max(1, len(diffs) // 10)), len(diffs) - 1})
    for i in shown:
        print(f"{i + 1:>6}  {base.losses[i]:>14.6f}  {tuned.losses[i]:>20.6f}  {diffs[i]:>12.2e}")
    print(f"largest difference: {max(diffs):.2e} absolute, {max(rels):.2e} relative; "
          f"the first {close} of {len(rels)} steps agree to 1e-5 relative")
    if close < len(rels):
        print(f"The first step's gradients are {base.grad_error:.1e} (without) and "
              f"{tuned.grad_error:.1e} (with the pass) from float64, but training amplifies "
              "rounding differences step by step (a ReLU whose input lands within rounding "
              "distance of 0 flips, for one), so the curves drift apart; with --dtype "
              "float64 they agree to ~1e-14 throughout.")

    warm = args.warmup
    rows = [
        ("activation memory kept for backward",
         *(mb(r.saved_bytes) for r in runs)),
        ("compile + first step", *(f"{r.first_call_s:.1f} s" for r in runs)),
        (f"step time (median of {len(base.step_s[warm:])}, after {warm} warm-up)",
         *(f"{statistics.median(r.step_s[warm:]) * 1e3:.1f} ms" for r in runs)),
        ("first step's gradients vs float64 eager", *(f"{r.grad_error:.1e}" for r in runs)),
        ("final loss (mean of last 10 steps)",
         *(f"{statistics.fmean(r.losses[-10:]):.4f}" for r in runs)),
        (f"test accuracy ({len(test.y)} held-out digits 5-9)",
         *(f"{r.accuracy(test) * 100:.1f} %" for r in runs)),
        ("Conv-BN blocks tuned", "(no pass)", f"{tuned.tuned} of {tuned.candidates}"),
    ]
    if base.device.type == "cuda":
        rows.insert(1, ("CUDA peak of a step, above resident",
                        *(mb(r.cuda_peak) for r in runs)))
    saving = 1 - tuned.saved_bytes / base.saved_bytes
    speed = statistics.median(tuned.step_s[warm:]) / statistics.median(base.step_s[warm:])
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {base.name:>14}  {tuned.name:>20}")
    for label, a, b in rows:
        print(f"{label:<{width}}  {a:>14}  {b:>20}")
    print(f"\nThe pass keeps {saving:.1%} less activation memory for backward; "
          f"step time with/without: {speed:.2f}.")


def check(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """What went wrong, if anything: the figures this example stands on."""
    base, tuned = runs
    problems = []
    if tuned.saved_bytes >= base.saved_bytes:
        problems.append("the pass kept no less activation memory than compiling without it")
    floor = 1e-5 if args.dtype == torch.float32 else 1e-12
    if tuned.grad_error > max(10 * base.grad_error, floor):
        problems.append(f"the pass's gradients are {tuned.grad_error:.1e} from float64, "
                        f"compiling without it {base.grad_error:.1e}")
    if args.rtol is not None:
        rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(base.losses, tuned.losses))
        if rel > args.rtol:
            problems.append(f"the loss curves differ by {rel:.2e} (relative), more than "
                            f"--rtol {args.rtol:g}")
    return problems


def plot(runs: list[Run], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, tuned = runs
    steps = range(1, len(base.losses) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    for run, style in ((base, dict(linewidth=2.5, alpha=0.6)),
                       (tuned, dict(linestyle="--", linewidth=1.2, color="black"))):
        top.plot(steps, run.losses, label=f"{run.name}: {mb(run.saved_bytes)} "
                 "kept for backward", **style)
    top.set_ylabel("training loss")
    top.set_title("Fine-tuning with eval-mode BatchNorm, torch.compile with and without "
                  "convbn_pass")
    top.title.set_fontsize(9)
    top.legend()
    diffs = [abs(a - b) or float("nan") for a, b in zip(base.losses, tuned.losses)]
    bottom.semilogy(steps, diffs, ".-", color="tab:red", markersize=3)  # gaps: equal losses
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = examples_common.parser(
        "Fine-tune a ResNet with eval-mode BatchNorm, compiled with and without "
        "convbn_pass, on scikit-learn's digits; compare loss, memory and time.")
    parser.add_argument("--layers", default="2,2,2,2",
                        help="blocks per ResNet stage (default 2,2,2,2: ResNet-18's layout)")
    parser.add_argument("--width", type=int, default=16, help="stem channels (default 16)")
    parser.add_argument("--size", type=int, default=32, help="image side after upsampling (32)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs (default 4)")
    parser.add_argument("--pretrain-lr", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    parser.add_argument("--warmup", type=int, default=3,
                        help="fine-tuning steps left out of the step time (default 3)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use at most this many images per task (quick runs)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="float64 shows that the two loss curves differ by rounding only")
    parser.add_argument("--rtol", type=float, default=None,
                        help="exit with status 1 if the loss curves differ by more than this "
                             "(relative); default 1e-9 in float64, unchecked in float32, "
                             "where training amplifies rounding")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"plot file (default {DEFAULT_OUT})")
    return examples_common.parse(parser, argv, _check)


def _check(args: argparse.Namespace, fail: examples_common.Fail) -> None:
    try:
        args.layers = [int(n) for n in args.layers.split(",")]
    except ValueError:
        fail(f"--layers takes four integers such as 2,2,2,2, not {args.layers!r}")
    if len(args.layers) != 4 or min(args.layers) < 1:
        fail(f"--layers takes four positive integers, not {args.layers}")
    for name in ("width", "size", "batch", "epochs", "pretrain_epochs"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    args.dtype = getattr(torch, args.dtype)
    if args.rtol is None and args.dtype == torch.float64:
        args.rtol = 1e-9


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with process_settings(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = args.device
    wall = time.perf_counter()

    source, train, test = load_tasks(args.size, args.limit, args.seed)
    steps = len(train.y) // args.batch * args.epochs
    if steps <= args.warmup:
        print(f"finetune.py: error: {steps} fine-tuning steps leave none after "
              f"{args.warmup} warm-up steps; raise --epochs or --limit, or lower --batch",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {device}, backend {args.backend}; "
          f"ResNet layers {args.layers} width {args.width}, {args.size}x{args.size} digits; "
          f"pretrain on {len(source.y)} images of 0-4, fine-tune on {len(train.y)} of 5-9 "
          f"({steps} steps), test on {len(test.y)}")

    model = build_model(args.layers, args.width, args.seed).to(device, args.dtype)
    source, train, test = (Split(s.x.to(args.dtype), s.y) for s in (source, train, test))
    pretrain(model, source, args, device)
    runs = finetune(model, train, args, device)
    report(runs, test, args)
    plot(runs, args.out)
    print(f"plot: {args.out}")
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    for problem in check(runs, args):
        print(f"finetune.py: error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
