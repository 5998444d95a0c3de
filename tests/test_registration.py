"""Registration with torch.compile: enable/disable/enabled/options, composing with a
user's pass, cache keys, counters, and mode switches under one compiled function."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import convbn_pass
from convbn_pass.core import compat
from convbn_pass import backends, memory, zoo
from helpers import Step, block, errors, sample, tuned

# In the version suite (pytest -m version), except the Inductor mode-switch test, whose
# light-backend twin is in it.
VERSION = pytest.mark.version


class UserPass(CustomGraphPass):
    """A user's own pre-grad pass: counts the graphs it sees."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.calls += 1

    def uuid(self) -> str:
        return "user-pass-v1"


@pytest.fixture
def user_pass():
    saved = inductor_config.pre_grad_custom_pass
    inductor_config.pre_grad_custom_pass = user = UserPass()
    yield user
    inductor_config.pre_grad_custom_pass = saved


def _compile_and_run(model: nn.Module, x: torch.Tensor, **kw) -> None:
    torch.compile(model, **kw)(x).sum().backward()


@VERSION
def test_enable_twice_is_harmless():
    convbn_pass.enable()
    convbn_pass.enable(policy="memory")
    current = inductor_config.pre_grad_custom_pass
    assert isinstance(current, convbn_pass.ConvBNPass)
    assert current.before == () and current.policy == "memory"
    convbn_pass.disable()
    assert inductor_config.pre_grad_custom_pass is None


def _stale_graphs_warned(steps: str) -> list[str]:
    """Run ``steps`` (compile with ``options()``, compile ``plain`` without the pass,
    ``reset`` Dynamo), then enable(): the stale-graph warnings it gives."""
    x = sample("conv2d")
    for step in steps.split():
        if step == "options":
            torch.compile(block("conv2d"), options=convbn_pass.options("memory"))(x)
        elif step == "plain":
            torch.compile(block("conv2d"), backend="eager")(x)
        else:
            assert step == "reset", step
            torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        convbn_pass.enable("memory")
    return [str(w.message).split(", and Dynamo reuses")[0] for w in seen
            if "already compiled" in str(w.message)]


@pytest.mark.inductor
@pytest.mark.parametrize("steps,stale", [
    # The graph had the pass, and Dynamo was reset anyway.
    pytest.param("options reset", 0, id="options-reset"),
    pytest.param("options reset options", 0, id="options-reset-options"),
    pytest.param("options", 0, id="options"),
    pytest.param("plain", 1, id="plain"),
    pytest.param("options plain", 1, id="options-plain"),
    # The reset drops the first plain graph; the second counts.
    pytest.param("plain options reset plain", 1, id="plain-options-reset-plain"),
])
def test_enable_counts_graphs_compiled_without_the_pass_since_reset(steps, stale):
    warned = _stale_graphs_warned(steps)
    assert warned == ([f"convbn_pass.enable(): {stale} graph(s) were already compiled in "
                       "this process without the pass since Dynamo was last reset"]
                      if stale else [])


@VERSION
def test_user_pass_keeps_running_and_comes_back(user_pass):
    convbn_pass.enable(policy="memory")
    convbn_pass.enable(policy="memory")  # not wrapped twice
    assert inductor_config.pre_grad_custom_pass.before == (user_pass,)
    _compile_and_run(block("conv2d"), sample("conv2d"))
    assert user_pass.calls == 1 and tuned() == 1
    convbn_pass.disable()
    assert inductor_config.pre_grad_custom_pass is user_pass


@VERSION
def test_enabled_context_restores(user_pass):
    with convbn_pass.enabled(policy="memory"):
        assert convbn_pass.is_enabled()
        _compile_and_run(block("conv2d"), sample("conv2d"))
    assert inductor_config.pre_grad_custom_pass is user_pass
    assert tuned() == 1


@VERSION
def test_options_leave_global_config_alone(user_pass):
    opts = convbn_pass.options("memory", fx_graph_cache=False)
    assert inductor_config.pre_grad_custom_pass is user_pass
    assert opts["pre_grad_custom_pass"].before == (user_pass,)
    _compile_and_run(block("conv2d"), sample("conv2d"), options=opts)
    assert user_pass.calls == 1 and tuned() == 1


