"""Pairs that a compiled step ran outside every compiled graph, with the reason: each
reason by a model that causes it, and a model whose pairs all compile as the negative."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from convbn_pass import backends, coverage, regions, zoo


class _BreakBetween(nn.Module):
    """conv → graph break → BN: the conv ends one graph, the BN starts the next."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._dynamo.graph_break()
        return self.bn2(self.conv2(self.bn(y)))


class _Disabled(nn.Module):
    """A block under torch.compiler.disable runs eagerly inside the compiled model."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    @torch.compiler.disable
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self._eager(x)))


def _outside(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, str]]:
    model = zoo.randomize_bn(model).eval()
    pairs = (regions.find_pairs(model, (x,)), coverage.seen_pairs(model, x))
    torch._dynamo.reset()
    runs = coverage.GraphRuns(model)
    compiled = torch.compile(model, backend=runs.backend(backends.light("memory")))
    with runs.watch(), torch._dynamo.config.patch(recompile_limit=8):
        compiled(x).sum().backward()
    return [(o.conv, o.bn, o.reason) for o in coverage.outside(pairs, runs)]


CASES = {
    # blocks 8-11 are past Dynamo's limit of 8 compiles of the block forward; the stem is
    # an nn.Sequential called from the root forward, which Dynamo skips (a graph break in
    # a loop), so it runs eagerly too
    "recompile_limit": (lambda: zoo.RoutedNet(depth=12, width=4), (1, 3, 16, 16),
                        [(f"blocks.{i}.conv", f"blocks.{i}.bn", "recompile_limit")
                         for i in range(8, 12)] + [("stem.0", "stem.1", "skipped_frame")]),
    "graph_break": (_BreakBetween, (1, 3, 9, 9), [("conv", "bn", "graph_break")]),
    "disabled": (_Disabled, (1, 3, 9, 9), [("inner.0", "inner.1", "skipped_frame")]),
    "all_compiled": (lambda: zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], width=4), (1, 3, 32, 32),
                     []),
}


@pytest.mark.parametrize("case", CASES)
def test_pairs_outside_every_graph(case: str) -> None:
    build, shape, expected = CASES[case]
    torch.manual_seed(0)
    assert _outside(build(), torch.randn(shape)) == expected


def test_seen_pairs_needs_the_very_tensor() -> None:
    """A BN called on a copy of the conv output is no pair; in training mode, none."""
    class Copy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x) + 0)

    x = torch.randn(1, 3, 9, 9)
    assert coverage.seen_pairs(Copy().eval(), x) == []
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert coverage.seen_pairs(block.eval(), x) == [("0", "1")]
    assert coverage.seen_pairs(block.train(), x) == []
