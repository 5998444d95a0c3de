"""Registration with Inductor: a ``CustomGraphPass`` in ``pre_grad_custom_pass``.

Two ways in:

- ``enable()`` / ``disable()`` / ``with enabled():`` set Inductor's global
  ``pre_grad_custom_pass`` (composed with any pass already there);
- ``torch.compile(model, options=options())`` carries the pass in that one
  compile's options: no global state, and its graphs are cached apart.

The pass's ``uuid()`` hashes this package's sources and the options, so
Inductor's FX graph cache is keyed correctly and never reuses a graph compiled
under other options.
"""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import warnings
from typing import Any, Iterator

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes

from . import policy as _policy
from .records import Decision
from .rewrite import run

__all__ = ["ConvBNPass", "enable", "disable", "enabled", "options", "is_enabled"]

_SOURCES = ("tune.py", "match.py", "policy.py", "rewrite.py", "inductor.py")


def _source_hash() -> str:
    here = pathlib.Path(__file__).parent
    hasher = hashlib.sha256()
    for name in _SOURCES:
        hasher.update((here / name).read_bytes())
    return hasher.hexdigest()


_SOURCE_HASH = _source_hash()


class ConvBNPass(CustomGraphPass):
    """The Tune-mode rewrite as an Inductor pre-grad pass.

    ``before`` are passes that run first on each graph: whatever the user had
    installed in ``pre_grad_custom_pass`` when this pass was made.
    """

    def __init__(self, policy: str = "auto", before: tuple[Any, ...] = ()) -> None:
        self.policy = _policy.check_policy(policy)
        self.before = tuple(before)
        self.last: list[Decision] = []  # decisions of the latest graph this pass ran on

    def __call__(self, graph: fx.Graph) -> None:
        for user_pass in self.before:
            user_pass(graph)
        self.last = run(graph, self.policy)

    def uuid(self) -> Any:
        befores = []
        for user_pass in self.before:
            uuid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if uuid is None:
                return None  # an uncacheable user pass makes the whole chain uncacheable
            befores.append(uuid)
        return ("convbn_pass", _SOURCE_HASH, self.policy, _policy.AUTO_RATIO, tuple(befores))

    def __repr__(self) -> str:
        return f"ConvBNPass(policy={self.policy!r}, before={self.before!r})"


# Dynamo's graph count when the pass was last switched off (or at import).
_graphs_when_off = 0


def _user_passes() -> tuple[Any, ...]:
    """The passes in Inductor's pre_grad_custom_pass that are not ours, in order
    (ours may sit there alone, or in a list the user extended)."""
    passes: list[Any] = []
    for p in get_custom_graph_passes(inductor_config.pre_grad_custom_pass):
        passes.extend(p.before if isinstance(p, ConvBNPass) else (p,))
    return tuple(passes)


def _ours_installed() -> bool:
    return any(isinstance(p, ConvBNPass)
               for p in get_custom_graph_passes(inductor_config.pre_grad_custom_pass))


def _graphs_compiled() -> int:
    return int(counters["stats"]["unique_graphs"])


def is_enabled() -> bool:
    """Whether the global ``pre_grad_custom_pass`` currently runs this pass."""
    return _ours_installed()


def enable(policy: str = "auto") -> None:
    """Run the pass in every later ``torch.compile`` (Inductor backend) of this process.

    Passes the user installed in ``pre_grad_custom_pass`` (before or after an
    earlier ``enable()``) keep running, in their order, before this one, and come
    back on :func:`disable`. Enabling again changes only the options.
    """
    new = ConvBNPass(policy, _user_passes())
    stale = _graphs_compiled() - _graphs_when_off
    if not is_enabled() and stale > 0:
        warnings.warn(
            f"convbn_pass.enable(): {stale} graph(s) were already compiled in this "
            "process without the pass, and Dynamo reuses a compiled graph for every new "
            "instance of the same model class, so the pass may not run on it. Compile "
            "with torch.compile(model, options=convbn_pass.options()) instead, or call "
            "torch._dynamo.reset() before compiling.",
            stacklevel=2,
        )
    inductor_config.pre_grad_custom_pass = new


def disable() -> None:
    """Stop running the pass; restore the user's own pre-grad pass, if any."""
    global _graphs_when_off
    if _ours_installed():
        before = _user_passes()
        inductor_config.pre_grad_custom_pass = (
            None if not before else before[0] if len(before) == 1 else list(before))
    _graphs_when_off = _graphs_compiled()


@contextlib.contextmanager
def enabled(policy: str = "auto") -> Iterator[None]:
    """``with enabled(): model = torch.compile(model); model(x)`` (compile *and* the
    first call, which is when Dynamo compiles, must be inside)."""
    global _graphs_when_off
    saved = (inductor_config.pre_grad_custom_pass, _graphs_when_off)
    enable(policy)
    try:
        yield
    finally:
        inductor_config.pre_grad_custom_pass, _graphs_when_off = saved


def options(policy: str = "auto", **extra: Any) -> dict[str, Any]:
    """Options for ``torch.compile(model, options=...)`` that run the pass in that
    compile only. ``extra`` are further Inductor options, merged in."""
    return {"pre_grad_custom_pass": ConvBNPass(policy, _user_passes()), **extra}

