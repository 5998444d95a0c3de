"""The benchmark harness (benchmarks/): one light-backend cell end to end, the mode
options, the target logic, and old results files. Inductor cells take minutes and
are not run here."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import convbn_pass  # noqa: E402
from benchmarks import harness, records, report, run  # noqa: E402


def test_each_compiled_mode_has_its_own_backend_options():
    """Equal options make equal backends, and Dynamo reuses a compiled graph for a
    second instance of the same model class when the backend is the same (two
    copies compiled with the pass enabled through the global config after a plain
    compile gave 0 rewrites and identical saved bytes): only the twin may equal the
    baseline."""
    modes = harness.modes_for(list(harness.MODES))
    options = {m.name: m.options() for m in modes if m.compiled}
    assert options["compile_twin"] == options["compile"]
    # Deploy modes compile another model (BN folded away), so they cannot share graphs.
    others = [m.name for m in modes if m.compiled and not m.twin and not m.deploy]
    for i, a in enumerate(others):
        for b in others[i + 1:]:
            assert options[a] != options[b], (a, b)
    assert all(opts["fx_graph_cache"] is False for opts in options.values())


def test_light_cell_end_to_end(tmp_path: pathlib.Path):
    code = run.main(["--models", "resnet_tiny", "--batches", "2", "--px", "32", "--light",
                     "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (cell,) = results["light"]
    modes = cell["modes"]
    assert modes["pass_memory"]["tuned"] == 12 and modes["builtin"]["builtin_rewrites"] == 12
    assert modes["pass_memory"]["saved_bytes"] == modes["deploy"]["saved_bytes"]
    assert modes["pass_keep_weight"]["saved_bytes"] > modes["pass_memory"]["saved_bytes"]
    assert (tmp_path / "results.md").exists() and (tmp_path / "command.txt").exists()
    assert "light backend" in (tmp_path / "results.md").read_text()


def _cell(auto_bytes: int, auto_ratio: float, twin_ratio: float) -> records.CellResult:
    def mode(saved: int, ratio: float, first: float = 10.0) -> dict:
        return {"saved_bytes": saved, "ratio": ratio, "ratio_q1": ratio, "ratio_q3": ratio,
                "first_s": first}
    return records.CellResult.from_json({"model": "m", "batch": 1, "modes": {
        "compile": mode(100, 1.0), "compile_twin": mode(100, twin_ratio),
        "compile_again": mode(100, 1.0, first=10.2),  # compile noise +2%: verdicts decided
        "builtin": mode(120, 1.0), "deploy": mode(80, 1.0), "pass_memory": mode(80, 1.0),
        "pass_auto": mode(auto_bytes, auto_ratio, first=10.5)}})


@pytest.mark.parametrize("auto_bytes, auto_ratio, twin_ratio, failing", [
    (90, 1.02, 0.97, []),                                     # slower, but within the noise
    (90, 1.05, 0.98, ["auto_time"]),                          # slower beyond the noise
    (110, 1.00, 1.00, ["auto_le_compile"]),                   # more bytes than the baseline
    (125, 1.00, 1.00, ["auto_le_compile", "auto_le_builtin"]),
])
def test_auto_targets(auto_bytes, auto_ratio, twin_ratio, failing):
    t = report.targets(_cell(auto_bytes, auto_ratio, twin_ratio))
    assert t["memory_floor"] == (0.0, True)
    assert t["compile_auto"] == (1.05, True)  # 10.5 s vs 10 s: within 10%
    assert report._auto_fails(t) == failing


def test_compile_verdict_needs_the_compile_noise():
    cell = _cell(90, 1.0, 1.0)
    del cell.modes["compile_again"]
    assert report.targets(cell)["compile_auto"][1] is None  # undecided, shown as "?"


def test_unknown_model_is_one_clear_error(capsys, tmp_path: pathlib.Path):
    assert run.main(["--models", "nope", "--batches", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model 'nope'")


# The committed results the READMEs cite, each a results.json of an older version of the
# records: they must load (fields since dropped ignored) and render.
@pytest.mark.parametrize("folder", ["cpu", "cpu-unet", "resnet18-time", "unet-rss", "blocks",
                                    "sweep"])
def test_committed_results_still_render(tmp_path: pathlib.Path, folder):
    stored = json.loads((ROOT / "benchmarks" / "results" / folder / "results.json").read_text())
    shutil.copy(ROOT / "benchmarks" / "results" / folder / "results.json", tmp_path)
    assert run.main(["--report-only", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    with open(tmp_path / "results.csv") as f:
        shown = {row["mode"] for row in csv.DictReader(f)}
    measured = {m for kind in ("cells", "light", "blocks") for c in stored.get(kind, [])
                for m in c["modes"]}
    assert shown == measured  # every measured mode is in the tables, none hidden
    assert md.startswith("# convbn_pass benchmark")


def test_a_new_policy_is_a_mode_and_a_column_everywhere(monkeypatch):
    """The mode table is built from convbn_pass.POLICIES: a policy added there is a
    default mode, compiled before the noise-only one, and the report's tables and
    targets carry it without another edit."""
    monkeypatch.setitem(convbn_pass.POLICIES, "extra", "a policy only this test has")
    modes = harness._modes()
    names = list(modes)
    assert modes["pass_extra"].policy == "extra" and modes["pass_extra"].default
    assert names.index("pass_keep_weight") < names.index("pass_extra") < names.index(
        "compile_again")
    monkeypatch.setattr(harness, "MODES", modes)
    monkeypatch.setattr(report, "MODES", modes)
    cell = _cell(90, 1.0, 1.0)
    cell.modes["pass_extra"] = records.ModeResult("pass_extra", saved_bytes=85, first_s=10.0,
                                                  ratio=1.0, ratio_q1=1.0, ratio_q3=1.0)
    md = report.markdown(records.RunResult(cells=[cell]))
    assert "compile extra" in md  # the compile target's column
    memory_header = next(line for line in md.splitlines() if line.startswith("| model")
                         and "auto tuned" in line)
    assert "pass_extra" in memory_header
    assert report.targets(cell)["compile_extra"] == (1.0, True)


def test_block_study_auto_column_is_the_pass_decision():
    """The block table's `auto` is the pass's own decision in the whole model: on CPU
    the ResNet stem (BN -> ReLU -> max-pool) stays in Eval mode although its
    activation outweighs its weight, which the ratio alone would tune."""
    from benchmarks import blocks
    found = {b.paths[0]: b for b, _ in blocks.model_blocks("resnet_tiny", 2, 32)}
    stem = found["conv1"]
    assert stem.act_over_weight >= convbn_pass.AUTO_RATIO
    assert stem.auto_action == "skip"
    assert {b.auto_action for b in found.values()} <= {"tune", "skip"}


def test_a_failing_fresh_process_is_one_error_value():
    """harness.spawn, the one way benchmarks start fresh processes: a worker that fails
    gives its last stderr line as the result's error, not an exception."""
    done = harness.spawn("benchmarks.no_such_worker", {"model": "x"})
    assert done.result == {"error": done.stderr.strip().splitlines()[-1]}
    assert "No module named benchmarks.no_such_worker" in done.result["error"]


