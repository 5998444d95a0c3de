"""Which Conv→BatchNorm module pairs a compiled step ran outside every compiled graph.

The pass decides only the pairs it sees whole in a graph. A pair can run without
ever reaching it, and then no decision, no counter and no report names it:

- ``recompile_limit``: Dynamo compiled the forward that holds the pair once per
  block (a constant that differs per block, past a graph break) and, past its
  recompile limit, ran the remaining blocks eagerly;
- ``graph_break``: a graph break falls between the conv and its BatchNorm, so
  the conv's graph ends before the BatchNorm (or the other way round);
- ``skipped_frame``: the code that calls the pair ran eagerly, in a frame Dynamo
  skipped (torch.nn code called from a frame that runs eagerly, a frame with a
  graph break in a loop, ``torch.compiler.disable``).

The pairs are those :func:`convbn_pass.regions.find_pairs` reads from the data
flow, and those :func:`seen_pairs` sees run eagerly where Dynamo never traces
(a torch.nn ``Sequential`` called from a frame that runs eagerly);
:class:`GraphRuns` notes, for every run of every compiled graph, which of them it
held, by the parameters the graph ran with::

    pairs = (find_pairs(model, (x,)), seen_pairs(model, x))
    runs = GraphRuns(model)
    compiled = torch.compile(model, backend=runs.backend(inner))
    with runs.watch():
        step(compiled)
    outside(pairs, runs)   # [Outside(conv, bn, reason, detail), ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .core.forms import conv_module_form, norm_module_form
from .core.match import find_candidates
from .regions import PlacedPair, first_norm_tensor, owner_of, tensor_owners

__all__ = ["Outside", "GraphRuns", "PairHooks", "outside", "seen_pairs", "HINTS"]

# What to do about each reason, for people.
HINTS: dict[str, str] = {
    "recompile_limit": "raise torch._dynamo.config.recompile_limit, compile the blocks with "
    "convbn_pass.compile_regions, or tune them eagerly with convbn_pass.tune",
    "graph_break": "remove the graph break, or tune the pair eagerly with convbn_pass.tune",
    "skipped_frame": "tune the pair eagerly with convbn_pass.tune, or compile the module "
    "that calls it (convbn_pass.compile_regions)",
}


class Outside(NamedTuple):
    conv: str    # module path of the conv ("blocks.9.conv")
    bn: str      # module path of the BatchNorm
    reason: str  # a key of HINTS
    detail: str  # one sentence for people


@dataclasses.dataclass
class GraphRuns:
    """A wrapping ``torch.compile`` backend that notes which pairs each graph run held."""

    model: nn.Module
    held: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # (conv, bn) in a graph
    in_graphs: set[str] = dataclasses.field(default_factory=set)  # modules with a tensor in one
    limit_hits: list[str] = dataclasses.field(default_factory=list)  # "'forward' (file:line)"

    def __post_init__(self) -> None:
        self._owners = tensor_owners(self.model)

    def backend(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``inner`` (a torch.compile backend) with every run of its graphs noted."""
        def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
            # Read before ``inner`` runs: the pass rewrites the graph in place.
            candidates = find_candidates(gm.graph)
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            compiled = inner(gm, example_inputs)

            def run(*args: Any) -> Any:
                self._note(candidates, dict(zip(placeholders, args)))
                return compiled(*args)
            return run
        return backend

    def _note(self, candidates: Sequence[Any], inputs: dict[fx.Node, Any]) -> None:
        for value in inputs.values():
            found = self._owners.get(id(value)) if isinstance(value, torch.Tensor) else None
            if found is not None and found[0] is value:
                self.in_graphs.add(found[1])
        for cand in candidates:
            conv = owner_of(cand.conv.weight if cand.conv else None, inputs, self._owners)
            bn = owner_of(first_norm_tensor(cand), inputs, self._owners)
            self.held.add((conv or cand.conv_path, bn or cand.bn_path))

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Note the functions Dynamo stops compiling at its recompile limit, while inside."""
        handler = _LimitHits(self.limit_hits)
        logger = logging.getLogger("torch._dynamo.convert_frame")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)


class _LimitHits(logging.Handler):
    """Dynamo warns "torch._dynamo hit config.recompile_limit (8) / function: 'forward'
    (file:line)" once per function it stops compiling; the function is the third argument."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args or ()) > 2:
            self.into.append(str(record.args[2]))  # type: ignore[index]


