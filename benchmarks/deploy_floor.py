"""Does the ``memory`` policy keep exactly Deploy mode's activation bytes on every zoo model?

For each model of ``convbn_pass.zoo`` (random BN statistics, eval mode) and each
backend asked for, three exact figures (saved-tensor hooks, ``convbn_pass.memory``):
compile without the pass (Eval), with the pass under ``memory``, and the Deploy
fold compiled without the pass. The pass's figure should equal Deploy's::

    python -m benchmarks.deploy_floor --backends light inductor --px 64 --batch 2

Prints one line per model and backend and ``--json`` writes them; exit status 1
where a model keeps more or fewer bytes than Deploy, 2 on bad arguments. Deploy is
the floor only where it folds every pair the pass tunes: the detector's shared head
(one conv-BN pair called once per FPN level) cannot be folded for one call, so its
Deploy figure keeps those BNs and is no floor; such rows are printed, not judged.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass import backends, deploy, memory, zoo
from convbn_pass.core.records import COUNTER

__all__ = ["Floor", "measure", "main"]

BACKENDS = ("light", "inductor")


class Floor(NamedTuple):
    model: str
    backend: str
    eval_bytes: int     # compiled, no pass
    tune_bytes: int     # compiled, the pass under the memory policy
    deploy_bytes: int   # the Deploy fold, compiled, no pass
    tuned: int          # pair calls the pass tuned
    folded: int         # pairs the Deploy fold folded (a module called twice is not folded)

    @property
    def comparable(self) -> bool:
        """Deploy is the floor only where it folded every pair the pass tuned."""
        return self.folded == self.tuned

    @property
    def at_floor(self) -> bool:
        return self.tune_bytes == self.deploy_bytes


def _compiler(backend: str, policy: str | None) -> Callable[[nn.Module], Any]:
    if backend == "light":
        return lambda m: torch.compile(m, backend=backends.light(policy))
    options: dict[str, Any] = ({"fx_graph_cache": False} if policy is None
                               else convbn_pass.options(policy, fx_graph_cache=False))
    return lambda m: torch.compile(m, options=options)


def _saved(model: nn.Module, x: torch.Tensor, compile_fn: Callable[[nn.Module], Any]) -> int:
    torch._dynamo.reset()
    return memory.saved_activation_bytes(compile_fn(model), model, x)


def measure(name: str, backend: str, batch: int, px: int) -> Floor:
    module, shape, _ = zoo.build(name)
    model = zoo.randomize_bn(module).eval()
    if len(shape) == 3:
        shape = (shape[0], px, px)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    folded = deploy.fold(model, x)
    n_folded = len(deploy.pairs(model, x))
    eval_bytes = _saved(model, x, _compiler(backend, None))
    deploy_bytes = _saved(folded, x, _compiler(backend, None))
    torch._dynamo.utils.counters.pop(COUNTER, None)
    tune_bytes = _saved(model, x, _compiler(backend, "memory"))
    tuned = int(torch._dynamo.utils.counters[COUNTER]["tuned"])
    return Floor(name, backend, eval_bytes, tune_bytes, deploy_bytes, tuned, n_folded)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deploy_floor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=sorted(zoo.MODELS), help="zoo names (default all)")
    p.add_argument("--backends", nargs="+", default=["light"], choices=BACKENDS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--px", type=int, default=64, help="image side (image models)")
    p.add_argument("--json", type=pathlib.Path, help="write the figures there")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = sorted(set(args.models) - set(zoo.MODELS))
    if unknown:
        print(f"benchmarks.deploy_floor: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = []
    for name in args.models:
        for backend in args.backends:
            row = measure(name, backend, args.batch, args.px)
            rows.append(row)
            verdict = ("= deploy" if row.at_floor
                       else f"differs by {row.tune_bytes - row.deploy_bytes:+,}")
            if not row.comparable:
                verdict += f" (Deploy folds {row.folded} of {row.tuned} pairs: not the floor)"
            print(f"{name:18} {backend:8} eval {row.eval_bytes:>11,}  tune {row.tune_bytes:>11,}  "
                  f"deploy {row.deploy_bytes:>11,}  tuned {row.tuned:3}  {verdict}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"torch": torch.__version__, "batch": args.batch, "px": args.px,
             "rows": [{**r._asdict(), "at_floor": r.at_floor, "comparable": r.comparable}
                      for r in rows]}, indent=1) + "\n")
    return 0 if all(r.at_floor for r in rows if r.comparable) else 1


if __name__ == "__main__":
    sys.exit(main())
