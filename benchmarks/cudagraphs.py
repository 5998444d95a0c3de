"""The pass under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), BN in eval mode.

``mode`` and ``options`` cannot be given together to ``torch.compile``, so the pass
comes in through ``convbn_pass.enable()``, after ``torch._dynamo.reset()`` so that
no graph compiled without it is reused, with Inductor's and AOTAutograd's graph
caches off so that a second run on one machine runs the pass again rather than
being served the first run's graphs. Each mode is measured on its own copy of
one model (same weights and statistics) against eager float64::

    python -m benchmarks.cudagraphs --model torchvision:resnet18 --batch 32 --px 224 --out DIR

Writes ``DIR/cudagraphs.json``: per mode the saved activation bytes, the pass's
tuned pairs, the median step time, and the float32 gradients' relative error to
eager float64 (next to compile-without-pass's, the precision to compare it with).
On a CPU (the dry run), reduce-overhead compiles without CUDA graphs.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import memory, zoo
from convbn_pass.core.records import COUNTER
from convbn_pass.step import backward, train_step

from .harness import load_model, median_step

__all__ = ["ModeFigures", "measure", "main"]


class ModeFigures(NamedTuple):
    mode: str               # "reduce-overhead" or "reduce-overhead + pass"
    tuned: int              # pairs the pass tuned in this mode's compile
    saved_bytes: int        # activation bytes kept for backward (convbn_pass.memory)
    median_s: float         # median training-step seconds after warm-up
    grad_rel_err: float     # worst parameter gradient, relative norm error to eager float64


def _grads(fn: Any, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    backward(fn(x))
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _worst_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    if set(got) != set(ref):
        raise RuntimeError(f"gradients for {sorted(set(ref) ^ set(got))} missing")
    return max(((got[n] - r).norm() / max(r.norm().item(), 1e-30)).item()
               for n, r in ref.items())


def measure(base: nn.Module, x: torch.Tensor, steps: int) -> list[ModeFigures]:
    """Both modes on copies of ``base`` (eval BN), each compiled afresh."""
    ref_model = copy.deepcopy(base).double().to(x.device)
    reference = _grads(ref_model, ref_model, x.double())
    figures = []
    for name, with_pass in (("reduce-overhead", False), ("reduce-overhead + pass", True)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.pop(COUNTER, None)
        model = copy.deepcopy(base).to(x.device)
        if with_pass:
            convbn_pass.enable("memory")
        try:
            with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                compiled = torch.compile(model, mode="reduce-overhead")
                for _ in range(3):  # CUDA graphs record on the third call
                    train_step(compiled, model, x)
                tuned = int(torch._dynamo.utils.counters[COUNTER]["tuned"])
                saved = memory.saved_activation_bytes(compiled, model, x)
                model.zero_grad(set_to_none=True)
                error = _worst_error(_grads(compiled, model, x), reference)
                step = median_step(compiled, model, x, str(x.device), steps)
        finally:
            convbn_pass.disable()
        if with_pass and tuned == 0:
            raise RuntimeError("the pass tuned no pair under reduce-overhead")
        figures.append(ModeFigures(name, tuned, saved, step, error))
    return figures


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cudagraphs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="torchvision:resnet18",
                   help="zoo name, torchvision:NAME or timm:NAME (default torchvision:resnet18)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.cudagraphs: CUDA is not available here", file=sys.stderr)
        return 2
    if min(args.batch, args.px, args.steps) < 1:
        print("benchmarks.cudagraphs: --batch, --px and --steps must be positive", file=sys.stderr)
        return 2
    try:
        module, shape = load_model(args.model, args.px)
    except (ValueError, ImportError) as error:
        print(f"benchmarks.cudagraphs: {error}", file=sys.stderr)
        return 2
    base = zoo.randomize_bn(module).eval()
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    figures = measure(base, x, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "batch": args.batch, "px": args.px, "device": str(device),
              "torch": torch.__version__, "modes": [f._asdict() for f in figures]}
    (args.out / "cudagraphs.json").write_text(json.dumps(result, indent=1) + "\n")
    for f in figures:
        print(f"{f.mode:24} tuned {f.tuned:3}  saved {f.saved_bytes / 1e6:9.1f} MB  "
              f"step {f.median_s * 1e3:8.2f} ms  grad error {f.grad_rel_err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
