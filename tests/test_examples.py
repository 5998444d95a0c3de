"""The examples run, with tiny settings, and print what they promise.

Each example is imported from its file and its ``main(argv)`` called in this
process (the conftest fixture gives every test fresh Dynamo state). The light
backend keeps most runs quick; one fine-tuning run goes through Inductor, the
examples' default, so that path cannot rot either.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
from types import ModuleType

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# Tiny versions of the examples' defaults: one block a stage, 4 channels, few steps.
FINETUNE_TINY = ["--layers", "1,1,1,1", "--width", "4", "--size", "16", "--limit", "96",
                 "--batch", "16", "--pretrain-epochs", "1", "--epochs", "1", "--warmup", "1",
                 "--quiet"]
DETECTION_TINY = ["--backbone", "resnet18", "--width", "8", "--fpn", "16", "--scale", "0.15",
                  "--steps", "2", "--warmup", "0", "--quiet"]


def _load(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:  # as `python examples/NAME.py` does, for `examples_common`
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _mib(text: str, label: str) -> tuple[float, float]:
    """The two MB figures of the finetune table's row ``label``."""
    match = re.search(rf"^{re.escape(label)}\s+([\d.]+) MB\s+([\d.]+) MB$", text, re.M)
    assert match, f"no row {label!r} in:\n{text}"
    return float(match.group(1)), float(match.group(2))


def _check_png(path: pathlib.Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


def _device_args(device) -> list[str]:
    return ["--device", str(device)]


def test_finetune_float64_curves_agree(tmp_path, capsys, device):
    # float64: the two runs' loss curves must agree to 1e-9 (main returns 1 otherwise).
    out = tmp_path / "loss.png"
    code = _load("finetune").main([*FINETUNE_TINY, "--backend", "light", "--dtype", "float64",
                                   "--out", str(out), *_device_args(device)])
    text = capsys.readouterr().out
    assert code == 0, text
    largest = float(re.search(r"largest difference: (\S+) absolute", text).group(1))
    assert largest < 1e-9
    without, with_pass = _mib(text, "activation memory kept for backward")
    assert with_pass < without
    _check_png(out)


@pytest.mark.inductor
def test_finetune_inductor_default_path(tmp_path, capsys, device):
    out = tmp_path / "loss.png"
    code = _load("finetune").main([*FINETUNE_TINY, "--out", str(out), *_device_args(device)])
    text = capsys.readouterr().out
    assert code == 0, text
    for row in ("compile + first step", "step time", "test accuracy", "Conv-BN blocks tuned"):
        assert row in text
    without, with_pass = _mib(text, "activation memory kept for backward")
    assert with_pass < without
    tuned = re.search(r"Conv-BN blocks tuned\s+\(no pass\)\s+(\d+) of (\d+)", text)
    assert tuned and 0 < int(tuned.group(1)) <= int(tuned.group(2))
    _check_png(out)


def test_detection_table(capsys, device):
    code = _load("detection_backbone").main([*DETECTION_TINY, "--backend", "light",
                                             *_device_args(device)])
    text = capsys.readouterr().out
    assert code == 0, text
    row = r"^\s+(\d+)\s+3x\d+x\d+\s+([\d.]+) MB\s+([\d.]+) MB\s+([\d.]+)%"
    rows = re.findall(row, text, re.M)
    assert [r[0] for r in rows] == ["1", "2"], text
    for _, without, with_pass, saving in rows:
        assert float(with_pass) < float(without) and float(saving) > 0


@pytest.mark.parametrize("name", ["finetune", "detection_backbone"])
@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--width", "0"], "must be at least 1"),
])
def test_bad_input_is_one_clear_error(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], lines
