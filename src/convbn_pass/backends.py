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

from .core.inductor import ConvBNPass, GraphRewrite, copy_graph
from .core.policy import AUTO_RATIO
from .core.records import current_compile_id

__all__ = ["light"]

PartitionHook = Callable[[str, fx.GraphModule], None]


def light(policy: str | None = "auto", *, ratio: float = AUTO_RATIO,
          on_graph: Callable[[GraphRewrite], None] | None = None,
          on_partition: PartitionHook | None = None) -> Callable[..., Any]:
    """A backend applying the pass under ``policy`` (None: no pass).

    ``on_graph`` receives every Dynamo graph as :class:`~convbn_pass.ConvBNPass`
    gives it (without the pass: before and after are the same graph, with no
    decisions); ``on_partition(kind, gm)`` sees the partitioned ``"forward"`` and
    ``"backward"`` graphs.
    """
    rewrite = None if policy is None else ConvBNPass(policy, ratio=ratio, on_graph=on_graph)

    def compiler(kind: str) -> Callable[..., Any]:
        def compile_graph(gm: fx.GraphModule, example_inputs: Any) -> Any:
            if on_partition is not None:
                on_partition(kind, gm)
            return make_boxed_func(gm.forward)
        return compile_graph

    aot = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                       partition_fn=min_cut_rematerialization_partition)

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        if rewrite is not None:
            rewrite(gm.graph)
            gm.recompile()
        elif on_graph is not None:
            on_graph(GraphRewrite(copy_graph(gm.graph), gm.graph, (), *current_compile_id()))
        return aot(gm, example_inputs)

    return backend
