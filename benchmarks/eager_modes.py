"""Tune mode without the compiler, side by side: eager Eval, MMEngine's eager Tune mode,
``convbn_pass.tune`` under each policy, and eager Deploy, in one process.

Per model it builds one copy per mode from the same weights, checks each copy's output
against eager Eval, then measures the activation bytes one forward/backward step keeps
for backward (saved-tensor hooks: exact, the same run after run) and the step time
(``--rounds`` rounds, the modes taking turns within each round, ``--steps`` timed steps
per mode and round; the table gives the median over rounds of each round's median,
as a ratio to eager Eval measured in the same round, with the rounds' spread)::

    python -m benchmarks.eager_modes                       # the default models
    python -m benchmarks.eager_modes --models resnet50 unet --rounds 3 --out /tmp/eager
    python -m benchmarks.eager_modes --models resnet34_layout --batch 2 --px 64 \
        --dtype float64 --rounds 0                         # bytes only, no timing

Models: those of ``convbn_pass.models.load`` (the zoo's names, ``torchvision:NAME``,
``timm:NAME``, ``package.module:callable``), ``resnet34_layout`` (the zoo's ResNet with
ResNet-34's blocks) and the Faster R-CNN backbone below.

Modes: ``eval`` (the model as it is, BatchNorm on running statistics), ``mmengine``
(``mmengine.model.turn_on_efficient_conv_bn_eval`` on the whole model, where mmengine
imports), ``tune_<policy>`` for every policy of ``convbn_pass.POLICIES``, ``deploy``
(``convbn_pass.deploy.fold``: BatchNorm folded once, the memory floor). A mode that
cannot be built for a model (MMEngine on ConvTranspose→BN, say) is recorded with its
one-line error and left out of that model's figures.

Writes ``results.json`` (every figure), ``results.md`` (the table), ``memory.png`` and
``command.txt`` to ``--out`` (default ``benchmarks/results/eager``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import platform
import statistics
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import deploy, memory, models, zoo

from . import harness

__all__ = ["ModeRun", "ModelRun", "MODES", "build_mode", "measure", "main"]

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "timm:efficientnet_b0",
                  "benchmarks.eager_modes:fasterrcnn_backbone",
                  "benchmarks.eager_modes:fasterrcnn_backbone_bn", "unet")
# Where a model's own input would make a step too slow on a CPU.
INPUTS: dict[str, tuple[tuple[int, ...], int]] = {
    "resnet50": ((3, 160, 160), 8),
    "mobilenet_v2": ((3, 160, 160), 8),
    "timm:efficientnet_b0": ((3, 160, 160), 8),
    "benchmarks.eager_modes:fasterrcnn_backbone": ((3, 448, 640), 2),
    "benchmarks.eager_modes:fasterrcnn_backbone_bn": ((3, 448, 640), 2),
    "unet": ((3, 128, 128), 8),
}
# Models of this benchmark beyond what convbn_pass.models.load knows.
EXTRA: dict[str, Callable[[], nn.Module]] = {
    "resnet34_layout": lambda: zoo.ResNet(zoo.BasicBlock, [3, 4, 6, 3]),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES: tuple[str, ...] = ("eval", "mmengine", *(f"tune_{p}" for p in convbn_pass.POLICIES),
                          "deploy")


def fasterrcnn_backbone() -> nn.Module:
    """torchvision's Faster R-CNN ResNet-50 FPN backbone as a detector fine-tunes it from
    pretrained weights: FrozenBatchNorm2d, the stem and first stage frozen (what
    ``fasterrcnn_resnet50_fpn`` builds with ``weights_backbone`` set); random weights
    here, nothing is downloaded."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d
    return _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)