@VERSION
def test_uuid_keys_the_options():
    uuids = {convbn_pass.ConvBNPass(p).uuid() for p in convbn_pass.POLICIES}
    assert len(uuids) == len(convbn_pass.POLICIES)
    assert convbn_pass.ConvBNPass("auto").uuid() == convbn_pass.ConvBNPass("auto").uuid()
    # A user pass without uuid() makes the chain uncacheable rather than wrongly cached.
    assert convbn_pass.ConvBNPass("auto", before=(lambda graph: None,)).uuid() is None


@VERSION
@pytest.mark.inductor
def test_equal_options_reuse_graphs_past_the_recompile_limit():
    """Each torch.compile(..., options=convbn_pass.options()) of one model class with
    equal options is the same backend to Dynamo: the graph is compiled once and
    reused, never dropped to eager when Dynamo's recompile_limit (8 per code object)
    is reached after the eighth new backend."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)).relu()

    x = torch.randn(2, 4, 8, 8)
    kept = []
    with torch._dynamo.config.patch(**compat.recompile_limits(8)):
        for _ in range(10):
            model = zoo.randomize_bn(Block()).eval()
            fn = torch.compile(model, options=convbn_pass.options("memory",
                                                                  fx_graph_cache=False))
            kept.append(memory.saved_activation_bytes(fn, model, x))
    eager = Block().eval()
    assert len(set(kept)) == 1
    assert kept[0] < memory.saved_activation_bytes(eager, eager, x)  # tuned, not eager
    assert convbn_pass.options("auto") == convbn_pass.options("auto")
    assert convbn_pass.options("auto") != convbn_pass.options("memory")
    assert convbn_pass.options("auto") != convbn_pass.options("auto", ratio=4.0)


@VERSION
def test_unknown_policy_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'fast'; choose one of auto"):
        convbn_pass.options("fast")


@VERSION
def test_enable_after_plain_compile_warns():
    """Dynamo would reuse the plain graph for another instance of the class."""
    _compile_and_run(block("conv2d"), sample("conv2d"), backend=backends.light(None))
    with pytest.warns(UserWarning, match=r"options=convbn_pass.options\(\)"):
        convbn_pass.enable()


@VERSION
def test_enable_on_fresh_process_state_does_not_warn(recwarn):
    convbn_pass.disable()  # records that no graph was compiled while off
    convbn_pass.enable()
    assert not [w for w in recwarn if "convbn_pass" in str(w.message)]


@VERSION
@pytest.mark.inductor
def test_model_counts_and_matches_eager_through_inductor(caplog, tmp_path, monkeypatch):
    """A model with N eligible pairs reports N tuned and matches eager Eval mode;
    the FX graph cache stays on and no 'no uuid' warning is printed. The cache
    starts empty: an entry from an earlier run of the suite is a hit that skips the
    pass, so nothing would be counted (measured: 0 tuned on a second run)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = zoo.randomize_bn(zoo.build("resnet_tiny")[0]).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = Step(model, x, dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        got = Step(model, x, lambda m: torch.compile(
            m, options=convbn_pass.options("memory", fx_graph_cache=True)),
            dtype=torch.float64)
    assert tuned() == 12
    assert not [r for r in caplog.records if "uuid" in r.getMessage()]
    errs = errors(got, ref)
    assert max(errs.values()) <= 1e-10, errs
    assert got.buffers_unchanged()


def _mode_switches(compile_fn) -> None:
    """train → eval → train under one compiled function: eager's outputs, gradients
    and running statistics every time."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))).double()
    twin = copy.deepcopy(model)
    compiled = compile_fn(model)
    for step, mode in enumerate(["train", "eval", "train"]):
        model.train(mode == "train")
        twin.train(mode == "train")
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        out, ref = compiled(x), twin(x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        out.square().sum().backward()
        ref.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
            p.grad = q.grad = None
        for (name, b), c in zip(model.named_buffers(), twin.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
    decided = convbn_pass.decisions()
    assert sum(d.tuned for d in decided) == 2  # the eval compile
    assert sum(d.reason == "bn_training" for d in decided) >= 2  # the train compile(s)


@VERSION
def test_mode_switches_light():
    _mode_switches(lambda m: torch.compile(m, backend=backends.light("memory")))


@pytest.mark.inductor
def test_mode_switches_inductor():
    _mode_switches(lambda m: torch.compile(
        m, options=convbn_pass.options("memory", fx_graph_cache=False)))
