"""Shared test settings.

The device comes from one switch: ``pytest --device cuda`` (or the environment
variable ``CONVBN_TEST_DEVICE``); CPU by default. Every test starts with fresh
Dynamo state, no Inductor FX graph cache (so the pass runs on every compile and
its counters are exact), and no recorded decisions.
"""

from __future__ import annotations

import os

import pytest
import torch

import convbn_pass
from convbn_pass.core import compat


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("CONVBN_TEST_DEVICE", "cpu"),
                     help="device the tests run on: cpu (default) or cuda")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit(f"--device {name} asked for, but CUDA is not available", returncode=2)
    return torch.device(name)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    convbn_pass.clear_decisions()
    with torch._dynamo.config.patch(**compat.recompile_limits(64, 4096)), \
            torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        yield
    convbn_pass.disable()
    torch._dynamo.reset()
