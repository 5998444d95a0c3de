"""``python -m convbn_pass.inspect``, called in-process through ``main(argv)``.

Most runs use the light backend (the default) on tiny inputs; one runs through
Inductor. Goldens hold only deterministic figures (decisions, bytes); timings go
to stderr and to the JSON's ``timings_s``, never into a golden. Refresh the
goldens with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_inspect.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import types
from typing import Any, Iterator

import expecttest
import pytest
import torch
import torch.nn as nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import convbn_pass
from convbn_pass import inspect as cli
from convbn_pass import report as report_module
from convbn_pass import zoo
from convbn_pass.core.records import Tally, tally

pytestmark = pytest.mark.version  # in the version suite (pytest -m version)

# resnet_tiny (12 conv-BN pairs) at its own input, batch 4 at 32x32: a few seconds a compile.
TINY = ["resnet_tiny", "--quiet"]
MODELS = "inspect_test_models"  # a module the tests put in sys.modules


def _block() -> nn.Module:
    # Two conv-BN pairs, both tuned under every policy at 8x8.
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


def _no_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _broken() -> nn.Module:
    raise ValueError("no weights for this one")


@contextlib.contextmanager
def _modules(**replace: Any) -> Iterator[None]:
    """Put entries in sys.modules and take only those out again (patch.dict would also
    drop every module imported meanwhile, and Dynamo's registries break on re-import)."""
    saved = {name: sys.modules.get(name) for name in replace}
    sys.modules.update(replace)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _test_models() -> contextlib.AbstractContextManager[None]:
    module = types.ModuleType(MODELS)
    vars(module).update(block=_block, no_bn=_no_bn, broken=_broken, not_a_model=lambda: 42)
    return _modules(**{MODELS: module})


@pytest.fixture(autouse=True)
def fake_models() -> Iterator[None]:
    with _test_models():
        yield


def _run(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``main(argv)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _ascii(text: str) -> str:
    """expecttest writes only printable ASCII into goldens: the report's arrow and
    prime as ASCII (the arrow itself is checked apart)."""
    return text.replace("→", "->").replace("′", "'")


def _json(*argv: str) -> dict[str, Any]:
    status, out, _ = _run(*argv, "--format", "json")
    assert status == 0
    return json.loads(out)


# ---------------------------------------------------------------------------
# Goldens.
# ---------------------------------------------------------------------------

class TestGolden(expecttest.TestCase):
    def test_text_report(self) -> None:
        status, out, err = _run(*TINY[:-1])  # with progress, which goes to stderr only
        self.assertEqual(status, 0, err)
        self.assertIn("compiling without the pass", err)
        self.assertIn("measuring activation memory with the pass", err)
        self.assertIn("  conv1 → bn1  ", out)
        self.assertExpectedInline(_ascii(out), """\
convbn_pass.inspect: resnet_tiny: ResNet-18 layout at width 8, one block a stage (tests)
input     [4, 3, 32, 32] float32 on cpu, static shapes, BatchNorm in eval mode
policy    auto: tune where the conv output outweighs the weight, else keep Eval mode
backend   light: convbn_pass.backends.light: the pass, then AOTAutograd with Inductor's partitioner, no code generation
compiles  two, each with its own options, graph caches off: without the pass 1 graph, with the pass 1 graph

Candidate pairs: 12
  #   conv -> bn                                      op      decision  reason       detail
  1   conv1 -> bn1                                    conv2d  skip      policy_eval  the policy keeps this block in Eval mode (on CPU, conv -> relu->max_pool without a BatchNorm between compiles to slower code than Eval mode)
  2   layer1.0.conv1 -> layer1.0.bn1                  conv2d  tune      tuned        activation 2,048 >= weight 576 elements
  3   layer1.0.conv2 -> layer1.0.bn2                  conv2d  tune      tuned        activation 2,048 >= weight 576 elements
  4   layer2.0.downsample.0 -> layer2.0.downsample.1  conv2d  tune      tuned        activation 1,024 >= weight 128 elements
  5   layer2.0.conv1 -> layer2.0.bn1                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 1,024 < weight 1,152 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  6   layer2.0.conv2 -> layer2.0.bn2                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 1,024 < weight 2,304 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  7   layer3.0.downsample.0 -> layer3.0.downsample.1  conv2d  tune      tuned        activation 512 >= weight 512 elements
  8   layer3.0.conv1 -> layer3.0.bn1                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 512 < weight 4,608 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  9   layer3.0.conv2 -> layer3.0.bn2                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 512 < weight 9,216 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  10  layer4.0.downsample.0 -> layer4.0.downsample.1  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 256 < weight 2,048 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  11  layer4.0.conv1 -> layer4.0.bn1                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 256 < weight 18,432 elements; rebuilding W' would cost more than the BatchNorm it replaces)
  12  layer4.0.conv2 -> layer4.0.bn2                  conv2d  skip      policy_eval  the policy keeps this block in Eval mode (activation 256 < weight 36,864 elements; rebuilding W' would cost more than the BatchNorm it replaces)

totals    12 candidates: 4 tuned (4 rebuild W' in backward, 0 keep W'), 8 skipped (policy_eval 8)
counters  torch._dynamo.utils.counters["convbn_pass"]: skipped_policy_eval=8, tuned=4

Activation memory saved for backward, one forward/backward step, light backend:
  without the pass  159,744 bytes  (159.7 kB)
  with the pass     137,216 bytes  (137.2 kB)
  saved              22,528 bytes  (22.5 kB, 14.1%)
""")

    def test_graphs_before_and_after(self) -> None:
        """--graphs: the graphs alone on stdout (so that ``| head`` shows graphs), each
        under a header; the report on stderr."""
        with _test_models():
            status, out, err = _run(f"{MODELS}:block", "--shape", "3,8,8", "--batch", "2",
                                    "--graphs", "both", "--quiet")
        self.assertEqual(status, 0)
        self.assertExpectedInline(_ascii(err), """\
convbn_pass.inspect: inspect_test_models:block: Sequential from inspect_test_models:block()
input     [2, 3, 8, 8] float32 on cpu, static shapes, BatchNorm in eval mode
policy    auto: tune where the conv output outweighs the weight, else keep Eval mode
backend   light: convbn_pass.backends.light: the pass, then AOTAutograd with Inductor's partitioner, no code generation
compiles  two, each with its own options, graph caches off: without the pass 1 graph, with the pass 1 graph

Candidate pairs: 2
  #  conv -> bn  op      decision  reason  detail
  1  0 -> 1      conv2d  tune      tuned   activation 512 >= weight 108 elements
  2  3 -> 4      conv2d  tune      tuned   activation 256 >= weight 8 elements

totals    2 candidates: 2 tuned (2 rebuild W' in backward, 0 keep W'), 0 skipped
counters  torch._dynamo.utils.counters["convbn_pass"]: tuned=2

Activation memory saved for backward, one forward/backward step, light backend:
  without the pass  5,120 bytes  (5.1 kB)
  with the pass     2,048 bytes  (2.0 kB)
  saved             3,072 bytes  (3.1 kB, 60.0%)
""")
        self.assertExpectedInline(out, """\
# graph 1 of 1, before the pass
def forward(0.weight, args_0, 1.running_mean, 1.running_var, 1.weight, 1.bias, 3.weight, 3.bias, 4.running_mean, 4.running_var, 4.weight, 4.bias):
    input_1 = F.conv2d(args_0, 0.weight, None, (1, 1), (1, 1), (1, 1), 1)
    input_2 = F.batch_norm(input_1, 1.running_mean, 1.running_var, 1.weight, 1.bias, False, 0.1, 1e-05)
    input_3 = F.relu(input_2, inplace=False)
    input_4 = F.conv2d(input_3, 3.weight, 3.bias, (1, 1), (0, 0), (1, 1), 1)
    input_5 = F.batch_norm(input_4, 4.running_mean, 4.running_var, 4.weight, 4.bias, False, 0.1, 1e-05)
    return (input_5,)

# graph 1 of 1, after the pass
def forward(0.weight, args_0, 1.running_mean, 1.running_var, 1.weight, 1.bias, 3.weight, 3.bias, 4.running_mean, 4.running_var, 4.weight, 4.bias):
    bn_scale = algebra.bn_scale(1.running_var, 1.weight, 1e-05)  # recompute
    scale_weight = algebra.scale_weight(0.weight, bn_scale)  # recompute
    fuse_bias = algebra.fuse_bias(None, 1.running_mean, bn_scale, 1.bias, 0.weight)  # recompute
    input_1 = F.conv2d(args_0, scale_weight, fuse_bias, (1, 1), (1, 1), (1, 1), 1)
    input_3 = F.relu(input_1, inplace=False)
    bn_scale_1 = algebra.bn_scale(4.running_var, 4.weight, 1e-05)  # recompute
    scale_weight_1 = algebra.scale_weight(3.weight, bn_scale_1)  # recompute
    fuse_bias_1 = algebra.fuse_bias(3.bias, 4.running_mean, bn_scale_1, 4.bias, 3.weight)  # recompute
    input_4 = F.conv2d(input_3, scale_weight_1, fuse_bias_1, (1, 1), (0, 0), (1, 1), 1)
    return (input_4,)

""")


# ---------------------------------------------------------------------------
# What the report carries.
# ---------------------------------------------------------------------------

_TOP_LEVEL = {"schema_version", "model", "input", "policy", "backend", "compiles", "pairs",
              "totals", "counters", "outside_graphs", "memory", "graphs", "timings_s",
              "versions"}
_PAIR = {"graph", "conv", "bn", "op", "action", "reason", "detail", "weight_numel",
         "activation_numel"}


def test_json_fields_are_the_compilers_records() -> None:
    report = _json(*TINY, "--graphs", "after")
    assert report["schema_version"] == report_module.SCHEMA_VERSION == 1
    assert set(report) == _TOP_LEVEL
    assert report["model"] == {"spec": "resnet_tiny", "source": "zoo",
                               "about": zoo.MODELS["resnet_tiny"].about}
    assert report["input"] == {"shape": [4, 3, 32, 32], "dtype": "float32", "device": "cpu",
                               "dynamic": False, "bn_mode": "eval"}
    assert report["policy"]["name"] == "auto" and report["backend"] == "light"
    # The rows are the decision records the pass wrote, and the counters count them.
    recorded = convbn_pass.decisions()
    assert [(p["conv"], p["bn"], p["op"], p["action"], p["reason"], p["detail"])
            for p in report["pairs"]] == [(d.conv, d.bn, d.op, d.action, d.reason, d.detail)
                                          for d in recorded]
    assert all(set(p) == _PAIR for p in report["pairs"])
    assert report["pairs"][0]["conv"] == "conv1" and report["pairs"][0]["bn"] == "bn1"
    assert report["counters"] == dict(torch._dynamo.utils.counters["convbn_pass"])
    totals = report["totals"]
    assert totals["candidates"] == len(report["pairs"]) == 12
    assert totals["tuned"] + totals["skipped"] == 12
    assert totals["tuned"] == report["counters"]["tuned"] > 0
    assert sum(totals["skipped_by_reason"].values()) == totals["skipped"]
    # Two compiles: the baseline kept more than the rewritten graph.
    mem = report["memory"]
    assert mem["backend"] == "light"
    assert mem["with_pass_bytes"] < mem["without_pass_bytes"]
    assert mem["saved_bytes"] == mem["without_pass_bytes"] - mem["with_pass_bytes"]
    assert mem["saved_fraction"] == pytest.approx(mem["saved_bytes"] / mem["without_pass_bytes"])
    assert report["compiles"] == {"without_pass_graphs": 1, "with_pass_graphs": 1,
                                  "discarded_graphs": 0, "caches": "off"}
    assert report["graphs"]["before"] is None
    [after] = report["graphs"]["after"]
    assert after.count("# recompute") == 3 * totals["tuned"]
    assert set(report["timings_s"]) == {"compile_without_pass", "measure_without_pass",
                                        "compile_with_pass", "measure_with_pass"}


def _decision(action: str, reason: str) -> convbn_pass.Decision:
    return convbn_pass.Decision(1, "conv", "bn", "conv2d", convbn_pass.Action(action),
                                convbn_pass.Reason(reason), "", None, None)


@pytest.mark.parametrize("decided,expected", [
    pytest.param([], Tally(0, 0, 0, 0, {}), id="none"),
    pytest.param([("tune", "tuned"), ("tune_keep_weight", "tuned")], Tally(2, 2, 1, 0, {}),
                 id="tuned-both-ways"),
    pytest.param([("skip", "policy_eval"), ("tune", "tuned"), ("skip", "bn_training"),
                  ("skip", "policy_eval")], Tally(4, 1, 0, 3, {"bn_training": 1, "policy_eval": 2}),
                 id="skipped-by-reason-in-key-order"),
])
def test_tally(decided: list[tuple[str, str]], expected: Tally) -> None:
    """The one count of decisions the report's totals, the benchmarks and the zoo
    tests use; report rows count as their decisions do."""
    decisions = [_decision(*d) for d in decided]
    assert tally(decisions) == expected
    assert list(tally(decisions).skipped_by_reason) == sorted(expected.skipped_by_reason)
    assert tally(report_module.rows_of([decisions])) == expected


def test_train_mode_tunes_nothing_and_says_why() -> None:
    status, out, _ = _run(*TINY, "--train")
    assert status == 0
    rows = [line for line in out.splitlines() if re.match(r"  \d+ ", line)]
    assert len(rows) == 12
    assert all(" skip " in row and "bn_training" in row for row in rows)
    assert "BatchNorm runs in training mode" in rows[0]
    assert "BatchNorm in training mode" in out
    assert "12 candidates: 0 tuned" in out
    assert 'counters["convbn_pass"]: skipped_bn_training=12' in out
    assert not any(d.tuned for d in convbn_pass.decisions())


def test_no_candidate_pairs_is_not_an_error() -> None:
    status, out, _ = _run(f"{MODELS}:no_bn", "--shape", "4", "--batch", "2", "--quiet")
    assert status == 0
    assert "nothing to tune" in out
    assert convbn_pass.decisions() == []


def test_dynamic_shapes() -> None:
    report = _json(f"{MODELS}:block", "--shape", "3,8,8", "--batch", "2", "--dynamic",
                   "--policy", "memory", "--quiet")
    assert report["input"]["dynamic"] is True
    assert [p["action"] for p in report["pairs"]] == ["tune", "tune"]


def test_out_writes_the_report_and_graphs(tmp_path: Any) -> None:
    out_dir = tmp_path / "nested" / "report"
    status, out, _ = _run(f"{MODELS}:block", "--shape", "3,8,8", "--batch", "2", "--quiet",
                          "--format", "json", "--out", str(out_dir))
    assert status == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(cli._OUT_FILES)
    report = json.loads((out_dir / "report.json").read_text())
    assert report == json.loads(out)
    text = (out_dir / "report.txt").read_text()
    assert text.startswith(f"convbn_pass.inspect: {MODELS}:block: Sequential")
    assert "2 candidates: 2 tuned" in text
    before = (out_dir / "graph_before.txt").read_text()
    after = (out_dir / "graph_after.txt").read_text()
    assert before.startswith("# graph 1 of 1, before the pass\ndef forward(")
    assert before.count("F.batch_norm(") == 2 and "# recompute" not in before
    assert after.count("F.batch_norm(") == 0 and after.count("# recompute") == 6


def test_list_prints_a_line_per_model() -> None:
    status, out, err = _run("--list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(zoo.MODELS)


@pytest.mark.inductor
def test_inductor_backend_with_a_user_pass_and_the_pass_enabled_globally() -> None:
    # The baseline must run the user's own pre-grad pass but not convbn_pass, even
    # when convbn_pass is enabled globally; the second compile runs both.
    seen: list[int] = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            seen.append(len(graph.nodes))

        def uuid(self) -> Any:
            return "user-pass"

    with torch._inductor.config.patch(pre_grad_custom_pass=UserPass()):
        convbn_pass.enable()
        try:
            report = _json(f"{MODELS}:block", "--shape", "3,8,8", "--batch", "2",
                           "--backend", "inductor", "--quiet")
        finally:
            convbn_pass.disable()
    assert len(seen) == 2
    assert report["memory"]["backend"] == "inductor"
    assert report["totals"]["tuned"] == 2 == len(convbn_pass.decisions())
    assert report["memory"]["with_pass_bytes"] < report["memory"]["without_pass_bytes"]


def test_a_baseline_that_ran_the_pass_is_refused() -> None:
    baseline = cli._Run(cli._Compile(), {"tuned": 1}, 0, 0.0, 0.0)
    tuned = cli._Run(cli._Compile(), {}, 0, 0.0, 0.0)
    with pytest.raises(cli._Failure, match="the pass ran in it"):
        cli._check_distinct(baseline, tuned)


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown model 'nope'; choose one of resnet18, "),
    (["torchvision:resnet18"], "'torchvision:resnet18' needs torchvision, which does not"),
    (["timm:resnet50"], "'timm:resnet50' needs timm, which does not import here"),
    (["no_such_package_xyz.models:build"], "cannot import 'no_such_package_xyz.models'"),
    ([f"{MODELS}:missing"], f"'{MODELS}' has no attribute 'missing'"),
    ([f"{MODELS}:broken"], "failed: ValueError: no weights for this one"),
    ([f"{MODELS}:not_a_model"], "returned int, not a torch.nn.Module"),
    (["resnet_tiny", "--shape", "5,16,16"], "rejects an input of shape [4, 5, 16, 16]"),
    (["resnet_tiny", "--shape", "3,x"], "argument --shape: '3,x' is not a shape"),
    (["resnet_tiny", "--batch", "0"], "argument --batch: '0' is not a positive integer"),
    (["resnet_tiny", "--policy", "bogus"], "invalid choice: 'bogus' (choose from 'auto'"),
    (["resnet_tiny", "--device", "nonsense"], "unknown device 'nonsense'"),
    (["resnet_tiny", "--device", "cuda:99"], "device 'cuda:99'"),
    (["resnet_tiny", "--bogus"], "unrecognized arguments: --bogus"),
    (["resnet_tiny", "--regions", "layer9"], "regions: no submodule 'layer9' in ResNet"),
    (["resnet_tiny", "--regions", "layer1,layer1.0"], "'layer1.0' lies inside region 'layer1'"),
])
def test_bad_input(argv: list[str], message: str) -> None:
    # torchvision and timm do not import, whether or not they are installed.
    with _modules(torchvision=None, timm=None):
        status, out, err = _run(*argv)  # without --quiet: no progress line either
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("convbn_pass.inspect: error: ")
    assert message in err
    assert "Traceback" not in err


def test_regions_show_the_plan_and_compile_nothing() -> None:
    status, out, err = _run(*TINY, "--regions", "auto")
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == ("resnet_tiny: 12 conv-BN pairs; 4 regions in 4 groups; "
                                   "the root compiled too (1 pair in it)")
    assert out.splitlines()[-1] == "no pair falls between regions"
    assert convbn_pass.decisions() == []  # nothing was compiled with the pass


def test_regions_name_the_pairs_a_boundary_would_separate() -> None:
    report = _json(*TINY, "--regions", "layer1.0.conv1,layer2")
    assert report["regions"] == ["layer1.0.conv1", "layer2"]
    assert report["split"] == [{"conv": "layer1.0.conv1", "bn": "layer1.0.bn1",
                                "conv_region": "layer1.0.conv1", "bn_region": None}]
    by_conv = {p["conv"]: p["region"] for p in report["pairs"]}
    assert by_conv["layer2.0.conv1"] == "layer2" and by_conv["conv1"] == ""
    assert by_conv["layer1.0.conv1"] is None
    status, out, _ = _run(*TINY, "--regions", "BasicBlock")
    assert status == 0 and "no pair falls between regions" in out


def test_debug_adds_the_traceback() -> None:
    status, _, err = _run("nope", "--quiet", "--debug")
    assert status == 2
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("convbn_pass.inspect: error: unknown model")


def test_a_reader_that_closes_the_pipe_early_is_no_error() -> None:
    """``python -m convbn_pass.inspect ... | head -40``: the reader goes away before
    the report is written; no traceback, exit status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "convbn_pass.inspect", "--list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the report: the process is still importing torch
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_pairs_that_ran_outside_every_graph_are_reported() -> None:
    """zoo.RoutedNet: Dynamo compiles the block forward once per block up to its limit
    of 8, and runs the stem from a frame it skips: those pairs get a row each, a reason,
    a counter, and a hint; a model whose pairs all compile has none."""
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default
        report = _json("routed", "--batch", "1", "--shape", "3,16,16")
    outside = [(o["conv"], o["bn"], o["reason"]) for o in report["outside_graphs"]]
    assert outside == [(f"blocks.{i}.conv", f"blocks.{i}.bn", "recompile_limit")
                       for i in range(8, 12)] + [("stem.0", "stem.1", "skipped_frame")]
    assert report["counters"]["outside_recompile_limit"] == 4
    assert report["counters"]["outside_skipped_frame"] == 1
    assert all("convbn_pass.tune" in o["hint"] for o in report["outside_graphs"])
    assert report["totals"]["candidates"] == 8
    assert _json(*TINY)["outside_graphs"] == []


# ---------------------------------------------------------------------------
# --eager: the plan of convbn_pass.tune, nothing compiled.
# ---------------------------------------------------------------------------

def test_eager_shows_the_tune_plan_and_its_bytes() -> None:
    from convbn_pass import deploy, memory

    report = _json(*TINY, "--eager", "--policy", "memory")
    assert convbn_pass.decisions() == []  # nothing was compiled with the pass
    assert report["totals"]["tuned"] == report["totals"]["candidates"] == 12
    assert [p["reason"] for p in report["pairs"]] == ["tuned"] * 12
    # The figures are those of the same steps taken here: Eval mode, and Deploy
    # mode's floor, which Tune mode under 'memory' reaches.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo.build("resnet_tiny")[0].eval()
        x = torch.randn(4, 3, 32, 32)
    folded = deploy.fold(model, x)
    mem = report["memory"]
    assert mem["without_tune_bytes"] == memory.saved_activation_bytes(model, model, x)
    assert mem["with_tune_bytes"] == memory.saved_activation_bytes(folded, folded, x)
    assert mem["saved_bytes"] == mem["without_tune_bytes"] - mem["with_tune_bytes"] > 0


def test_eager_text_names_each_decision() -> None:
    status, out, err = _run(*TINY, "--eager")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[1] == "input     [4, 3, 32, 32] float32 on cpu"
    assert "  1   conv1 → bn1  " in out and "policy_eval" in out  # auto: the stem stays Eval
    assert lines[-3].startswith("  without tune  159,744 bytes")
    assert lines[-1].startswith("  saved ")
