"""convbn_pass: Conv→BatchNorm blocks in Tune mode under ``torch.compile``.

::

    import convbn_pass, torch
    model = torch.compile(model, options=convbn_pass.options())   # this compile only
    # or, for every later compile of the process:
    convbn_pass.enable()
    # or by regions (each block compiled on its own, pairs never split), e.g. before FSDP2:
    convbn_pass.compile_regions(model, example_inputs)
    # or without compiling at all (eager training loops):
    convbn_pass.tune(model, example_inputs)

BatchNorm layers that run on running statistics (``model.eval()`` BN, the usual
fine-tuning setup) become one convolution whose weights are rebuilt from the
real parameters on each step: same forward, same gradients, and the conv output
is no longer kept for backward.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch
import torch.fx as fx

from .core.forms import norm_module_form
from .core.inductor import ConvBNPass, GraphRewrite, disable, enable, enabled, is_enabled, options
from .core.policy import AUTO_RATIO, POLICIES
from .regions import compile_regions, plan_regions, uncompile_regions
from .core.records import REASONS, Action, Decision, Reason, clear_decisions, decisions
from .core.rewrite import run
from .eager import TunePlan, plan_tune, tune, untune

__all__ = [
    "apply", "enable", "disable", "enabled", "is_enabled", "options", "ConvBNPass",
    "GraphRewrite", "Decision", "Action", "Reason", "decisions", "clear_decisions",
    "POLICIES", "REASONS", "AUTO_RATIO", "compile_regions", "plan_regions", "uncompile_regions",
    "tune", "untune", "plan_tune", "TunePlan",
]

__version__ = "0.1.0"

# The tools beside the pass, importable as attributes (``convbn_pass.backends.light``)
# without ``import convbn_pass.backends`` first, and loaded only when first used:
# backends alone adds about 0.7 s to ``import convbn_pass`` (functorch.compile).
_SUBMODULES = ("backends", "coverage", "deploy", "eager", "inspect", "memory", "models",
               "printing", "regions", "report", "step", "zoo")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})


def apply(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None, *,
          policy: str = "auto", ratio: float = AUTO_RATIO) -> list[Decision]:
    """Rewrite ``gm`` in place (for example a ``torch.fx.symbolic_trace`` graph).

    ``example_inputs``, if given, are run through the graph first to record
    shapes, which linear→BatchNorm1d pairs and the ``auto`` policy need when the
    graph carries none. Returns one decision per candidate block.

    A BatchNorm *module* tuned here reads its running statistics as they are at
    each call, but its mode was read now: calling ``gm`` after switching such a
    module to training mode raises instead of giving Eval-mode results.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"apply() takes a torch.fx.GraphModule, not {type(gm).__name__}")
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        ShapeProp(gm).propagate(*example_inputs)
    decided = run(gm.graph, policy, ratio)
    gm.recompile()
    _guard_module_modes(gm, decided)
    return decided


def _guard_module_modes(gm: fx.GraphModule, decided: list[Decision]) -> None:
    tuned = [d.bn for d in decided if d.tuned]
    rows = [(m, row) for m in (_get(gm, path) for path in tuned)
            if m is not None and (row := norm_module_form(m)) is not None]
    if not rows:
        return

    def check(module: torch.nn.Module, args: Any) -> None:
        for norm, row in rows:
            assert row.module_batch_stats is not None
            if row.module_batch_stats(norm):
                raise RuntimeError(
                    "convbn_pass.apply() rewrote this graph while its norm modules used "
                    f"running statistics; {type(norm).__name__} now uses batch statistics "
                    "(training mode). Trace and apply again, or switch it back with .eval().")

    gm.register_forward_pre_hook(check)


def _get(gm: torch.nn.Module, path: str) -> Any:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None