def test_deploy_floor_light_every_pair_at_deploy_bytes(capsys, tmp_path: pathlib.Path):
    from benchmarks import deploy_floor
    out = tmp_path / "floor.json"
    assert deploy_floor.main(["--models", "resnet_tiny", "mlp_bn", "--px", "32",
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["at_floor"], r["comparable"]) for r in rows] == [
        ("resnet_tiny", True, True), ("mlp_bn", True, True)]
    assert all(r["tune_bytes"] < r["eval_bytes"] for r in rows)
    assert capsys.readouterr().out.count("= deploy") == 2


def test_deploy_floor_a_shared_pair_is_not_judged_against_deploy():
    from benchmarks import deploy_floor
    row = deploy_floor.Floor("m", "light", eval_bytes=10, tune_bytes=6, deploy_bytes=8,
                             tuned=4, folded=2)
    assert not row.comparable and not row.at_floor


@pytest.mark.parametrize("module, argv, message", [
    ("deploy_floor", ["--models", "nope"], "unknown model(s) nope"),
    ("cudagraphs", ["--model", "resnet_tiny", "--batch", "0", "--device", "cpu", "--out", "x"],
     "must be positive"),
    ("cudagraphs", ["--model", "nope", "--device", "cpu", "--out", "x"], "nope"),
])
def test_bad_input_is_one_line(capsys, module, argv, message):
    import importlib
    main = importlib.import_module(f"benchmarks.{module}").main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_report_without_matplotlib_writes_the_tables(monkeypatch, tmp_path: pathlib.Path):
    """A bare GPU machine may lack matplotlib: the tables are still written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    written = report.write_all(records.RunResult(environment={}), tmp_path)
    assert written == ["results.md"] and (tmp_path / "results.md").exists()


def test_cudagraphs_runs_the_pass_again_with_warm_graph_caches(tmp_path, monkeypatch):
    """A second run on one machine (the GPU run's rerun) is not served the first
    run's graphs: benchmarks.cudagraphs compiles with the graph caches off, so the
    pass runs and tunes every time."""
    from benchmarks import cudagraphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = convbn_pass.zoo.randomize_bn(convbn_pass.zoo.MLPBN(8, 16)).eval()
    x = torch.randn(4, 8)
    with torch._inductor.config.patch(fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=True):
        runs = [cudagraphs.measure(model, x, steps=1) for _ in range(2)]
    assert [[f.tuned for f in figures] for figures in runs] == [[0, 3], [0, 3]]


def test_report_columns_in_reading_order():
    """Reports put the modes in the order a reader compares them (baseline, built-in,
    each policy, Deploy), whatever order they were compiled in; a new policy lands
    among the policies."""
    order = harness.modes_named(reversed(list(harness.MODES)))
    policies = [f"pass_{p}" for p in convbn_pass.POLICIES]
    assert order[:2] == ["eager", "compile"] and order[-1] == "deploy"
    assert order.index("builtin") < order.index(policies[0])
    assert [m for m in order if m.startswith("pass_")] == policies
