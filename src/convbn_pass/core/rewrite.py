"""Replace accepted Conv→BatchNorm candidates by the Tune-mode computation.

Before (Dynamo's pre-grad graph)::

    conv2d = torch.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    bn = F.batch_norm(conv2d, mean, var, gamma, beta, False, 0.1, 1e-05)
    relu = bn.relu()

After::

    scale = convbn_pass.algebra.bn_scale(var, gamma, 1e-05)        # c = γ/sqrt(σ̂²+ε)
    weight = convbn_pass.algebra.scale_weight(w, scale)            # W′ = W·c
    bias = convbn_pass.algebra.fuse_bias(b, mean, scale, beta, w)  # b′ = β+(b−μ̂)·c
    conv2d = torch.conv2d(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
    relu = conv2d.relu()

The three new nodes are tagged ``MUST_RECOMPUTE`` (unless the policy keeps W′),
so AOTAutograd's partitioner rebuilds W′ in backward from the parameters instead
of saving it: the block then keeps only ``x`` for backward, as Deploy mode does.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from . import algebra
from .match import Candidate, TensorArg, find_candidates
from .policy import AUTO_RATIO, check_policy, decide
from .records import (Action, Decision, Reason, compile_label, current_compile_id,
                      next_graph_id, record)

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
    """The functional call that replaces a conv/linear module node (its form's row
    says how the module's attributes become arguments)."""
    conv = cand.conv
    assert conv is not None and conv.module is not None and conv.form.module_call is not None
    call = conv.form.module_call(conv.module)
    x: Any = conv.input
    if call.pad is not None:
        x = graph.call_function(F.pad, (x, call.pad), {"mode": call.pad_mode})
    args = {"input": x, "weight": weight, "bias": bias, **call.args}
    return graph.call_function(conv.form.functional, tuple(args[p] for p in conv.form.params))


def _split_bias(cand: Candidate) -> bool:
    """Whether b′ is added after the conv rather than passed as its bias."""
    return cand.out_dtype in _HALF and cand.stats_dtype not in _HALF


def rewrite_candidate(graph: fx.Graph, cand: Candidate, action: Action) -> fx.Node:
    """Rewrite one accepted candidate in place; returns the node that now yields
    the block's output."""
    conv, bn = cand.conv, cand.bn
    assert cand.reject is None and action.tuned and conv is not None and bn is not None
    created: list[fx.Node] = []

    def call(fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = graph.call_function(fn, args, kwargs)
        created.append(node)
        return node

    # Everything the conv and the BN read is defined before the BN node (symbolic
    # traces create a BN's get_attr nodes after the conv), so the new nodes go
    # just before the BN, and a functional conv moves down behind them: its only
    # user is the BN, so nothing in between needs it.
    with graph.inserting_before(bn.last):
        # Step (1): the parameters and statistics as nodes.
        w = _materialise(graph, conv.weight)
        b = _materialise(graph, conv.bias)
        tensors = {name: _materialise(graph, arg) for name, arg in bn.tensors.items()}
        # Step (2): c, μ̂, β as the normalisation's row reads them; W′, b′ (algebra.py).
        scale, mean, beta = bn.form.terms(call, tensors, bn.eps)
        kwargs = {"transposed": True, "groups": conv.groups} if conv.transposed else {}
        weight = call(algebra.scale_weight, w, scale, **kwargs)
        # b′ = 0 when there is no term: the conv keeps no bias.
        bias = None if b is None and mean is None and beta is None else call(
            algebra.fuse_bias, b, mean, scale, beta, w)
        # Step (3): the conv itself, now with W′ and b′. Under autocast a
        # half-precision conv would round b′ (and the gradient of b′, hence of β
        # and γ) to its dtype, where BatchNorm keeps them in float32: there b′ is
        # added after the conv, in float32, and the sum cast back. (A model cast
        # to half has half BatchNorm parameters: b′ stays in the conv.)
        split_bias = bias is not None and _split_bias(cand)
        conv_bias = None if split_bias else bias
        if conv.module is None:
            bn.last.prepend(conv.node)
            _set_arg(conv.node, conv.form.params, "weight", weight)
            _set_arg(conv.node, conv.form.params, "bias", conv_bias)
            out = conv.node
        else:
            out = _module_conv(graph, cand, weight, conv_bias)
            out.meta.update(conv.node.meta)
        if split_bias:
            axis = {} if conv.form.channel_axis == 1 else {"axis": conv.form.channel_axis}
            out = graph.call_function(algebra.add_channel_bias, (out, bias), axis)
            out.meta.update(conv.node.meta)
    for node in created:
        node.meta["nn_module_stack"] = bn.node.meta.get("nn_module_stack", {})
        if action is Action.TUNE:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = _AC_GRAPH_ID
    # Step (4): the BatchNorm's users read the conv; the BatchNorm goes.
    bn.last.replace_all_uses_with(out)
    for node in (bn.output, bn.node):
        if node is not None:
            for dead in [u for u in node.users  # make_fx's unused getitems
                         if u.target is operator.getitem and not u.users]:
                graph.erase_node(dead)
            graph.erase_node(node)
    if conv.node not in (out, *out.args):
        graph.erase_node(conv.node)
    return out


def run(graph: fx.Graph, policy: str = "auto", ratio: float = AUTO_RATIO) -> list[Decision]:
    """Find, decide and rewrite every candidate of ``graph``; record each decision."""
    check_policy(policy)
    graph_id, label = next_graph_id(), compile_label(*current_compile_id())
    decisions: list[Decision] = []
    for cand in find_candidates(graph):
        if cand.reject is not None:
            action, reason, detail = Action.SKIP, cand.reject, cand.detail
        else:
            choice = decide(cand, policy, ratio)
            if choice.action is Action.SKIP:
                reason = Reason.POLICY_EVAL
                detail = f"{Reason.POLICY_EVAL.sentence} ({choice.detail})"
            else:
                rewrite_candidate(graph, cand, choice.action)
                reason, detail = Reason.TUNED, choice.detail
            action = choice.action
        decision = Decision(graph_id, cand.conv_path, cand.bn_path, cand.op, action,
                            reason, detail, cand.weight_numel, cand.activation_numel,
                            cand.norm, label)
        record(decision)
        decisions.append(decision)
    if any(d.tuned for d in decisions):
        graph.lint()
    log.debug("convbn_pass graph %d: %d candidates, %d tuned\n%s", graph_id,
              len(decisions), sum(d.tuned for d in decisions), graph)
    return decisions
