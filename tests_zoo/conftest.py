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
from typing import Any

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


def _model_of(nodeid: str) -> str | None:
    """The zoo model a test's id names (``test_x[timm-dla34-auto]``: ``timm-dla34``),
    the longest model id that is the whole parameter id or its prefix before a ``-``."""
    from tests_zoo.zoo_models import CASE_IDS, FLOAT32_CASES

    if "[" not in nodeid:
        return None
    param = nodeid[nodeid.index("[") + 1:nodeid.rindex("]")]
    ids = [*CASE_IDS, *(case.id for case in FLOAT32_CASES)]
    found = [i for i in ids if param == i or param.startswith(i + "-")]
    return max(found, key=len) if found else None


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadgroup`` (as .ci/zoo runs it), every test of one model goes to
    one worker: each model is measured once per process and its tests read that
    measurement, so a model whose tests were spread over both workers was measured on
    both. The scheduler groups by the model id in the test's id, rather than by the
    ``xdist_group`` mark: pytest 9 keeps a node's id where pytest-xdist 3.8 no longer
    writes the group into it, and there every model's tests went to both workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModel(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _model_of(nodeid) or nodeid

    return ByModel(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
