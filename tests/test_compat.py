"""The version-dependent pieces in convbn_pass.core.compat, on the torch this suite runs on
(CI: 2.13 and 2.14.1 in full, the oldest supported, 2.11 and 2.15.0 in the version suite)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.callback import callback_handler
from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass

import convbn_pass
from convbn_pass.core import compat
from helpers import block, counts, needs_pre_grad_switch, sample

pytestmark = pytest.mark.version  # in the version suite (pytest -m version)


class _Pass:
    def __call__(self, graph: torch.fx.Graph) -> None:
        pass


def test_custom_graph_passes_reads_every_shape_of_the_setting():
    one, two = _Pass(), _Pass()
    assert compat.custom_graph_passes(None) == []
    assert compat.custom_graph_passes(one) == [one]
    assert compat.custom_graph_passes([one, two]) == [one, two]


def test_inductor_backend_is_what_torch_compile_options_builds():
    """The wrapped backend runs Inductor with the options given: the pass in them runs."""
    model = block("conv2d").eval()
    backend = compat.inductor_backend(convbn_pass.options("memory", fx_graph_cache=False),
                                      dynamic=False)
    torch.compile(model, backend=backend)(sample("conv2d")).sum().backward()
    assert counts() == {"tuned": 1}


def test_on_compile_registers_once_and_again_after_a_reset():
    calls: list[str] = []

    def start(*args):
        calls.append("start")

    def end(*args):
        calls.append("end")
    try:
        assert compat.on_compile(start, end) and compat.on_compile(start, end)
        assert callback_handler.start_callbacks.count(start) == 1
        torch.compile(block("conv2d").eval(), backend="eager")(sample("conv2d"))
        assert calls == ["start", "end"]
        torch._dynamo.reset()  # forgets every callback
        assert start not in callback_handler.start_callbacks
        assert compat.on_compile(start, end) and start in callback_handler.start_callbacks
    finally:
        if start in callback_handler.start_callbacks:
            callback_handler.remove_start_callback(start)
        if end in callback_handler.end_callbacks:
            callback_handler.remove_end_callback(end)


def test_torch_version_is_the_installed_one():
    major, minor = compat.TORCH_VERSION
    assert torch.__version__.startswith(f"{major}.{minor}")
    assert (major, minor) >= compat.OLDEST_VERIFIED


def test_asks_pass_key_every_compile_matches_what_inductor_does():
    """Where it says so, one forward compile with every cache off asks the pass's
    uuid(); where it does not, no compile asks."""
    asked: list[int] = []

    class Keyed(convbn_pass.ConvBNPass):
        def uuid(self):
            asked.append(1)
            return super().uuid()

    model = block("conv2d").eval()
    options = {"pre_grad_custom_pass": Keyed("memory"), "fx_graph_cache": False}
    with torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        torch.compile(model, options=options)(sample("conv2d"))
    assert counts() == {"tuned": 1}
    assert bool(asked) == compat.asks_pass_key_every_compile()


@pytest.mark.parametrize("per_code, accumulated", [(8, None), (64, 4096)])
def test_recompile_limits_name_settings_dynamo_has(per_code, accumulated):
    settings = compat.recompile_limits(per_code, accumulated)
    assert list(settings.values()) == [v for v in (per_code, accumulated) if v is not None]
    with torch._dynamo.config.patch(**settings):
        for name, value in settings.items():
            assert getattr(torch._dynamo.config, name) == value


@pytest.mark.parametrize("config, on", [
    ({}, True), ({"use_pre_grad_passes": True}, True), ({"use_pre_grad_passes": False}, False),
    (object(), True),  # a torch without the setting runs them
])
def test_pre_grad_passes_on_reads_options_and_config(config, on):
    assert compat.pre_grad_passes_on(config) is on


def test_pre_grad_passes_on_reads_the_options():
    assert compat.pre_grad_passes_on(inductor_config)
    assert compat.pre_grad_passes_on({})
    assert not compat.pre_grad_passes_on({"use_pre_grad_passes": False})


@needs_pre_grad_switch
def test_pre_grad_passes_on_follows_inductor_config():
    with inductor_config.patch(use_pre_grad_passes=False):
        assert not compat.pre_grad_passes_on(inductor_config)


@pytest.mark.parametrize("spelling", ["L['self'].layer1[0].conv1",                  # 2.10 on
                                      "L['self']._modules['layer1']._modules['0'].conv1",  # 2.9
                                      "L['self']._modules['layer1'][0].conv1",
                                      "getattr(getattr(L['self'].layer1, '0'), 'conv1')"])  # 2.7 export
def test_module_paths_from_every_spelling_of_dynamo_sources(spelling):
    from convbn_pass.core.match import _normalise_path
    assert _normalise_path(spelling) == "layer1.0.conv1"


def test_recorded_val_wins_over_a_stale_example_value():
    """torch 2.7's ``export(...).module()`` leaves each ``get_attr`` node an
    ``example_value`` with the graph output's shape beside the right ``val``; the pass
    reads ``val``, so the pair is tuned rather than refused as a channel mismatch."""
    model, x = block("conv2d"), sample("conv2d")
    gm = torch.export.export(model, (x,)).module()
    stale = torch.empty(model(x).shape)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta["example_value"] = stale
    [decision] = convbn_pass.apply(gm, [x], policy="memory")
    assert (decision.reason, decision.conv, decision.bn) == ("tuned", "0", "1")
    torch.testing.assert_close(gm(x), model(x))


def test_pyproject_floor_is_the_oldest_verified():
    import pathlib
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    major, minor = compat.OLDEST_VERIFIED
    assert f"torch>={major}.{minor}" in deps


def test_custom_pass_setting_is_what_this_torch_runs():
    one, two = _Pass(), _Pass()
    assert compat.custom_pass_setting([]) is None
    assert compat.custom_pass_setting([one]) is one  # callable: runs on 2.10 and 2.11 too
    assert compat.custom_pass_setting((one, two)) == [one, two]
    assert compat.custom_graph_passes(compat.custom_pass_setting((one, two))) == [one, two]


def test_ci_tests_the_floor():
    """.ci/versions runs the version suite on the floor release."""
    import pathlib
    import re
    script = (pathlib.Path(__file__).resolve().parent.parent / ".ci" / "versions").read_text()
    floor = re.search(r"^FLOOR=(\d+)\.(\d+)\.\d+", script, re.M)
    assert floor is not None, "no FLOOR=X.Y.Z line in .ci/versions"
    assert (int(floor[1]), int(floor[2])) == compat.OLDEST_VERIFIED
