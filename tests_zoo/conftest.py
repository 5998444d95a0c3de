"""Settings of the zoo tests (real torchvision and timm models).

Run with ``python -m pytest tests_zoo -q`` in an environment where torchvision
and timm import (``.ci/zoo`` builds one). Where either does not import, every
test here is skipped with that reason. Each test starts with fresh Dynamo
state, and Inductor's FX graph cache and AOTAutograd's cache are off, so the
pass runs on every compile and hands every graph to its ``on_graph`` callback
(a compile served from a cache would run no pass and report nothing).
"""

from __future__ import annotations

import importlib
import logging
import pathlib

import pytest
import torch
from torch._functorch import config as functorch_config

import convbn_pass

_HERE = pathlib.Path(__file__).parent


def _missing() -> str | None:
    """Why the zoo cannot run here, or None."""
    for package in ("torchvision", "timm"):
        try:
            importlib.import_module(package)
        except Exception as exc:  # an ImportError, or a torchvision built for another torch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return (f"the zoo tests need torchvision and timm, and {package} does not "
                    f"import here ({type(exc).__name__}: {first})")
    return None


_MISSING = _missing()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Each model is measured once per process and its tests read that measurement; with
    # pytest-xdist (`-n 2 --dist loadgroup`, as .ci/zoo runs) one model's tests go to one
    # worker, so no model is measured twice.
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        if case is not None:
            item.add_marker(pytest.mark.xdist_group(case.id))
    if _MISSING is None:
        return
    skip = pytest.mark.skip(reason=_MISSING)
    for item in items:
        if _HERE in pathlib.Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Keep warnings and errors in a failure's report, not the thousands of DEBUG
    records torch's structured trace logger emits per compile."""
    caplog.set_level(logging.WARNING)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    convbn_pass.clear_decisions()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096), \
            torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
