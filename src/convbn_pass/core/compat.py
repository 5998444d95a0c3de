"""What differs between the torch versions the package runs on, in one place.

Verified on torch 2.13 (CPU build) and 2.14.1; each function says which API it
stands in for. Everything else the package uses is the same on both.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._inductor import custom_graph_pass

__all__ = ["custom_graph_passes", "inductor_backend", "on_compile", "on_compile_registered",
           "is_dynamo_compile", "isolated_recompiles", "TORCH_VERSION", "OLDEST_VERIFIED"]

TORCH_VERSION: tuple[int, int] = tuple(  # type: ignore[assignment]
    int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
# The oldest torch the test suite has passed on (pyproject.toml requires it).
OLDEST_VERIFIED = (2, 13)


def custom_graph_passes(value: Any) -> list[Any]:
    """The passes in an Inductor ``*_custom_pass`` setting, as a list: None, one
    pass or a list of them. ``torch._inductor.custom_graph_pass.get_custom_graph_passes``
    where torch has it."""
    getter = getattr(custom_graph_pass, "get_custom_graph_passes", None)
    if getter is not None:
        return list(getter(value))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def inductor_backend(options: dict[str, Any], dynamic: bool | None) -> Callable[..., Any]:
    """The backend ``torch.compile(model, options=options, dynamic=dynamic)`` builds
    (Inductor with these options), as a callable that a wrapping backend can call."""
    return torch._TorchCompileInductorWrapper(None, options, dynamic)


def on_compile(start: Callable[[], None], end: Callable[[], None]) -> bool:
    """Call ``start`` and ``end`` around every Dynamo compile of the process
    (``torch._dynamo.callback.callback_handler``), unless they are registered
    already (``torch._dynamo.reset()`` forgets them); False where torch has no such
    hook."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return False
    if start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(start)
    if end not in callback_handler.end_callbacks:
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