def _function_info(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def _callers(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The module at ``path`` and its ancestors, innermost first."""
    parts = path.split(".") if path else []
    found = []
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        try:
            found.append((prefix, model.get_submodule(prefix)))
        except AttributeError:
            continue
    return found


class PairHooks:
    """While inside: the ``(conv, bn)`` module pairs of every eager forward run, whose
    BatchNorm, in eval mode with running statistics, was called on the very tensor
    its conv module returned (module hooks; the tensor itself is held, never its id)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: list[tuple[str, str]] = []
        self._paths = {id(m): path for path, m in model.named_modules()}
        self._last: list[tuple[str, torch.Tensor]] = []
        self._handles: list[Any] = []

    def _conv_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._last[:] = [(self._paths[id(module)], out)]

    def _norm_hook(self, module: nn.Module, args: Any) -> None:
        if self._last and args and args[0] is self._last[0][1] and not module.training \
                and getattr(module, "running_mean", None) is not None:
            self.pairs.append((self._last[0][0], self._paths[id(module)]))

    def __enter__(self) -> "PairHooks":
        for module in self.model.modules():
            if conv_module_form(module) is not None:
                self._handles.append(module.register_forward_hook(self._conv_hook))
            elif norm_module_form(module) is not None:
                self._handles.append(module.register_forward_pre_hook(self._norm_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last.clear()


@torch.no_grad()
def seen_pairs(model: nn.Module, *inputs: Any) -> list[tuple[str, str]]:
    """The :class:`PairHooks` pairs of one eager forward; buffers and the CPU RNG
    state are restored."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with PairHooks(model) as hooks, torch.random.fork_rng(devices=[]):
            model(*inputs)
    finally:
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    return hooks.pairs


def outside(pairs: tuple[Sequence[PlacedPair], Sequence[tuple[str, str]]],
            runs: GraphRuns) -> list[Outside]:
    """The pairs that no compiled graph run held, each with its reason, in the order
    they ran, each once. ``pairs``: what :func:`~convbn_pass.regions.find_pairs` found
    (those it may tune: no reject reason) and what :func:`seen_pairs` saw eagerly."""
    traced, seen = pairs
    rejected = {(p.conv, p.bn) for p in traced if p.reject is not None}
    found: list[Outside] = []
    for pair in dict.fromkeys([*((p.conv, p.bn) for p in traced if p.reject is None),
                               *(s for s in seen if s not in rejected)]):
        if pair in runs.held:
            continue
        conv, bn = pair
        if conv in runs.in_graphs or bn in runs.in_graphs:
            where = "conv" if conv in runs.in_graphs else "BatchNorm"
            found.append(Outside(conv, bn, "graph_break", f"the {where} ran in a compiled "
                                 "graph, its partner outside it: a graph break between them"))
            continue
        limited = next((path for path, module in _callers(runs.model, conv)
                        if _function_info(type(module).forward) in runs.limit_hits), None)
        if limited is not None:
            name = type(runs.model.get_submodule(limited)).__name__
            found.append(Outside(conv, bn, "recompile_limit", f"{name}.forward "
                                 f"('{limited or 'the root'}') reached Dynamo's recompile limit "
                                 f"({torch._dynamo.config.recompile_limit}) and ran eagerly"))
            continue
        found.append(Outside(conv, bn, "skipped_frame", "ran eagerly: the frame that calls "
                             "it was not compiled (Dynamo skipped it or fell back)"))
    return found
