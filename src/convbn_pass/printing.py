"""A normalised, stable printout of an FX graph.

Used by the graph goldens in the tests and by ``python -m convbn_pass.inspect``,
so that what the CLI shows is what the tests pin. One line per node; no file
paths, object ids or memory addresses; Dynamo's long placeholder names are
shortened to module paths (``l_self_modules_bn_buffers_running_mean_`` becomes
``bn.running_mean``); nodes that the partitioner must recompute end with
``# recompute``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

__all__ = ["format_graph", "target_name"]

_KNOWN_MODULES = (
    ("torch.nn.functional.", "F."),
    ("convbn_pass.core.algebra.", "algebra."),
    ("torch._C._nn.", "F."),
    ("torch.ops.aten.", "aten."),
)


def target_name(node: fx.Node) -> str:
    """``torch.conv2d``, ``F.batch_norm``, ``algebra.bn_scale``, ``aten.convolution.default``,
    ``.relu`` (a method), or a module path (``call_module``)."""
    target = node.target
    if node.op == "call_method":
        return f".{target}"
    if node.op in ("call_module", "get_attr"):
        return f"self.{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    if getattr(torch, getattr(target, "__name__", ""), None) is target:
        qualified = f"torch.{target.__name__}"  # torch.conv2d, torch.batch_norm, …
    elif module == "_operator":
        qualified = f"operator.{name}"
    else:
        qualified = f"{module}.{name}" if module else name
    functional = _functional_names().get(id(target))
    if functional is not None:  # also F.max_pool2d & co, built by boolean_dispatch
        return f"F.{functional}"
    for prefix, short in _KNOWN_MODULES:
        if qualified.startswith(prefix):
            return short + qualified[len(prefix):]
    return qualified


_F_NAMES: dict[int, str] = {}


def _functional_names() -> dict[int, str]:
    """id(function) → its public name in torch.nn.functional."""
    if not _F_NAMES:
        for name, value in vars(torch.nn.functional).items():
            if callable(value) and not name.startswith("_"):
                _F_NAMES.setdefault(id(value), name)
    return _F_NAMES


_ROOT = re.compile(r"^[a-z]+_(?=(?:modules|parameters|buffers)_)")


def _short(name: str) -> str:
    """Dynamo's input names (``l_self_modules_bn_buffers_running_mean_``, ``l_x_``)
    as module paths and argument names; other names unchanged."""
    if not (name.startswith("l_") and name.endswith("_")):
        return name
    name = _ROOT.sub("", name[2:-1])  # the root module's own name: self, model, …
    name = re.sub(r"_(?:modules|parameters|buffers)_", ".", name)
    return re.sub(r"^(?:modules|parameters|buffers)_", "", name)


def _arg(value: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(value, fx.Node):
        return names[value]
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v, names) for v in value)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v, names)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def format_graph(graph: fx.Graph | fx.GraphModule) -> str:
    """The normalised text of ``graph``."""
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    names = {node: _short(node.name) for node in graph.nodes}
    inputs = [names[n] for n in graph.nodes if n.op == "placeholder"]
    lines = [f"def forward({', '.join(inputs)}):"]
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"    return {_arg(node.args[0], names)}")
            continue
        args = [_arg(a, names) for a in node.args]
        args += [f"{k}={_arg(v, names)}" for k, v in node.kwargs.items()]
        if node.op == "call_method":
            call = f"{args[0]}{target_name(node)}({', '.join(args[1:])})"
        elif node.op == "get_attr":
            call = target_name(node)
        else:
            call = f"{target_name(node)}({', '.join(args)})"
        tag = "  # recompute" if _is_recompute(node) else ""
        lines.append(f"    {names[node]} = {call}{tag}")
    return "\n".join(lines) + "\n"


def _is_recompute(node: fx.Node) -> bool:
    from torch.utils.checkpoint import CheckpointPolicy
    return node.meta.get("recompute") in (CheckpointPolicy.MUST_RECOMPUTE,
                                          CheckpointPolicy.PREFER_RECOMPUTE)
