"""What differs between the torch versions the package runs on, in one place.

Verified on torch 2.8 to 2.15 (docs/versions.md); each function says which API it
stands in for and where it differs. Everything else the package uses is the same on
all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch._inductor import custom_graph_pass

__all__ = ["custom_graph_passes", "custom_pass_setting", "inductor_backend", "on_compile",
           "on_compile_registered", "is_dynamo_compile", "isolated_recompiles",
           "asks_pass_key_every_compile", "pre_grad_passes_on", "recompile_limits",
           "TORCH_VERSION", "OLDEST_VERIFIED"]

TORCH_VERSION: tuple[int, int] = tuple(  # type: ignore[assignment]
    int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
# The oldest torch the test suite has passed on (pyproject.toml requires it).
OLDEST_VERIFIED = (2, 8)


def custom_graph_passes(value: Any) -> list[Any]:
    """The passes in an Inductor ``*_custom_pass`` setting, as a list: None, one
    pass or a list of them. ``torch._inductor.custom_graph_pass.get_custom_graph_passes``
    where torch has it (2.13 and 2.15 do; 2.10 and 2.11 take one pass)."""
    getter = getattr(custom_graph_pass, "get_custom_graph_passes", None)
    if getter is not None:
        return list(getter(value))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def custom_pass_setting(passes: Sequence[Any]) -> Any:
    """The value of an Inductor ``*_custom_pass`` setting that runs ``passes`` in
    order: None for none, the pass itself for one, a list for more. Torch 2.10 and 2.11
    call the setting (no ``get_custom_graph_passes``), so there a one-element list
    raises TypeError where the pass itself runs; a list of several is what a user of
    those versions could not have run either, and is given back as it was."""
    if not passes:
        return None
    return passes[0] if len(passes) == 1 else list(passes)


def inductor_backend(options: dict[str, Any], dynamic: bool | None) -> Callable[..., Any]:
    """The backend ``torch.compile(model, options=options, dynamic=dynamic)`` builds
    (Inductor with these options), as a callable that a wrapping backend can call."""
    return torch._TorchCompileInductorWrapper(None, options, dynamic)


def on_compile(start: Callable[..., None], end: Callable[..., None] | None = None) -> bool:
    """Call ``start`` and ``end`` (if given) around every Dynamo compile of the
    process (``torch._dynamo.callback.callback_handler``), unless they are registered
    already (``torch._dynamo.reset()`` forgets them); False where torch has no such
    hook."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return False
    if start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(start)
    if end is not None and end not in callback_handler.end_callbacks:
        callback_handler.register_end_callback(end)
    return True


def on_compile_registered(end: Callable[..., None]) -> bool:
    """Whether ``end`` is among Dynamo's compile-end callbacks: ``on_compile``
    registered it and no ``torch._dynamo.reset()`` has cleared them since. False
    where torch has no such hook."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return False
    return end in callback_handler.end_callbacks


def is_dynamo_compile(*callback_args: Any) -> bool:
    """Whether the compile that ``on_compile``'s callbacks were called for traces a
    frame (``CallbackTrigger.DYNAMO``), the only kind that runs pre-grad passes,
    rather than one started at run time: AOTAutograd's lazily compiled backward,
    autotuning, CUDA graph recording. True where torch does not say."""
    trigger = getattr(callback_args[0], "callback_trigger", None) if callback_args else None
    return trigger is None or getattr(trigger, "name", None) == "DYNAMO"


def isolated_recompiles(limit: int) -> dict[str, Any]:
    """``torch.compile`` keyword arguments giving that compile a recompile budget of
    ``limit`` of its own, counted apart from every other compile of the same code
    (``recompile_limit=`` and ``isolate_recompiles=``); ``{}`` where torch's
    ``torch.compile`` takes neither."""
    import inspect
    params = inspect.signature(torch.compile).parameters
    if "recompile_limit" not in params or "isolate_recompiles" not in params:
        return {}
    return {"recompile_limit": limit, "isolate_recompiles": True}


def asks_pass_key_every_compile() -> bool:
    """Whether Inductor asks a ``pre_grad_custom_pass`` for its ``uuid()`` in every
    compile, under that compile's options (``pre_grad_pass_timing``, whose resolution
    reads it: 2.12 has the setting, 2.13 and 2.15 ask), rather than only when a cache
    may serve the compile (2.10 and 2.11 never ask: they run the pass before looking the
    cache up, so its key is not needed)."""
    from torch._inductor import codecache
    return hasattr(codecache, "resolve_pre_grad_pass_timing")


_RECOMPILE_LIMIT_NAMES = (("recompile_limit", "cache_size_limit"),
                          ("accumulated_recompile_limit", "accumulated_cache_size_limit"))


def recompile_limits(per_code: int, accumulated: int | None = None) -> dict[str, int]:
    """Dynamo config settings for ``torch._dynamo.config.patch(**...)`` that set how
    many times one code object (and, if given, all code objects together) may
    recompile: ``recompile_limit`` / ``accumulated_recompile_limit``, or the older
    names ``cache_size_limit`` / ``accumulated_cache_size_limit`` where only those
    exist."""
    from torch._dynamo import config as dynamo_config
    settings: dict[str, int] = {}
    for names, value in zip(_RECOMPILE_LIMIT_NAMES, (per_code, accumulated)):
        if value is None:
            continue
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is None:
            raise RuntimeError(
                f"torch {torch.__version__}: no Dynamo setting named {' or '.join(names)}")
        settings[name] = value
    return settings


def pre_grad_passes_on(config: Any) -> bool:
    """Whether Inductor's ``config`` (the module, or the options of one compile) runs
    pre-grad passes: its ``use_pre_grad_passes`` (2.10 on), True where torch has no such
    setting (2.8 and 2.9, where pre-grad passes always run)."""
    if isinstance(config, dict):
        return bool(config.get("use_pre_grad_passes", True))
    return bool(getattr(config, "use_pre_grad_passes", True))
