"""Never silently off: where Inductor will not run pre-grad passes (the config
``use_pre_grad_passes`` switched off, ``torch.compile(mode="lite")``, and from torch
2.15 ``TORCHINDUCTOR_LITE_MODE=1``), the pass says so: one warning naming the
setting, and ``counters["convbn_pass"]["pre_grad_passes_off"]``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._inductor import config as inductor_config

import convbn_pass
from convbn_pass.core import compat, inductor
from convbn_pass.core.records import COUNTER
from helpers import block, counts, needs_pre_grad_switch, sample

pytestmark = pytest.mark.version  # in the version suite (pytest -m version)

OFF = inductor.OFF_COUNTER_KEY


@pytest.fixture(autouse=True)
def _warn_afresh(monkeypatch):
    monkeypatch.setattr(inductor._off_watch, "warned", False)


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "pre-grad passes" in str(w.message)]


def test_on_by_default_says_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convbn_pass.options()
        convbn_pass.enable()
    assert inductor.pre_grad_passes_off() is None
    assert not _ours(caught)
    assert OFF not in counts()


@needs_pre_grad_switch
@pytest.mark.parametrize("setup", ["enable", "options"])
def test_config_switched_off_warns_once_and_counts_each_setup(setup):
    make = convbn_pass.enable if setup == "enable" else convbn_pass.options
    with inductor_config.patch(use_pre_grad_passes=False), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        make()
    (message,) = _ours(caught)
    assert "torch._inductor.config.use_pre_grad_passes=False" in message
    assert counts() == {OFF: 2}


@pytest.mark.parametrize("value, said", [(False, 1), (True, 0)])
def test_options_that_switch_pre_grad_passes_off(value, said):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convbn_pass.options(use_pre_grad_passes=value)
    assert [("use_pre_grad_passes=False in the options" in m) for m in _ours(caught)] == [True] * said
    assert counts().get(OFF, 0) == said


@needs_pre_grad_switch
def test_lite_mode_with_enable_is_seen_inside_the_compile():
    """mode="lite" sets use_pre_grad_passes=False for its compile only: enable() saw
    it on. Where Inductor asks the pass's key in every compile, the compile says so
    (and it is not reported as a cache hit); torch 2.11 does not ask, so nothing can."""
    convbn_pass.enable("memory")
    model = block("conv2d").eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, mode="lite")(sample("conv2d"))
    torch.testing.assert_close(out, model(sample("conv2d")))
    seen = compat.asks_pass_key_every_compile()
    assert counts() == ({OFF: 1} if seen else {})  # no "tuned", no "served_from_cache"
    assert len(_ours(caught)) == int(seen)


@needs_pre_grad_switch
def test_a_compile_counts_once_however_often_it_asks():
    with inductor_config.patch(use_pre_grad_passes=False), \
            pytest.warns(UserWarning, match="use_pre_grad_passes=False"):
        inductor._off_watch.start()
        for _ in range(3):
            assert not inductor._off_watch.check()
        inductor._off_watch.start()
        assert not inductor._off_watch.check()
    assert counts() == {OFF: 2}


_LITE_ENV = """
import warnings, torch, convbn_pass
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    convbn_pass.options()
said = [str(w.message) for w in caught if "TORCHINDUCTOR_LITE_MODE=1" in str(w.message)]
print(torch._inductor.config.use_pre_grad_passes, len(said))
"""


@needs_pre_grad_switch
def test_lite_mode_environment_variable():
    """TORCHINDUCTOR_LITE_MODE=1 (read at import): where it turns pre-grad passes off
    (torch 2.15), options() says so, naming it; where it does not, nothing is said."""
    env = {**os.environ, "TORCHINDUCTOR_LITE_MODE": "1"}
    done = subprocess.run([sys.executable, "-c", _LITE_ENV], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    use_pre_grad, said = done.stdout.split()
    assert (use_pre_grad, said) in {("True", "0"), ("False", "1")}, done.stdout
    assert (use_pre_grad == "False") == (compat.TORCH_VERSION >= (2, 15))
