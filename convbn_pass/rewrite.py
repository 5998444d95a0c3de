"""Replace accepted Conv→BatchNorm candidates by the Tune-mode computation.

Before (Dynamo's pre-grad graph)::

    conv2d = torch.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    bn = F.batch_norm(conv2d, mean, var, gamma, beta, False, 0.1, 1e-05)
    relu = bn.relu()

After::

    scale = convbn_pass.tune.bn_scale(var, gamma, 1e-05)        # c = γ/sqrt(σ̂²+ε)
    weight = convbn_pass.tune.scale_weight(w, scale)            # W′ = W·c
    bias = convbn_pass.tune.fuse_bias(b, mean, scale, beta, w)  # b′ = β+(b−μ̂)·c
    conv2d = torch.conv2d(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
    relu = conv2d.relu()

The three new nodes are tagged ``MUST_RECOMPUTE`` (unless the policy keeps W′),
so AOTAutograd's partitioner rebuilds W′ in backward from the parameters instead
of saving it: the block then keeps only ``x`` for backward, as Deploy mode does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from . import tune
from .match import REASONS, Candidate, TensorArg, find_candidates
from .policy import Action, check_policy, decide
from .records import Decision, current_compile_id, next_graph_id, record

__all__ = ["run", "rewrite_candidate"]

log = logging.getLogger(__name__)

# ac_graph_id values for the recompute regions; any id distinct from user
# checkpoint regions works, the partitioner compares them only along edges
# between two tagged nodes and the W′ nodes of different blocks never touch.
_AC_GRAPH_ID = 1_000_003
_HALF = (torch.float16, torch.bfloat16)


def _materialise(graph: fx.Graph, arg: TensorArg) -> fx.Node | None:
    """Module form names attributes by path; turn such a path into a get_attr node."""
    if isinstance(arg, str):
        return graph.get_attr(arg)
    return arg


def _set_arg(node: fx.Node, params: tuple[str, ...], name: str, value: Any) -> None:
    index = params.index(name)
    if name in node.kwargs or index >= len(node.args):
        node.update_kwarg(name, value)
    else:
        node.update_arg(index, value)


def _module_conv(graph: fx.Graph, cand: Candidate, weight: fx.Node,
                 bias: fx.Node | None) -> fx.Node:
    """The functional call that replaces a conv/linear module node."""
    conv = cand.conv
    module, functional = conv.module, conv.functional
    assert module is not None and functional is not None
    x: Any = conv.input
    if isinstance(module, nn.Linear):
        return graph.call_function(functional, (x, weight, bias))
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return graph.call_function(functional, (
            x, weight, bias, module.stride, module.padding, module.output_padding,
            module.groups, module.dilation))
    assert isinstance(module, nn.modules.conv._ConvNd)
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        # nn.ConvNd pads explicitly first for reflect/replicate/circular modes.
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                {"mode": module.padding_mode})
        padding = (0,) * len(module.kernel_size)
    return graph.call_function(functional, (
        x, weight, bias, module.stride, padding, module.dilation, module.groups))


def _split_bias(cand: Candidate) -> bool:
    """Whether b′ is added after the conv rather than passed as its bias."""
    return cand.out_dtype in _HALF and cand.stats_dtype not in _HALF


def rewrite_candidate(graph: fx.Graph, cand: Candidate, action: Action) -> fx.Node:
    """Rewrite one accepted candidate in place; returns the node that now yields
    the block's output."""
    assert cand.reject is None and action is not Action.EVAL
    conv, bn = cand.conv, cand.bn
    # Everything the conv and the BN read is defined before the BN node (symbolic
    # traces create a BN's get_attr nodes after the conv), so the new nodes go
    # just before the BN, and a functional conv moves down behind them: its only
    # user is the BN, so nothing in between needs it.
    with graph.inserting_before(bn.last):
        # Step (1): the parameters and statistics as nodes.
        w = _materialise(graph, conv.weight)
        b = _materialise(graph, conv.bias)
        # Step (2): c, W′, b′ (tune.py holds the math).
        if bn.kind == "affine":  # y·scale + shift: c = scale, b′ = b·c + shift
            scale = graph.call_function(tune.channel_scale, (bn.scale,))
            mean, beta = None, bn.shift
        else:
            mean = _materialise(graph, bn.running_mean)
            var = _materialise(graph, bn.running_var)
            gamma = _materialise(graph, bn.weight)
            beta = _materialise(graph, bn.bias)
            scale = graph.call_function(tune.bn_scale, (var, gamma, bn.eps))
        kwargs = {"transposed": True, "groups": conv.groups} if conv.transposed else {}
        weight = graph.call_function(tune.scale_weight, (w, scale), kwargs)
        if b is None and mean is None and beta is None:  # b′ = 0: the conv keeps no bias
            bias, new_nodes = None, (scale, weight)
        else:
            bias = graph.call_function(tune.fuse_bias, (b, mean, scale, beta, w))
            new_nodes = (scale, weight, bias)
        # Step (3): the conv itself, now with W′ and b′. Under autocast a
        # half-precision conv would round b′ (and the gradient of b′, hence of β
        # and γ) to its dtype, where BatchNorm keeps them in float32: there b′ is
        # added after the conv, in float32, and the sum cast back. (A model cast
        # to half has half BatchNorm parameters: b′ stays in the conv.)
        split_bias = bias is not None and _split_bias(cand)
        conv_bias = None if split_bias else bias
        if conv.module is None:
            bn.last.prepend(conv.node)
            _set_arg(conv.node, conv.params, "weight", weight)
            _set_arg(conv.node, conv.params, "bias", conv_bias)
            out = conv.node
        else:
            out = _module_conv(graph, cand, weight, conv_bias)
            out.meta.update(conv.node.meta)
        if split_bias:
            axis = {"axis": -1} if conv.op == "linear" else {}
            out = graph.call_function(tune.add_channel_bias, (out, bias), axis)
            out.meta.update(conv.node.meta)
    for node in new_nodes:
        node.meta["nn_module_stack"] = bn.node.meta.get("nn_module_stack", {})
        if action is Action.TUNE:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = _AC_GRAPH_ID
    # Step (4): the BatchNorm's users read the conv; the BatchNorm goes.
    bn.last.replace_all_uses_with(out)
    if bn.output is not None:
        graph.erase_node(bn.output)
    graph.erase_node(bn.node)
    if conv.node not in (out, *out.args):
        graph.erase_node(conv.node)
    return out


def run(graph: fx.Graph, policy: str = "auto") -> list[Decision]:
    """Find, decide and rewrite every candidate of ``graph``; record each decision."""
    check_policy(policy)
    graph_id, compile_id = next_graph_id(), current_compile_id()
    candidates = find_candidates(graph)
    decisions: list[Decision] = []
    for cand in candidates:
        if cand.reject is not None:
            action, reason, detail = "skip", cand.reject, cand.detail
        else:
            choice = decide(cand, policy)
            if choice.action is Action.EVAL:
                action, reason = "skip", "policy_eval"
                detail = f"{REASONS['policy_eval']} ({choice.detail})"
            else:
                rewrite_candidate(graph, cand, choice.action)
                action, reason, detail = choice.action.value, "tuned", choice.detail
        decision = Decision(graph_id, cand.conv_path, cand.bn_path, cand.op, action,
                            reason, detail, cand.weight_numel, cand.activation_numel,
                            cand.norm, compile_id)
        record(decision)
        decisions.append(decision)
    if any(d.tuned for d in decisions):
        graph.lint()
    log.debug("convbn_pass graph %d: %d candidates, %d tuned\n%s", graph_id,
              len(decisions), sum(d.tuned for d in decisions), graph)
    return decisions

