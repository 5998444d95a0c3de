"""Activation bytes of one eager training step: Eval mode, ``convbn_pass.tune`` under
each policy, and Deploy mode (BN folded), on the same model and batch.

::

    python -m benchmarks.eager_bytes --models resnet50 mobilenet_v2 unet resnet34_layout \\
        --batch 2 --px 64 --out benchmarks/results/eager-bytes

Bytes are counted with saved-tensor hooks (``convbn_pass.memory``: unique storages
saved for backward, less parameters, buffers and the input), so they are exact
and the same on any machine; no time is measured. Models: the zoo's names
(``convbn_pass.zoo.MODELS``), ``torchvision:NAME``/``timm:NAME``, and
``resnet34_layout`` (the zoo's ResNet with torchvision ResNet-34's blocks).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from typing import Any, Sequence

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import deploy, memory, models, zoo

__all__ = ["measure", "main"]

MODES = ("eval", "tune_auto", "tune_memory", "tune_keep_weight", "deploy")
_EXTRA = {"resnet34_layout": lambda: zoo.ResNet(zoo.BasicBlock, [3, 4, 6, 3])}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _build(spec: str) -> nn.Module:
    if spec in _EXTRA:
        return _EXTRA[spec]()
    return models.load(spec).module


def _input_shape(spec: str, batch: int, px: int) -> tuple[int, ...]:
    if spec in _EXTRA:
        return (batch, 3, px, px)
    loaded = models.load(spec)
    if loaded.is_image:
        return (batch, loaded.input_shape[0], px, px)
    return (batch, *loaded.input_shape)


def _kept(model: nn.Module, x: torch.Tensor) -> int:
    return memory.saved_activation_bytes(model, model, x.detach().requires_grad_(True))


def measure(spec: str, batch: int, px: int, dtype: torch.dtype) -> dict[str, Any]:
    """One record: bytes per mode, tuned pairs per policy."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(_build(spec)).eval().to(dtype)
    x = torch.randn(_input_shape(spec, batch, px), generator=torch.Generator().manual_seed(1),
                    dtype=dtype)
    record: dict[str, Any] = {"model": spec, "batch": batch, "px": px,
                              "dtype": str(dtype).removeprefix("torch."), "bytes": {},
                              "tuned": {}, "pairs": None}
    record["bytes"]["eval"] = _kept(model, x)
    for policy in ("auto", "memory", "keep_weight"):
        tuned = copy.deepcopy(model)
        plan = convbn_pass.tune(tuned, (x,), policy=policy)
        record["bytes"][f"tune_{policy}"] = _kept(tuned, x)
        record["tuned"][policy] = len(plan.tuned)
        record["pairs"] = len(plan.decisions)
        record.setdefault("skipped", {})[policy] = plan.counts()
        del tuned
    folded = deploy.fold(model, x)
    record["bytes"]["deploy"] = _kept(folded, x)
    return record


def _table(records: Sequence[dict[str, Any]]) -> str:
    head = ["model", "batch", "px", "pairs", *[f"{m} MB" for m in MODES], "memory - deploy"]
    rows = [head, ["---"] * len(head)]
    for r in records:
        b = r["bytes"]
        rows.append([r["model"], str(r["batch"]), str(r["px"]), str(r["pairs"]),
                     *[f"{b[m] / 1e6:.2f}" for m in MODES],
                     f"{b['tune_memory'] - b['deploy']:,} B"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eager_bytes", description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "unet",
                                                   "resnet34_layout"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    records = []
    for spec in args.models:
        try:
            records.append(measure(spec, args.batch, args.px, _DTYPES[args.dtype]))
        except models.ModelError as exc:
            print(f"{spec}: {exc}", file=sys.stderr)
            return 2
    table = _table(records)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.eager_bytes " + " ".join(argv or sys.argv[1:])
        (args.out / "command.txt").write_text(
            f"{command}\n# torch {torch.__version__}\n")
        (args.out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
        (args.out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
