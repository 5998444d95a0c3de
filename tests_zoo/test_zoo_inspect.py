"""``python -m convbn_pass.inspect`` on real torchvision and timm models.

The CLI's ``main`` runs in-process with a small input; its JSON report must say
that it tuned pairs, that their number plus the skipped ones is the number of
pairs counted without the pass (:func:`zoo_models.eligible_pairs` on the same
model and input), and that the pass kept no more activation bytes than the
baseline. The text report the same run writes (``--out``) carries the same totals.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest
import torch
import torch.fx as fx

from convbn_pass.inspect import main
from tests_zoo import zoo_models

SMALL = ["--shape", "3,64,64", "--batch", "2", "--quiet"]


def _independent_count(spec: str) -> int:
    """Eligible pairs of ``spec`` built as the CLI builds it (seed 0, float32,
    eval), counted in Dynamo's graphs without the pass."""
    import timm
    import torchvision

    source, name = spec.split(":")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = (torchvision.models.get_model(name, weights=None) if source == "torchvision"
                 else timm.create_model(name, pretrained=False))
    count = 0

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        nonlocal count
        count += len(zoo_models.eligible_pairs(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.eval(), backend=backend)(torch.randn(2, 3, 64, 64))
    torch._dynamo.reset()
    return count


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:efficientnet_b0"])
def test_inspect_on_real_models(spec: str, tmp_path: pathlib.Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Exit status 0; pairs tuned; every pair counted without the pass is a row;
    bytes with the pass <= without; the text report (``--out``) has the same totals."""
    status = main([spec, *SMALL, "--format", "json", "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert status == 0, f"exit status {status}"
    report = json.loads(stdout)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    totals, memory = report["totals"], report["memory"]
    assert report["model"]["source"] == spec.split(":")[0]
    assert totals["tuned"] > 0, totals
    assert totals["candidates"] == len(report["pairs"]) == totals["tuned"] + totals["skipped"]
    assert totals["candidates"] == _independent_count(spec)
    assert memory["with_pass_bytes"] <= memory["without_pass_bytes"], memory
    text = (tmp_path / "report.txt").read_text()
    line = re.search(r"^totals\s+(\d+) candidates?: (\d+) tuned", text, re.MULTILINE)
    assert line is not None, text[:800]
    assert (int(line.group(1)), int(line.group(2))) == (totals["candidates"], totals["tuned"])