def fasterrcnn_backbone_bn() -> nn.Module:
    """The same backbone with BatchNorm2d in eval mode, γ and β trained: MMDetection's
    ``norm_eval=True`` setting, where Tune mode saves memory (a FrozenBatchNorm2d keeps
    no conv output for backward in the first place)."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    return _resnet_fpn_extractor(resnet50(weights=None), 3)


@dataclasses.dataclass
class ModeRun:
    mode: str
    error: str | None = None          # why the mode could not be built or run here
    tuned: int | None = None          # pairs in Tune mode (tune: its plan; mmengine: pairs)
    candidates: int | None = None     # pairs the tune plan decided on
    saved_bytes: int | None = None    # activation bytes one step keeps for backward
    out_error: float | None = None    # output's distance to eager Eval, relative norm
    round_s: list[float] = dataclasses.field(default_factory=list)  # median step s per round
    round_ratios: list[float] = dataclasses.field(default_factory=list)  # that / eval's


@dataclasses.dataclass
class ModelRun:
    model: str
    input: list[int]
    dtype: str
    modes: list[ModeRun]


def build_mode(mode: str, model: nn.Module, x: torch.Tensor
               ) -> tuple[nn.Module, int | None, int | None]:
    """A copy of ``model`` in ``mode``, how many pairs it put in Tune mode, and how many
    candidate pairs ``tune`` decided on (None where the mode has no such count)."""
    copied = copy.deepcopy(model)
    if mode == "eval":
        return copied, 0, None
    if mode == "deploy":
        return deploy.fold(model, x), None, None
    if mode == "mmengine":
        # What `efficient_conv_bn_eval = [name]` in an MMEngine config does to the module
        # named; here the whole model.
        from mmengine.model.efficient_conv_bn_eval import (
            turn_on_efficient_conv_bn_eval_for_single_model)
        turn_on_efficient_conv_bn_eval_for_single_model(copied)
        return copied, _mmengine_pairs(copied), None
    plan = convbn_pass.tune(copied, (x,), policy=mode.removeprefix("tune_"))
    return copied, sum(d.tuned for d in plan.decisions), len(plan.decisions)


def _mmengine_pairs(model: nn.Module) -> int:
    """Pairs MMEngine rewrote: the calls of its control function in the traced forward
    it installs as the model's ``forward``."""
    traced = getattr(model.forward, "__self__", None)
    nodes = traced.graph.nodes if isinstance(traced, torch.fx.GraphModule) else ()
    return sum(getattr(n.target, "__name__", "") == "efficient_conv_bn_eval_control"
               for n in nodes)


def _outputs(out: Any) -> torch.Tensor:
    from torch.utils._pytree import tree_leaves
    return torch.cat([t.detach().double().flatten() for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor)])


