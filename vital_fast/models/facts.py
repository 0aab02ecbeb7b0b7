"""Facts about a model that every optimizer and sweep checks before any work: its layer table,
whether targets and resolutions are valid, and the matched layers that run before a target layer.

The layer table is cached per model object in a weak mapping, so a freed model leaves no entry
behind (and a new model that happens to get the same ``id`` never reads a stale one).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.models.loading import LoadedModel, load_model
from vital_fast.models.taps import list_layers, resolve_layer

__all__ = ["as_loaded", "check_resolution", "check_size", "check_targets", "layer_table", "plan_layers_before"]

_LAYER_TABLES: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[int, List[dict]]]" = weakref.WeakKeyDictionary()


def as_loaded(model) -> LoadedModel:
    """A :class:`LoadedModel` as it is, anything else through :func:`load_model`."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def layer_table(loaded) -> List[dict]:
    """Every tappable layer of ``loaded`` with its output shape at the model's input size (cached)."""
    per_model = _LAYER_TABLES.setdefault(loaded.model, {})
    if loaded.input_size not in per_model:
        dev = next(iter(loaded.model.parameters())).device
        per_model[loaded.input_size] = list_layers(loaded.model, loaded.input_size, device=dev)
    return per_model[loaded.input_size]


def plan_layers_before(loaded, target_layer: str, candidates: Sequence[Tuple[str, float]], stem_weight: float) -> List[Tuple[str, float]]:
    """The matched layers that run before ``target_layer`` (execution order), the first weighted ``stem_weight``.

    A target in the first matched layer, with nothing before it, is matched at its own layer.
    """
    order = {d["name"]: i for i, d in enumerate(layer_table(loaded))}
    if target_layer not in order:
        resolve_layer(loaded.model, target_layer)  # raises with the closest valid names
        raise ValueError(f"layer {target_layer!r} produces no tensor output")
    before = [l for l, _ in candidates if l in order and order[l] < order[target_layer]]
    if not before:
        return [(target_layer, 1.0)]
    return [(l, stem_weight if i == 0 and len(before) > 1 else 1.0) for i, l in enumerate(before)]


def check_targets(loaded, targets: Sequence) -> Dict[str, tuple]:
    """Stop before any optimization on an unknown layer or an index out of range."""
    shapes = {d["name"]: d["shape"] for d in layer_table(loaded)}
    for t in targets:
        if t.kind == "class":
            n = loaded.num_classes
            if n is not None and t.index >= n:
                raise ValueError(f"target {t.key}: the model has {n} classes (0-{n - 1})")
        else:
            resolve_layer(loaded.model, t.layer)
            shape = shapes.get(t.layer)
            if shape is None:
                raise ValueError(f"target {t.key}: layer {t.layer!r} produces no tensor output")
            c = shape[-1] if loaded.channel_dim_of(t.layer) == -1 else shape[0]
            if t.index >= c:
                raise ValueError(f"target {t.key}: layer {t.layer!r} has {c} channels (0-{c - 1})")
    return shapes


def check_size(size: Optional[int], default: int) -> int:
    """The final resolution: ``size``, or ``default`` when it is None; ValueError for anything below 16 px."""
    if size is None:
        return int(default)
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int of at least 16 pixels, got {size!r}")
    return size


def check_resolution(loaded, size: int) -> None:
    """ValueError, before any work, when the model cannot run a ``size`` x ``size`` input."""
    dev = next(iter(loaded.model.parameters())).device
    try:
        with torch.no_grad():
            loaded.model(torch.zeros(1, 3, size, size, device=dev))
    except Exception as exc:
        raise ValueError(
            f"the model fails on a {size}x{size} input ({type(exc).__name__}: {exc}); choose another "
            f"--size or a stage schedule whose resolutions the model accepts (its native size is "
            f"{loaded.input_size})"
        ) from None
