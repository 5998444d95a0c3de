"""Registration with Inductor: a ``CustomGraphPass`` in ``pre_grad_custom_pass``.

Two ways in:

- ``enable()`` / ``disable()`` / ``with enabled():`` set Inductor's global
  ``pre_grad_custom_pass`` (composed with any pass already there);
- ``torch.compile(model, options=options())`` carries the pass in that one
  compile's options: no global state, and its graphs are cached apart.

The pass's ``uuid()`` hashes the sources of ``convbn_pass.core`` and the options, so
Inductor's FX graph cache is keyed correctly and never reuses a graph compiled
under other options.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import warnings
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import compat
from .compat import custom_graph_passes
from .policy import AUTO_RATIO, check_policy, check_ratio
from .records import COUNTER, Decision, current_compile_id
from .rewrite import run

__all__ = ["ConvBNPass", "GraphRewrite", "enable", "disable", "enabled", "options",
           "is_enabled"]


def hashed_sources() -> list[pathlib.Path]:
    """The sources that can change a rewrite: every module of ``convbn_pass.core``.
    The tools around the pass (the CLI, reports, reference models) and the eager and
    regional entry points are not among them, so editing those keeps users' cached
    graphs valid."""
    return sorted(pathlib.Path(__file__).parent.glob("*.py"))


def _source_hash() -> str:
    hasher = hashlib.sha256()
    for path in hashed_sources():
        hasher.update(path.name.encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


_SOURCE_HASH = _source_hash()


class GraphRewrite(NamedTuple):
    """One graph the pass ran on, as ``on_graph`` receives it."""

    before: fx.Graph       # a copy of the graph as the pass got it (after the ``before`` passes)
    after: fx.Graph        # the graph itself, rewritten
    decisions: tuple[Decision, ...]  # one per candidate pair, graph order
    compile_id: str | None  # Dynamo's "frame/compile" id ("0/0"), None outside Dynamo
    attempt: int           # Dynamo restarts a compile with attempt + 1


class ConvBNPass(CustomGraphPass):
    """The Tune-mode rewrite as an Inductor pre-grad pass.

    ``policy`` and ``ratio`` (the ``auto`` policy's activation-to-weight threshold)
    decide each block; ``before`` are passes that run first on each graph (what the
    user had installed in ``pre_grad_custom_pass`` when this pass was made);
    ``on_graph``, if given, receives a :class:`GraphRewrite` for every graph the pass
    runs on: the way for a tool to see one compile's graphs and decisions.
    """

    def __init__(self, policy: str = "auto", *, ratio: float = AUTO_RATIO,
                 on_graph: Callable[[GraphRewrite], None] | None = None,
                 before: tuple[Any, ...] = ()) -> None:
        self.policy = check_policy(policy)
        self.ratio = check_ratio(ratio)
        self.on_graph = on_graph
        self.before = tuple(before)

    def __call__(self, graph: fx.Graph) -> None:
        _ledger.watch()
        _cache_watch.runs += 1
        for user_pass in self.before:
            user_pass(graph)
        before = copy_graph(graph) if self.on_graph is not None else None
        decided = run(graph, self.policy, self.ratio)
        if self.on_graph is not None:
            assert before is not None
            self.on_graph(GraphRewrite(before, graph, tuple(decided), *current_compile_id()))

    def _key(self) -> tuple[Any, ...]:
        """What makes two passes do the same thing: policy, ratio, the passes that run
        before (by uuid where they have one) and the graph callback."""
        befores = tuple(p.uuid() if isinstance(p, CustomGraphPass) and p.uuid() is not None
                        else id(p) for p in self.before)
        return (self.policy, self.ratio, befores, id(self.on_graph))

    def __eq__(self, other: object) -> bool:
        # Equal passes make equal torch.compile options, so Dynamo treats the two
        # backends as one and reuses their graphs. A new pass per options() call would
        # be a new backend each time, and from the 9th compile of one model class in a
        # process (Dynamo's recompile_limit, 8 per code object) the model runs eagerly.
        return isinstance(other, ConvBNPass) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def uuid(self) -> Any:
        # Inductor asks for the key only where a cache may serve the compile, and (torch
        # 2.12 on: pre_grad_pass_timing) once per compile to time its pre-grad passes,
        # under that compile's options: where those switch pre-grad passes off, the pass
        # will not run, and that is said as such rather than as a cache hit.
        _ledger.watch()
        if _off_watch.check():
            _cache_watch.lookups += 1
        _cache_watch.install()
        befores = []
        for user_pass in self.before:
            uuid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if uuid is None:
                return None  # an uncacheable user pass makes the whole chain uncacheable
            befores.append(uuid)
        return ("convbn_pass", _SOURCE_HASH, self.policy, self.ratio, tuple(befores))

    def __repr__(self) -> str:
        return f"ConvBNPass(policy={self.policy!r}, ratio={self.ratio!r}, before={self.before!r})"


def _cache_hits() -> int:
    """Compiles served so far by AOTAutograd's cache or Inductor's FX graph cache."""
    return int(counters["aot_autograd"]["autograd_cache_hit"]
               + counters["inductor"]["fxgraph_cache_hit"])


class _CacheWatch:
    """Says so when a compile that carries the pass is served from AOTAutograd's or
    Inductor's FX graph cache: the cached code is the rewritten one, but the pass
    does not run, so no decision is recorded. Counted as
    ``counters["convbn_pass"]["served_from_cache"]`` and warned about once.

    A compile counts when Dynamo traced a frame (pre-grad passes run only there;
    AOTAutograd's backward, compiled lazily at the first ``.backward()``, also asks
    for the pass's ``uuid()`` to key its graph but never runs a pre-grad pass), the
    pass's ``uuid()`` was asked for (Inductor asks only to key a cache), the pass
    did not run, and a cache reported a hit."""

    def __init__(self) -> None:
        self.lookups = self.runs = 0
        self.warned = False
        self._at_start = (0, 0, 0)

    def install(self) -> None:
        compat.on_compile(self.start, self.end)

    def start(self, *args: Any) -> None:
        self._at_start = (self.lookups, self.runs, _cache_hits())

    def end(self, *args: Any) -> None:
        lookups, runs, hits = self._at_start
        served = (compat.is_dynamo_compile(*args) and self.lookups > lookups
                  and self.runs == runs and _cache_hits() > hits)
        if not served:
            return
        counters[COUNTER]["served_from_cache"] += 1
        if not self.warned:
            self.warned = True
            warnings.warn(
                "convbn_pass: a compile was served from Inductor's cache (AOTAutograd or "
                "FX graph cache): its code is the rewritten one from an earlier run, but "
                "the pass did not run now, so convbn_pass.decisions() and "
                "counters['convbn_pass'] do not list its blocks (counted as "
                "'served_from_cache'). Compile with fx_graph_cache=False in the options "
                "(and torch._functorch.config.enable_autograd_cache=False) to see them.",
                stacklevel=1)


_cache_watch = _CacheWatch()


OFF_COUNTER_KEY = "pre_grad_passes_off"  # counters[COUNTER][OFF_COUNTER_KEY]


def pre_grad_passes_off(extra: Mapping[str, Any] | None = None) -> str | None:
    """The setting that keeps Inductor from running any pre-grad pass (so this one
    cannot run), in words, or None where pre-grad passes run. ``extra`` are options
    about to be given to ``torch.compile``; otherwise the config in force is read
    (inside a compile: with that compile's options and mode applied)."""
    if extra is not None and "use_pre_grad_passes" in extra:
        return None if compat.pre_grad_passes_on(extra) else "use_pre_grad_passes=False in the options"
    if compat.pre_grad_passes_on(inductor_config):
        return None
    if os.environ.get("TORCHINDUCTOR_LITE_MODE") == "1":
        return ("TORCHINDUCTOR_LITE_MODE=1 (which makes "
                "torch._inductor.config.use_pre_grad_passes default to False)")
    return ("torch._inductor.config.use_pre_grad_passes=False "
            "(switched off, or set by torch.compile(mode=\"lite\"))")


class _OffWatch:
    """Says so when Inductor will not run pre-grad passes, so the pass is installed
    but never runs: counted as ``counters["convbn_pass"]["pre_grad_passes_off"]``
    (once per ``enable()`` or ``options()`` call made while they are off, once per
    compile that finds them off) and warned about once, naming the setting.

    Checked where the pass is set up (``enable()``, ``options()``) and inside each
    compile that asks the pass for its ``uuid()`` (``compat.asks_pass_key_every_compile``);
    torch 2.10 and 2.11 never ask, so there a setting switched off only for one compile
    (``mode="lite"`` with ``enable()``) is not seen."""

    def __init__(self) -> None:
        self.warned = False
        self.compiles = 0      # Dynamo compiles started since the watch was installed
        self._counted = -1     # the compile last counted

    def start(self, *args: Any) -> None:
        self.compiles += 1

    def check(self, extra: Mapping[str, Any] | None = None, *, setup: bool = False) -> bool:
        """True where pre-grad passes run; otherwise count, warn once, and False.
        ``setup``: called from enable()/options(), not inside a compile, where a
        second check of one compile counts nothing more."""
        compat.on_compile(self.start)
        setting = pre_grad_passes_off(extra)
        if setting is None:
            return True
        if setup or self._counted != self.compiles:
            self._counted = -1 if setup else self.compiles
            counters[COUNTER][OFF_COUNTER_KEY] += 1
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"convbn_pass: Inductor will not run pre-grad passes here ({setting}), "
                "so the Conv-BN pass does not run and no block is tuned (counted as "
                f"counters['convbn_pass']['{OFF_COUNTER_KEY}']). Compile without that "
                "setting to run the pass.", stacklevel=3)
        return False


_off_watch = _OffWatch()


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (nodes and their metadata), owned by no module."""
    copied = fx.Graph()
    output = copied.graph_copy(graph, {})
    copied.output(output)
    return copied


class _GraphLedger:
    """The graphs Dynamo compiled without the pass since its last reset: what it may
    reuse for a new instance of the same model class once :func:`enable` installs
    the pass, so that the pass never runs on it.

    Counted from Dynamo's ``unique_graphs`` at the end of each compile (a compile the
    pass ran in, or was looked up for, had it). ``torch._dynamo.reset()`` drops the
    compiled graphs and also the compile callbacks, and that is how a reset is
    noticed: when the callback is gone, the graphs counted so far are gone too, and
    the ones compiled since the last count, unwatched, had no pass (the pass, its
    options and enable()/disable() register the callback before they count).
    Before the package is first used nothing is watched: the graphs compiled until
    then all count, a reset among them unseen."""

    def __init__(self) -> None:
        self.seen = 0          # Dynamo's unique_graphs at the last count
        self.without = 0       # graphs compiled without the pass since the last reset
        self.watched = False   # the callback was registered once
        self._marks = (0, 0)   # the pass's lookups and runs at the last count

    def _marks_now(self) -> tuple[int, int]:
        return _cache_watch.lookups, _cache_watch.runs

    def _unseen(self) -> int:
        # Dynamo's counters may have been cleared (counters.clear()): start again there.
        now = _graphs_compiled()
        unseen, self.seen = max(now - self.seen, 0), now
        return unseen

    def watch(self) -> None:
        """Register the callback if it is not (first use, or Dynamo was reset since)."""
        if compat.on_compile_registered(self.end):
            return
        unseen = self._unseen()
        self.without = unseen if self.watched else self.without + unseen
        self.watched = compat.on_compile(self.start, self.end)
        self._marks = self._marks_now()

    def start(self, *args: Any) -> None:
        self.end()  # count up to here; this compile's graphs are counted at its end

    def end(self, *args: Any) -> None:
        new = self._unseen()
        if self._marks_now() == self._marks:  # the pass neither ran nor was looked up
            self.without += new
        self._marks = self._marks_now()

    def stale(self) -> int:
        self.watch()
        return self.without


_ledger = _GraphLedger()


def user_passes() -> tuple[Any, ...]:
    """The passes in Inductor's pre_grad_custom_pass that are not ours, in order
    (ours may sit there alone, or in a list the user extended)."""
    passes: list[Any] = []
    for p in custom_graph_passes(inductor_config.pre_grad_custom_pass):
        passes.extend(p.before if isinstance(p, ConvBNPass) else (p,))
    return tuple(passes)


def _ours_installed() -> bool:
    return any(isinstance(p, ConvBNPass)
               for p in custom_graph_passes(inductor_config.pre_grad_custom_pass))


def _graphs_compiled() -> int:
    return int(counters["stats"]["unique_graphs"])


def is_enabled() -> bool:
    """Whether the global ``pre_grad_custom_pass`` currently runs this pass."""
    return _ours_installed()


def enable(policy: str = "auto", *, ratio: float = AUTO_RATIO) -> None:
    """Run the pass in every later ``torch.compile`` (Inductor backend) of this process.

    Passes the user installed in ``pre_grad_custom_pass`` (before or after an
    earlier ``enable()``) keep running, in their order, before this one, and come
    back on :func:`disable`. Enabling again changes only the options.
    """
    new = ConvBNPass(policy, ratio=ratio, before=user_passes())
    _off_watch.check(setup=True)
    stale = _ledger.stale()
    if not is_enabled() and stale > 0:
        warnings.warn(
            f"convbn_pass.enable(): {stale} graph(s) were already compiled in this "
            "process without the pass since Dynamo was last reset, and Dynamo reuses a "
            "compiled graph for every new instance of the same model class, so the pass "
            "may not run on it. Compile with torch.compile(model, "
            "options=convbn_pass.options()) instead, or call torch._dynamo.reset() "
            "before compiling.",
            stacklevel=2,
        )
    inductor_config.pre_grad_custom_pass = new


def disable() -> None:
    """Stop running the pass; restore the user's own pre-grad pass, if any."""
    _ledger.watch()
    if _ours_installed():
        inductor_config.pre_grad_custom_pass = compat.custom_pass_setting(user_passes())


@contextlib.contextmanager
def enabled(policy: str = "auto", *, ratio: float = AUTO_RATIO) -> Iterator[None]:
    """``with enabled(): model = torch.compile(model); model(x)`` (compile *and* the
    first call, which is when Dynamo compiles, must be inside)."""
    saved = inductor_config.pre_grad_custom_pass
    enable(policy, ratio=ratio)
    try:
        yield
    finally:
        inductor_config.pre_grad_custom_pass = saved


def options(policy: str = "auto", *, ratio: float = AUTO_RATIO,
            on_graph: Callable[[GraphRewrite], None] | None = None,
            **extra: Any) -> dict[str, Any]:
    """Options for ``torch.compile(model, options=...)`` that run the pass in that
    compile only. ``extra`` are further Inductor options, merged in; ``ratio`` and
    ``on_graph`` as for :class:`ConvBNPass`."""
    chosen = ConvBNPass(policy, ratio=ratio, on_graph=on_graph, before=user_passes())
    _ledger.watch()
    _off_watch.check(extra, setup=True)
    return {"pre_grad_custom_pass": chosen, **extra}

