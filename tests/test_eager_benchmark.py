"""The eager side-by-side benchmark (benchmarks/eager_modes.py) on a tiny model: every
mode built from the same weights, outputs equal to eager Eval, tune under `memory` at
Deploy mode's bytes, and its files written."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import eager_modes  # noqa: E402


def test_tiny_run_writes_every_mode(tmp_path: pathlib.Path) -> None:
    modes = ["eval", "tune_auto", "tune_memory", "tune_keep_weight", "deploy"]
    assert eager_modes.main(["--models", "resnet_tiny", "--rounds", "2", "--steps", "1",
                             "--modes", *modes, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["results"]
    by = {m["mode"]: m for m in run["modes"]}
    assert list(by) == modes and not any(m["error"] for m in by.values())
    assert all(m["out_error"] < 1e-5 for m in by.values())
    assert by["tune_memory"]["saved_bytes"] == by["deploy"]["saved_bytes"]
    assert by["tune_memory"]["saved_bytes"] < by["eval"]["saved_bytes"]
    assert by["tune_memory"]["tuned"] == by["tune_memory"]["candidates"] == 12
    assert all(len(m["round_ratios"]) == 2 for m in by.values())
    assert "tune_memory MB" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_every_policy_is_a_mode() -> None:
    """A new policy appears in the benchmark without another edit."""
    import convbn_pass
    assert [m for m in eager_modes.MODES if m.startswith("tune_")] == [
        f"tune_{p}" for p in convbn_pass.POLICIES]