def measure(spec: str, shape: tuple[int, ...] | None, batch: int | None, rounds: int, steps: int,
            modes: Sequence[str] = MODES, dtype: torch.dtype = torch.float32,
            say: Callable[[str], None] = lambda _: None) -> ModelRun:
    """Every mode of ``modes`` on one model: bytes, output error, step time. ``shape``
    and ``batch`` default to the model's own (``convbn_pass.models.load``)."""
    torch.manual_seed(0)
    if spec in EXTRA:
        module, default = EXTRA[spec](), models.EXTERNAL_INPUT
    else:
        loaded = models.load(spec)
        module, default = loaded.module, (loaded.input_shape, loaded.batch)
    shape, batch = shape or default[0], batch or default[1]
    model = zoo.randomize_bn(module).eval().to(dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    with torch.no_grad():
        reference = _outputs(model(x))
    runs: dict[str, ModeRun] = {}
    built: dict[str, nn.Module] = {}
    for mode in modes:
        run = runs[mode] = ModeRun(mode)
        try:
            built[mode], run.tuned, run.candidates = build_mode(mode, model, x)
            with torch.no_grad():
                got = _outputs(built[mode](x))
            run.out_error = ((got - reference).norm() / reference.norm()).item()
            run.saved_bytes = memory.saved_activation_bytes(built[mode], built[mode], x)
        except Exception as exc:  # a mode that does not apply to this model
            run.error = models.one_line(exc)
            built.pop(mode, None)
        say(f"{spec} {mode}: " + (run.error or f"{run.saved_bytes:,} bytes, "
                                  f"output error {run.out_error:.1e}"))
    for index in range(rounds):
        seconds = {mode: harness.median_step(fn, fn, x, "cpu", steps)
                   for mode, fn in built.items()}
        for mode in built:
            runs[mode].round_s.append(seconds[mode])
            runs[mode].round_ratios.append(seconds[mode] / seconds["eval"])
        say(f"{spec} round {index + 1}/{rounds}: eval {seconds['eval']:.3f} s; " + ", ".join(
            f"{m} {seconds[m] / seconds['eval']:.3f}" for m in built if m != "eval"))
    return ModelRun(spec, [batch, *shape], str(dtype).removeprefix("torch."),
                    list(runs.values()))


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------

def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def _spread(ratios: list[float]) -> str:
    """Median (min–max) of per-round ratios."""
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def table(results: Sequence[ModelRun]) -> str:
    """The markdown table: MB kept and step time against eager Eval, per model and mode."""
    modes = [m.mode for m in results[0].modes] if results else []
    timed = any(m.round_s for r in results for m in r.modes)
    head = ["model, input", "pairs tuned", *(f"{m} MB" for m in modes),
            *(["eval s/step", *(f"{m} time" for m in modes[1:])] if timed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by = {m.mode: m for m in r.modes}
        cells = [f"{r.model}, {'x'.join(map(str, r.input))}", ", ".join(
            f"{m} {by[m].tuned}/{by[m].candidates}" if by[m].candidates is not None
            else f"{m} {by[m].tuned}" for m in modes
            if by[m].tuned is not None and m != "eval" and not by[m].error)]
        cells += ["fails" if by[m].error else _mb(by[m].saved_bytes) for m in modes]
        if timed:
            cells.append(f"{statistics.median(by['eval'].round_s):.3f}" if by["eval"].round_s
                         else "—")
            cells += ["fails" if by[m].error else _spread(by[m].round_ratios)
                      for m in modes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(r.model, m.mode, m.error) for r in results for m in r.modes if m.error]
    lines += ["", *(f"- {model}, {mode}: {error}" for model, mode, error in errors)]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[ModelRun], path: pathlib.Path) -> None:
    """Activation bytes per mode as a fraction of eager Eval's, one group per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m.mode for m in results[0].modes]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = []
        for r in results:
            by = {m.mode: m for m in r.modes}
            base, got = by["eval"].saved_bytes, by[mode].saved_bytes
            values.append(got / base if got is not None and base else float("nan"))
        ax.bar([j + i * width for j in range(len(results))], values, width, label=mode)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))])
    ax.set_xticklabels([r.model.rpartition(":")[2] for r in results])
    ax.set_ylabel("activation bytes kept / eager Eval's")
    ax.set_title("Eager step: activations kept for backward (missing bar: the mode fails)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eager_modes",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; 0: bytes only")
    p.add_argument("--batch", type=int, help="batch size (default: the model's, see INPUTS)")
    p.add_argument("--px", type=int, help="image side (default: the model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/eager"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "eval" not in args.modes:
        args.modes.insert(0, "eval")  # every ratio is to eager Eval
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda message: print(f"eager_modes: {message}", file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for spec in args.models:
        shape, batch = INPUTS.get(spec, (None, None))
        if args.px is not None:
            shape = (3, args.px, args.px)
        try:
            results.append(measure(spec, shape, args.batch or batch, args.rounds, args.steps,
                                   args.modes, DTYPES[args.dtype], say=say))
        except models.ModelError as exc:
            print(f"eager_modes: error: {exc}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.eager_modes " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.system()}"}
    (args.out / "results.json").write_text(json.dumps(
        {**meta, "results": [dataclasses.asdict(r) for r in results]}, indent=2) + "\n")
    (args.out / "results.md").write_text(table(results))
    (args.out / "command.txt").write_text(json.dumps(meta, indent=2) + "\n")
    plot(results, args.out / "memory.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
