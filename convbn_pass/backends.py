"""A light ``torch.compile`` backend: the pass, then AOTAutograd, no code generation.

``torch.compile(model, backend=convbn_pass.backends.light(policy))`` runs the
same rewrite as the Inductor pass on Dynamo's graph and then AOTAutograd with
the min-cut partitioner Inductor uses, but executes the partitioned graphs
eagerly. Forward and gradients are those of the rewritten graph, without
Inductor's compile time: the test suite runs most of its numeric checks through
it. ``policy=None`` gives the same backend without the pass, the fair baseline.

Saved bytes are exact for this backend's graphs but differ from Inductor's:
Inductor decomposes ops before partitioning and saves other tensors (ResNet-18,
batch 8 at 160 px, no pass: 88.1 MB here, 115.4 MB under Inductor). Compare
modes within one backend, never across.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from .rewrite import run

__all__ = ["light"]

GraphHook = Callable[[str, fx.GraphModule], None]


def light(policy: str | None = "auto", on_graph: GraphHook | None = None) -> Callable[..., Any]:
    """A backend applying the pass under ``policy`` (None: no pass).

    ``on_graph(kind, gm)`` if given sees every graph: ``"pre"`` (Dynamo's graph
    after the pass), ``"forward"`` and ``"backward"`` (the partitioned graphs).
    """

    def compiler(kind: str) -> Callable[..., Any]:
        def compile_graph(gm: fx.GraphModule, example_inputs: Any) -> Any:
            if on_graph is not None:
                on_graph(kind, gm)
            return make_boxed_func(gm.forward)
        return compile_graph

    aot = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                       partition_fn=min_cut_rematerialization_partition)

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        if policy is not None:
            run(gm.graph, policy)
            gm.recompile()
        if on_graph is not None:
            on_graph("pre", gm)
        return aot(gm, example_inputs)

    return backend
