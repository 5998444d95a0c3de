"""Regional compilation that never separates a conv from its BatchNorm.

A per-graph pass only rewrites the Conv→BatchNorm pairs it sees whole. Compiling
a model by regions (each block on its own, as large-model trainers do before
``fully_shard``) cuts compile time, because repeated blocks reuse one compiled
graph, but a region boundary between a conv and its BatchNorm hides the pair
from the pass. This module finds the pairs, chooses regions that hold them
whole, and compiles each region with the pass::

    import convbn_pass.regions as regions

    model.eval()                                   # BN on running statistics
    plan = regions.compile_regions(model, (x,))    # in place; x: one example batch
    plan.regions        # ('layer1.0', 'layer1.1', ..., 'layer4.2'): one per block
    plan.root           # True: the stem's conv1/bn1 sit in the root, so the root's
                        # own forward is compiled too, the regions opaque inside it
    # then, for FSDP2:
    for path in plan.regions:
        fully_shard(model.get_submodule(path))
    fully_shard(model)

How the pairs are found: the model runs once under Dynamo with a backend that
only records its graphs, and the pass's own matcher (``match.find_candidates``)
reads them; each node's module call stack gives the modules whose forward holds
the conv and the BatchNorm. Reading the data flow, not the order in which
modules were registered, is what tells which conv feeds which BatchNorm
(pre-activation blocks and DenseNet layers register a BN before its conv; a
ResNet's ``downsample`` registers last but runs first). The trace changes
nothing: buffers (BN running statistics) and the RNG state are restored.

Regions chosen by default: for each pair, the innermost module whose forward
calls both the conv and the BatchNorm (its *holder*); then the outermost of those
holders below the root (a Bottleneck holds its ``downsample`` pair too). Pairs
held by the root itself (a ResNet stem) are compiled with the root: its forward
is compiled, and inside it every region call is a graph break, so each region
runs its own compiled code.

How a region is compiled: in place, keeping every parameter name (no
``_orig_mod.`` prefix), so checkpoints load and ``fully_shard`` /
``DistributedDataParallel`` wrap the model as before. Regions of one class with
equal parameter shapes share one compiled function (one Dynamo cache line of
their own), so repeated blocks compile once and distinct blocks never count
against each other's recompile limit.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .core import compat
from .core import inductor as _inductor
from .core import policy as _policy
from .core.match import Candidate, find_candidates, module_path
from .core.records import Reason

__all__ = ["PlacedPair", "Pair", "TracedPair", "SplitPair", "RegionPlan", "find_pairs",
           "trace_pairs", "tensor_owners", "owner_of", "first_norm_tensor", "auto_regions",
           "split_pairs", "plan_regions", "compile_regions", "uncompile_regions", "describe"]

_ATTR = "_convbn_region_compiled"  # the compiled function, in a compiled module's __dict__
_TRACE_RECOMPILE_LIMIT = 4096  # compiles of one code object that the pair-finding trace may make

Regions = Sequence[str] | type | tuple[type, ...] | None


@dataclasses.dataclass(frozen=True)
class PlacedPair:
    """One Conv→BatchNorm pair as the pass sees it, placed in the module tree."""

    conv: str                    # module path of the conv ("layer1.0.conv1")
    bn: str                      # module path of the BatchNorm ("layer1.0.bn1")
    op: str                      # "conv2d", "conv_transpose2d", "linear", ...
    conv_calls: tuple[str, ...]  # modules whose forward was running at the conv, outermost first
    bn_calls: tuple[str, ...]    # the same for the BatchNorm
    reject: Reason | None = None  # why the pass leaves it whatever the regions
    #                               (Reason.BN_TRAINING, ...), None if it may tune

    @property
    def holder(self) -> str:
        """The innermost module whose forward calls both ("" for the root)."""
        common = ""
        for a, b in zip(self.conv_calls, self.bn_calls):
            if a != b:
                break
            common = a
        return common


# The earlier name of PlacedPair, kept so that code written against it still runs.
Pair = PlacedPair


class SplitPair(NamedTuple):
    pair: PlacedPair
    conv_region: str | None  # the region the conv runs in, None: outside every region
    bn_region: str | None    # the region the BatchNorm runs in, None: outside every region


class RegionPlan(NamedTuple):
    pairs: tuple[PlacedPair, ...]        # every pair of the traced forward, graph order
    regions: tuple[str, ...]             # module paths compiled one by one
    root: bool                           # the root's forward is compiled too: some pair
    #                                      lies outside every region
    split: tuple[SplitPair, ...]         # pairs a region boundary separates
    groups: tuple[tuple[str, ...], ...]  # regions sharing one compiled function

    def region_of(self, pair: PlacedPair) -> str | None:
        """The region whose graph holds ``pair`` ("" for the root's graph), or None
        if the pair is split or runs uncompiled."""
        conv, bn = _region_in(pair.conv_calls, self.regions), _region_in(pair.bn_calls,
                                                                          self.regions)
        if conv != bn:
            return None
        if conv is not None:
            return conv
        return "" if self.root else None


# ---------------------------------------------------------------------------
# Finding the pairs.
# ---------------------------------------------------------------------------

class TracedPair(NamedTuple):
    """A :class:`PlacedPair` with what the pass's matcher read of it."""

    pair: PlacedPair
    candidate: Candidate  # the matcher's candidate (sizes, dtypes, the ops after it)
    graph: int            # which graph of the traced forward holds it (1, 2, … past graph breaks)


def find_pairs(model: nn.Module, example_inputs: Any) -> tuple[PlacedPair, ...]:
    """Every Conv→BatchNorm pair ``model``'s forward runs on ``example_inputs``, one
    per execution, in the order they ran.

    ``example_inputs`` is a tuple of positional arguments (or one tensor). The
    model runs once under Dynamo with a recording backend; its buffers and the
    RNG state are restored afterwards. A graph Dynamo compiled once and ran for
    several modules (a loop over blocks of one class: the blocks' parameters are
    the graph's inputs) is read once per run, with the modules of that run.

    >>> from convbn_pass import zoo
    >>> model = zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], width=8).eval()
    >>> pairs = find_pairs(model, torch.randn(1, 3, 32, 32))
    >>> [(p.conv, p.bn, p.holder) for p in pairs][:2]
    [('conv1', 'bn1', ''), ('layer1.0.conv1', 'layer1.0.bn1', 'layer1.0')]
    """
    return tuple(t.pair for t in trace_pairs(model, example_inputs))


def trace_pairs(model: nn.Module, example_inputs: Any) -> tuple[TracedPair, ...]:
    """:func:`find_pairs`, each pair with the matcher's candidate and its graph."""
    _check_not_compiled(model)
    paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    owners = tensor_owners(model)
    read: dict[int, tuple[int, list[Candidate], dict[str, Any], list[fx.Node]]] = {}
    pairs: list[TracedPair] = []
    for graph, args in _trace(model, _as_tuple(example_inputs)):
        if id(graph) not in read:
            read[id(graph)] = (len(read) + 1, find_candidates(graph), _stacks(graph),
                               [n for n in graph.nodes if n.op == "placeholder"])
        index, candidates, stacks, placeholders = read[id(graph)]
        inputs = dict(zip(placeholders, args))
        for cand in candidates:
            conv_calls = _calls(stacks.get(cand.conv_path), paths)
            bn_calls = _calls(stacks.get(cand.bn_path), paths)
            conv = conv_calls[-1] if conv_calls else cand.conv_path
            bn = bn_calls[-1] if bn_calls else cand.bn_path
            # The modules of this run, by the parameters the graph was called with.
            conv_now = owner_of(cand.conv.weight if cand.conv else None, inputs, owners)
            bn_now = owner_of(first_norm_tensor(cand), inputs, owners)
            conv_calls = _moved(conv_calls, conv, conv_now)
            bn_calls = _moved(bn_calls, bn, bn_now)
            pair = PlacedPair(conv_now or conv, bn_now or bn, str(cand.op),
                              conv_calls, bn_calls, cand.reject)
            pairs.append(TracedPair(pair, cand, index))
    return tuple(pairs)


def tensor_owners(model: nn.Module) -> dict[int, tuple[torch.Tensor, str]]:
    """Each parameter and buffer of ``model`` by ``id``, with the tensor itself (held,
    so the id stays its own) and the path of the module that owns it."""
    owners: dict[int, tuple[torch.Tensor, str]] = {}
    for named in (model.named_parameters(remove_duplicate=False),
                  model.named_buffers(remove_duplicate=False)):
        for name, tensor in named:
            owners.setdefault(id(tensor), (tensor, name.rpartition(".")[0]))
    return owners


def first_norm_tensor(cand: Any) -> Any:
    """A tensor argument the normalisation reads (its statistics first), or None."""
    if cand.bn is None:
        return None
    return next((arg for arg in cand.bn.tensors.values() if arg is not None), None)


def owner_of(arg: Any, inputs: dict[fx.Node, Any],
           owners: dict[int, tuple[torch.Tensor, str]]) -> str | None:
    """The module path owning the tensor a graph input was called with, or None
    (not a graph input, or not a tensor of the model)."""
    value = inputs.get(arg) if isinstance(arg, fx.Node) else None
    found = owners.get(id(value)) if isinstance(value, torch.Tensor) else None
    return found[1] if found is not None and found[0] is value else None


def _moved(calls: tuple[str, ...], traced: str, now: str | None) -> tuple[str, ...]:
    """The call stack of a module traced as ``traced`` and run as ``now``: the part of
    each path before the module's own relative name is swapped."""
    if now is None or now == traced:
        return calls
    common = 0
    for a, b in zip(reversed(traced.split(".")), reversed(now.split("."))):
        if a != b:
            break
        common += 1
    old = ".".join(traced.split(".")[:len(traced.split(".")) - common])
    new = ".".join(now.split(".")[:len(now.split(".")) - common])
    if not old:
        return calls
    return tuple(new + c[len(old):] if c == old or c.startswith(old + ".") else c
                 for c in calls)


def _stacks(graph: fx.Graph) -> dict[str, Any]:
    """Each module path the matcher names a node by (``match.module_path``: the
    innermost module call, relative to the traced frame) and that node's module
    call stack: every node of one module call shares it."""
    stacks: dict[str, Any] = {}
    for node in graph.nodes:
        stacks.setdefault(module_path(node), node.meta.get("nn_module_stack"))
    return stacks


def _calls(stack: Any, paths: dict[int, str]) -> tuple[str, ...]:
    """The module calls of a node's ``nn_module_stack``, as paths from the root.
    Dynamo keys that stack by ``id(module)`` (``"<id>"`` or ``"<id>@<call>"``), which
    names the module whichever frame was traced; an id not found among the model's
    modules is left out."""
    found = []
    for key in (stack or {}):
        ident = str(key).split("@")[0]
        path = paths.get(int(ident)) if ident.isdigit() else None
        if path is not None and path != "":
            found.append(path)
    return tuple(found)


def _trace(model: nn.Module, args: tuple[Any, ...]) -> list[tuple[fx.Graph, tuple[Any, ...]]]:
    """Every graph run of one forward of ``model`` under Dynamo, with the arguments
    it ran with (a graph compiled once may run many times), nothing left changed."""
    runs: list[tuple[fx.Graph, tuple[Any, ...]]] = []

    def record(gm: fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        def run(*inputs: Any) -> Any:
            runs.append((gm.graph, inputs))
            return gm.forward(*inputs)
        return run

    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    # A recompile budget of its own: blocks whose forward Dynamo compiles once per
    # block (past a graph break) are all seen, and the trace's cache entries do not
    # count against the user's own compiles of the same code.
    isolated = compat.isolated_recompiles(_TRACE_RECOMPILE_LIMIT)
    tracer = torch.compile(_entry("convbn_trace"), backend=record, **isolated)
    # Where torch cannot isolate a compile's budget, the trace raises the process's
    # limits while it runs (and its compiles then count against the user's later ones).
    limits = {} if isolated else compat.recompile_limits(_TRACE_RECOMPILE_LIMIT)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad(), \
                torch._dynamo.config.patch(**limits):
            tracer(model, *args)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    return runs


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


# ---------------------------------------------------------------------------
# Choosing and checking regions.
# ---------------------------------------------------------------------------

def auto_regions(pairs: Iterable[PlacedPair]) -> tuple[str, ...]:
    """The outermost holders below the root: each pair's innermost module calling
    both its conv and its BatchNorm, less those nested in another holder.

    A ResNet gives its blocks (``layer1.0`` holds ``conv1/bn1`` and, nested, the
    ``downsample`` pair); a MobileNetV2 written as conv-BN-activation Sequentials
    gives those Sequentials.
    """
    holders = {p.holder for p in pairs} - {""}
    return tuple(sorted((h for h in holders if not any(_inside(h, o) for o in holders)),
                        key=_path_key))


def split_pairs(pairs: Iterable[PlacedPair], regions: Sequence[str]) -> tuple[SplitPair, ...]:
    """The pairs whose conv and BatchNorm would run in different regions (or one
    in a region and one outside all), for the region list ``regions``.

    >>> p = PlacedPair("block.conv", "bn", "conv2d", ("block", "block.conv"), ("bn",))
    >>> [(s.conv_region, s.bn_region) for s in split_pairs([p], ["block"])]
    [('block', None)]
    """
    found = []
    for pair in pairs:
        conv, bn = _region_in(pair.conv_calls, regions), _region_in(pair.bn_calls, regions)
        if conv != bn:
            found.append(SplitPair(pair, conv, bn))
    return tuple(found)


def plan_regions(model: nn.Module, example_inputs: Any, regions: Regions = None) -> RegionPlan:
    """Trace ``model`` once and say what :func:`compile_regions` would compile.

    ``regions``: None (:func:`auto_regions`), module paths, or a module class (or
    tuple of classes) meaning every module of that class not inside another one.
    Paths are checked (unknown, root, nested: ``ValueError``); pairs that the
    regions would separate are returned in ``split``, not refused.
    """
    pairs = find_pairs(model, example_inputs)
    chosen = auto_regions(pairs) if regions is None else _resolve(model, regions)
    split = split_pairs(pairs, chosen)
    split_ids = {id(s.pair) for s in split}
    root = any(_region_in(p.conv_calls, chosen) is None for p in pairs if id(p) not in split_ids)
    return RegionPlan(pairs, chosen, root, split, _groups(model, chosen))


def _resolve(model: nn.Module, regions: Sequence[str] | type | tuple[type, ...]) -> tuple[str, ...]:
    if isinstance(regions, type) or (isinstance(regions, tuple) and regions
                                     and all(isinstance(r, type) for r in regions)):
        classes = regions if isinstance(regions, tuple) else (regions,)
        paths = [p for p, m in model.named_modules() if p and isinstance(m, classes)]
        if not paths:
            names = ", ".join(c.__name__ for c in classes)
            raise ValueError(f"regions: no module of class {names} in {type(model).__name__}")
        return tuple(p for p in paths if not any(_inside(p, o) for o in paths))
    if isinstance(regions, str):
        raise ValueError(f"regions: expected a list of module paths, got the string {regions!r}")
    chosen = tuple(regions)
    known = dict(model.named_modules())
    for path in chosen:
        if path == "":
            raise ValueError("regions: '' is the root; compile the whole model with "
                             "torch.compile(model, options=convbn_pass.options()) instead")
        if path not in known:
            raise ValueError(f"regions: no submodule {path!r} in {type(model).__name__}")
    for path in chosen:
        outer = [o for o in chosen if _inside(path, o)]
        if outer:
            raise ValueError(f"regions: {path!r} lies inside region {outer[0]!r}; "
                             "regions must not nest")
    if len(set(chosen)) != len(chosen):
        raise ValueError("regions: a path is listed twice")
    return chosen


def describe(plan: RegionPlan) -> str:
    """The plan as text, for people and for ``inspect``.

    >>> from convbn_pass import zoo                # a ResNet-18 layout, auto regions
    >>> model = zoo.ResNet(zoo.BasicBlock, [2, 2, 2, 2]).eval()
    >>> print(describe(plan_regions(model, torch.randn(1, 3, 64, 64))))
    20 conv-BN pairs; 8 regions in 7 groups; the root compiled too (1 pair in it)
      group 1: layer1.0, layer1.1 (2 pairs each)
      group 2: layer2.0 (3 pairs each)
      ...
      group 7: layer4.1 (2 pairs each)
    no pair falls between regions
    """
    root_pairs = sum(plan.region_of(p) == "" for p in plan.pairs)
    lines = [f"{len(plan.pairs)} conv-BN pairs; {len(plan.regions)} regions in "
             f"{len(plan.groups)} groups; "
             + (f"the root compiled too ({root_pairs} pair{'s' * (root_pairs != 1)} in it)"
                if plan.root else "the root not compiled")]
    for i, group in enumerate(plan.groups, 1):
        held = sum(plan.region_of(p) == group[0] for p in plan.pairs)
        lines.append(f"  group {i}: {', '.join(group)} ({held} pair{'s' * (held != 1)} each)")
    if not plan.split:
        lines.append("no pair falls between regions")
    else:
        lines.append(f"{len(plan.split)} pair{'s' * (len(plan.split) != 1)} would fall between "
                     "regions (compile_regions refuses these regions):")
    for s in plan.split:
        lines.append(f"  split: {s.pair.conv} → {s.pair.bn} (conv in {_name(s.conv_region)}, "
                     f"BN in {_name(s.bn_region)})")
    return "\n".join(lines)


def _inside(path: str, outer: str) -> bool:
    """Whether module ``path`` lies strictly inside module ``outer`` (non-root)."""
    return outer != "" and path.startswith(outer + ".")


def _region_in(calls: tuple[str, ...], regions: Sequence[str]) -> str | None:
    return next((c for c in calls if c in regions), None)


def _path_key(path: str) -> tuple[Any, ...]:
    return tuple((0, int(a), "") if a.isdigit() else (1, 0, a) for a in path.split("."))


# ---------------------------------------------------------------------------
# Compiling.
# ---------------------------------------------------------------------------

def compile_regions(model: nn.Module, example_inputs: Any, *, regions: Regions = None,
                    policy: str | None = "auto", options: dict[str, Any] | None = None,
                    backend: str | Callable[..., Any] | None = None,
                    **compile_kwargs: Any) -> RegionPlan:
    """Compile ``model`` region by region, in place, with the pass in every region.

    ``regions`` as in :func:`plan_regions`; a list that would separate a conv
    from its BatchNorm is refused (``ValueError`` naming the pairs). Each region
    is compiled with ``torch.compile(..., options=convbn_pass.options(policy,
    **options))`` (``policy=None``: Inductor with ``options`` and no pass, the
    baseline), or with ``backend=``, used as given (the caller puts the pass in
    it, e.g. ``convbn_pass.backends.light(policy)``). ``compile_kwargs`` go
    to every ``torch.compile`` (``dynamic=``, ``fullgraph=``). If pairs lie
    outside every region (a ResNet stem), the root's forward is compiled the
    same way, with each region call a graph break. Undo with
    :func:`uncompile_regions`.

    >>> from convbn_pass import zoo
    >>> model = zoo.ResNet(zoo.Bottleneck, [3, 4, 6, 3]).eval()
    >>> plan = compile_regions(model, torch.randn(2, 3, 64, 64))
    >>> len(plan.regions), len(plan.groups), plan.root, plan.split
    (16, 8, True, ())
    """
    if policy is not None:
        _policy.check_policy(policy)
    plan = plan_regions(model, example_inputs, regions)
    if plan.split:
        listed = "; ".join(f"{s.pair.conv} → {s.pair.bn} (conv in {_name(s.conv_region)}, "
                           f"BN in {_name(s.bn_region)})" for s in plan.split)
        raise ValueError(f"regions: {len(plan.split)} conv-BN pair(s) would fall between "
                         f"regions: {listed}")
    make = _compiler(policy, options, backend, compile_kwargs)
    for i, group in enumerate(plan.groups):
        first = model.get_submodule(group[0])
        compiled = make(_entry(f"convbn_region_{i}_{type(first).__name__}"))
        for path in group:
            _install(model.get_submodule(path), compiled)
    if plan.root:
        _install(model, make(_entry(f"convbn_root_{type(model).__name__}")))
    return plan


def uncompile_regions(model: nn.Module) -> tuple[str, ...]:
    """Undo :func:`compile_regions`: every module runs its own forward again.
    Returns the paths restored ("" for the root)."""
    restored = []
    for path, module in model.named_modules():
        if _ATTR in module.__dict__:
            del module.__dict__[_ATTR]
            del module.__dict__["forward"]
            restored.append(path)
    return tuple(restored)


def _name(region: str | None) -> str:
    return "no region" if region is None else repr(region)


def _compiler(policy: str | None, options: dict[str, Any] | None,
              backend: str | Callable[..., Any] | None,
              compile_kwargs: dict[str, Any]) -> Callable[[Callable[..., Any]], Any]:
    if backend is None:
        opts = _inductor_options(policy, options or {})
        return lambda fn: torch.compile(fn, options=opts, **compile_kwargs)
    if options:
        raise ValueError("compile_regions: options= is for the default Inductor backend; "
                         "with backend= pass the backend's own settings")
    return lambda fn: torch.compile(fn, backend=backend, **compile_kwargs)


def _inductor_options(policy: str | None, options: dict[str, Any]) -> dict[str, Any]:
    # Equal options are one backend to Dynamo (the pass compares equal by policy, ratio
    # and the passes before it), so every group and the root reuse their graphs.
    return dict(options) if policy is None else _inductor.options(policy, **options)


def _groups(model: nn.Module, regions: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Regions that can share one compiled function: same class, same submodule
    tree, same parameter and buffer shapes, dtypes and modes."""
    grouped: dict[Any, list[str]] = {}
    for path in regions:
        grouped.setdefault(_signature(model.get_submodule(path)), []).append(path)
    return tuple(tuple(paths) for paths in grouped.values())


def _signature(module: nn.Module) -> tuple[Any, ...]:
    tree = tuple((name, type(m), m.training) for name, m in module.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                    for name, t in (*module.named_parameters(), *module.named_buffers()))
    return (type(module), tree, tensors)


def _check_not_compiled(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if _ATTR in module.__dict__:
            raise ValueError(f"module {path or '(root)'!r} is already compiled by "
                             "compile_regions; call uncompile_regions(model) first")
        if "forward" in module.__dict__:
            raise ValueError(f"module {path or '(root)'!r} has its own instance attribute "
                             "'forward'; compile_regions replaces forward and cannot keep it")


# A compiled module's forward: a frame Dynamo never traces into (so that, inside
# a compiled parent, calling the region is a graph break and the region keeps
# its own compiled code), which calls the region's compiled function.
@torch.compiler.disable
def _compiled_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.__dict__[_ATTR](self, *args, **kwargs)


def _install(module: nn.Module, compiled: Callable[..., Any]) -> None:
    module.__dict__[_ATTR] = compiled
    module.forward = types.MethodType(_compiled_forward, module)  # type: ignore[method-assign]


def _call_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


def _entry(name: str) -> Callable[..., Any]:
    """A copy of :func:`_call_forward` with a code object of its own: Dynamo keeps
    its cache on the code object, so every group of regions gets its own cache
    line, and the module is an argument (not captured), so the group's graphs are
    reused by each of its modules."""
    code = _call_forward.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, _call_forward.__globals__, name)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
