"""Models by name: the built-in zoo, ``torchvision:NAME``, ``timm:NAME`` or
``package.module:callable``, for the ``inspect`` CLI and the benchmarks.

::

    >>> model = load("resnet18")                   # zoo.MODELS, no download
    >>> model.module, model.input_shape, model.batch
    (ResNet(...), (3, 160, 160), 8)
    >>> load("torchvision:resnet50").source        # random weights, no download
    'torchvision'

Bad input raises :class:`ModelError` with one line that says what to do;
:class:`Unavailable` (a ``ModelError``) when the package a model needs does not
import here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import torch.nn as nn

from . import zoo

__all__ = ["Model", "ModelError", "Unavailable", "load", "check_available", "model_list",
           "EXTERNAL_INPUT"]

# Input of a model that is not built in: one sample's shape and a batch.
EXTERNAL_INPUT: tuple[tuple[int, ...], int] = ((3, 224, 224), 8)
SOURCES = ("torchvision", "timm")


class ModelError(ValueError):
    """A model that cannot be built: reported in one line."""


class Unavailable(ModelError):
    """A ``torchvision:``/``timm:`` model whose package does not import here."""


@dataclasses.dataclass(frozen=True)
class Model:
    module: nn.Module
    spec: str                      # as the user wrote it
    source: str                    # "zoo", "torchvision", "timm" or "import"
    about: str
    input_shape: tuple[int, ...]   # one sample, without the batch axis
    batch: int                     # a batch size that suits it

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _choices() -> str:
    return f"{', '.join(zoo.MODELS)}, or torchvision:NAME, timm:NAME, package.module:callable"


def model_list() -> str:
    """The built-in models, one line each."""
    width = max(map(len, zoo.MODELS))
    return "\n".join(
        f"{name:<{width}}  {'x'.join(map(str, spec.input_shape)):<9}  batch {spec.batch:<3} "
        f" {spec.about}" for name, spec in zoo.MODELS.items())


def check_available(spec: str) -> None:
    """Raise :class:`Unavailable` when ``spec`` names a torchvision/timm model and that
    package does not import (cheap: nothing is built)."""
    prefix = spec.partition(":")[0]
    if ":" in spec and prefix in SOURCES:
        _package(prefix, spec)


def load(spec: str) -> Model:
    """Build the model ``spec`` names (random weights, no download)."""
    if spec in zoo.MODELS:
        entry = zoo.MODELS[spec]
        return Model(_build(entry.factory, spec), spec, "zoo", entry.about,
                     entry.input_shape, entry.batch)
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise ModelError(f"unknown model {spec!r}; choose one of {_choices()}")
    if prefix == "torchvision":
        factory, about = _torchvision(name), f"torchvision.models.get_model({name!r})"
    elif prefix == "timm":
        factory, about = _timm(name), f"timm.create_model({name!r})"
    else:
        factory, about = _imported(prefix, name), f"{prefix}:{name}()"
    source = prefix if prefix in SOURCES else "import"
    module = _build(factory, spec)
    return Model(module, spec, source, f"{type(module).__name__} from {about}",
                 *EXTERNAL_INPUT)


def _build(factory: Callable[[], Any], spec: str) -> nn.Module:
    try:
        module = factory()
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"building model {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"model {spec!r} returned {type(module).__name__}, "
                         "not a torch.nn.Module")
    return module


def _package(package: str, spec: str) -> Any:
    try:
        return importlib.import_module(package)
    except Exception as exc:  # ImportError, or a torch/torchvision build mismatch
        raise Unavailable(
            f"{spec!r} needs {package}, which does not import here ({one_line(exc)}); "
            f"install it (pip install {package}) or choose one of {', '.join(zoo.MODELS)}"
        ) from exc


def _torchvision(name: str) -> Callable[[], Any]:
    def factory() -> Any:
        models = _package("torchvision", f"torchvision:{name}").models
        if name not in models.list_models():
            raise ModelError(f"torchvision has no model {name!r}; choose one of "
                             f"{', '.join(models.list_models())}")
        builder = models.get_model_builder(name)
        # Detection and segmentation builders would download backbone weights unless
        # told not to.
        extra = ({"weights_backbone": None}
                 if "weights_backbone" in inspect.signature(builder).parameters else {})
        return builder(weights=None, **extra)
    return factory


def _timm(name: str) -> Callable[[], Any]:
    def factory() -> Any:
        timm = _package("timm", f"timm:{name}")
        if not timm.is_model(name):
            raise ModelError(f"timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False)
    return factory


def _imported(module_name: str, attribute: str) -> Callable[[], Any]:
    spec = f"{module_name}:{attribute}"
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r} "
                         f"({one_line(exc)})") from exc
    except Exception as exc:
        raise ModelError(f"importing {module_name!r} for model {spec!r} failed: "
                         f"{one_line(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{module_name!r} has no attribute {attribute!r} "
                             f"(model {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model {spec!r} is a {type(target).__name__}, not a callable "
                         "returning an nn.Module")
    return target
