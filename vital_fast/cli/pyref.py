"""``py:MODULE:NAME`` on the command line: an object made by the user's own Python code.

``--model py:mypkg.models:build`` and ``--images py:mypkg.data:val_pool`` import ``MODULE`` (a dotted
module name on ``sys.path``, or the path of a ``.py`` file) and take its attribute ``NAME``; a callable
is called with no arguments and its result used.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

PREFIX = "py:"
# vital_fast.models.FAMILIES, kept here so that building the parser imports no torch (a test keeps them equal)
FAMILY_CHOICES = ("resnet", "densenet", "convnext", "efficientnet_lite", "efficientnet", "vit", "generic")


def is_pyref(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def load_pyref(spec: str, flag: str) -> Any:
    """The object ``spec`` (``py:MODULE:NAME``) names, called when callable. ``ValueError`` in one line naming
    ``flag`` for a malformed spec, a module that cannot be imported, a missing name or a call that fails."""
    body = spec[len(PREFIX):]
    mod_name, sep, name = body.rpartition(":")
    if not sep or not mod_name or not name:
        raise ValueError(f"{flag} {spec}: expected py:MODULE:NAME (a module or .py file, then a name in it)")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise ValueError(f"{flag} {spec}: no such file: {mod_name}")
            mspec = importlib.util.spec_from_file_location(f"_vital_fast_user_{abs(hash(mod_name))}", mod_name)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = module  # DataLoader workers pickle what the module defines
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module: report it in one line
        raise ValueError(f"{flag} {spec}: cannot import {mod_name}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, name):
        raise ValueError(f"{flag} {spec}: {mod_name} has no attribute {name!r}")
    obj = getattr(module, name)
    if callable(obj) and not _is_dataset_like(obj):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{flag} {spec}: calling {name}() failed: {type(exc).__name__}: {exc}") from None
    return obj


def _is_dataset_like(obj: Any) -> bool:
    """An instance that is itself a dataset (or module) and only happens to be callable."""
    return not isinstance(obj, type) and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def load_model_pyref(spec: str, labels=None, family=None):
    """``--model py:MODULE:NAME``: an ``nn.Module`` (loaded with :func:`~vital_fast.models.load_model`) or a
    :class:`~vital_fast.models.LoadedModel`; ``labels`` (``--labels``) replace its class names."""
    import dataclasses

    from torch import nn

    from vital_fast.models import LoadedModel, load_model
    from vital_fast.models.labels import check_labels

    obj = load_pyref(spec, "--model")
    if isinstance(obj, nn.Module):
        return load_model(obj, labels=labels, family=family)
    if not isinstance(obj, LoadedModel):
        raise ValueError(f"--model {spec}: got {type(obj).__name__}, not an nn.Module or a LoadedModel")
    if labels is not None:
        obj = dataclasses.replace(obj, class_names=check_labels(labels, obj.num_classes, "--labels"))
    if family is not None:
        obj = dataclasses.replace(obj, family=family)
    return obj


def images_arg(spec: str):
    """``--images``: a folder (checked), or ``py:MODULE:NAME`` made into an
    :class:`~vital_fast.references.pool.ImagePool` of that dataset (its ``fingerprint`` attribute, when it has
    one, keys the mining cache and names a sweep)."""
    if not is_pyref(spec):
        if not os.path.isdir(spec):
            raise ValueError(f"--images: no such folder: {spec}")
        return spec
    from vital_fast.references.pool import ImagePool

    obj = load_pyref(spec, "--images")
    if isinstance(obj, ImagePool):
        return obj
    return ImagePool.from_dataset(obj, fingerprint=getattr(obj, "fingerprint", None), what=f"--images {spec}")
