"""What both examples need: compiling a mode, the device and thread settings.

Imported by ``finetune.py`` and ``detection_backbone.py`` from their own folder
(``python examples/NAME.py`` puts it first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch
import torch.nn as nn

import convbn_pass
from convbn_pass.backends import light


def compile_model(model: nn.Module, policy: str | None, backend: str,
                  decisions: list[convbn_pass.Decision] | None = None,
                  **compile_kwargs: Any) -> Callable[..., Any]:
    """``torch.compile`` with the pass (``policy``) or without it (None).

    Each mode has its own ``options``, which makes a distinct backend: Dynamo
    compiles and caches the two apart. The FX graph cache is off so that the
    pass really runs on every compile of the script; the decisions it takes on
    each graph are appended to ``decisions``.
    """
    def keep(rewrite: convbn_pass.GraphRewrite) -> None:
        if decisions is not None:
            decisions.extend(rewrite.decisions)

    if backend == "light":
        return torch.compile(model, backend=light(policy, on_graph=keep), **compile_kwargs)
    options = (convbn_pass.options(policy, on_graph=keep, fx_graph_cache=False)
               if policy is not None else {"fx_graph_cache": False})
    return torch.compile(model, options=options, **compile_kwargs)


def mb(n: int) -> str:
    """Bytes in MB (10^6 bytes), as ``python -m convbn_pass.inspect`` counts them."""
    value = n / 1e6
    return f"{value:.1f} MB" if value >= 10 else f"{value:.2f} MB"


Fail = Callable[[str], NoReturn]


def parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options both examples take first: --device, --backend, --policy."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--backend", choices=("inductor", "light"), default="inductor",
                   help="inductor (default); light: the pass + AOTAutograd without "
                        "code generation, quick for checks")
    p.add_argument("--policy", choices=sorted(convbn_pass.POLICIES), default="auto",
                   help="the pass's policy (default auto)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None,
          check: Callable[[argparse.Namespace, Fail], None]) -> argparse.Namespace:
    """Add the options both examples take last (--seed, --threads, --quiet), parse, run
    the script's own ``check``, then check the threads and the device. A bad value is
    one line on stderr, without the usage block, and exit status 2."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); on a machine "
                        "shared with other jobs, 1 gives steadier step times")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    def fail(message: str) -> NoReturn:
        p.exit(2, f"{p.prog}: error: {message}\n")

    check(args, fail)
    if args.threads is not None and args.threads < 1:
        fail("--threads must be at least 1")
    args.device = check_device(args.device, fail)
    return args


def check_device(name: str, fail: Fail) -> torch.device:
    """``name`` as a device this script can run on, else ``fail`` with one line."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but this torch build or machine has no CUDA")
    if device.type not in ("cpu", "cuda"):
        fail(f"device {device} is not supported here; use cpu or cuda")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timer read next counts the work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def process_settings(threads: int | None) -> Iterator[None]:
    """CPU threads and Dynamo's recompile limit for one run, restored afterwards
    (each compiled mode and shape counts against the limit of the model's forward)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch._dynamo.config.patch(
                recompile_limit=max(16, torch._dynamo.config.recompile_limit)):
            yield
    finally:
        torch.set_num_threads(previous)
