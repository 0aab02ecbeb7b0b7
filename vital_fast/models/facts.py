"""Facts about a model that every optimizer and sweep checks before any work: its layer table,
whether targets and resolutions are valid, and the matched layers that run before a target layer.

The layer table is cached per model object in a weak mapping, so a freed model leaves no entry
behind (and a new model that happens to get the same ``id`` never reads a stale one).
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.models import taps
from vital_fast.models.loading import LoadedModel, load_model
from vital_fast.models.taps import list_layers, resolve_layer

__all__ = ["as_loaded", "check_resolution", "check_size", "check_targets", "layer_table", "names_before",
           "plan_layers_before", "traced_layers"]

_LAYER_TABLES: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[Any, List[dict]]]" = weakref.WeakKeyDictionary()


def as_loaded(model) -> LoadedModel:
    """A :class:`LoadedModel` as it is, anything else through :func:`load_model`."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def traced_layers(model, input_size=None) -> List[dict]:
    """:func:`~vital_fast.models.taps.list_layers` of ``model`` (an ``nn.Module`` or a ``LoadedModel``), cached.

    Every tappable layer in execution order with its output shape at ``input_size`` (default: the
    ``LoadedModel``'s input size, else 224). The probe runs in eval mode (a module in training mode
    is put back as it was, its batch-norm statistics untouched). The cache is keyed by the module
    itself through a weak reference: it never keeps a model alive, and a freed model's entry goes
    with it. The list is shared: do not change it.
    """
    module, loaded = taps._unwrap(model)
    if input_size is None:
        input_size = loaded.input_size if loaded is not None else 224
    size = input_size if isinstance(input_size, int) else tuple(int(v) for v in input_size)
    # layers made later (heads, LAYER.patches, output: Identity taps) change the module count: a new table
    key = (size, sum(1 for _ in module.modules()))
    per_model = _LAYER_TABLES.get(module)
    if per_model is None:
        per_model = _LAYER_TABLES[module] = {}
    if key not in per_model:
        training = {m: m.training for m in module.modules()}
        try:
            module.eval()
            per_model[key] = list_layers(module, size)
        finally:
            for m, flag in training.items():
                m.training = flag
    return per_model[key]


def layer_table(loaded) -> List[dict]:
    """Every tappable layer of ``loaded`` with its output shape at the model's input size (cached)."""
    return traced_layers(loaded.model, loaded.input_size)


def names_before(model, target_layer: str, names: Sequence[str]) -> List[str]:
    """Of ``names`` (in their order), those whose layer runs strictly before ``target_layer``.

    The one ordering decision of the package: a layer is before the target when its output comes
    first in the traced execution order (:func:`traced_layers`), so a layer that contains the target
    (``layer3`` for ``layer3.1.conv2``) is not before it. Names without a tensor output are left out.
    ``model``: an ``nn.Module`` or a ``LoadedModel`` (traced at its input size).
    """
    order = {d["name"]: i for i, d in enumerate(traced_layers(model))}
    if target_layer not in order:
        resolve_layer(taps._unwrap(model)[0], target_layer)  # raises with the closest valid names
        raise ValueError(f"layer {target_layer!r} produces no tensor output")
    t = order[target_layer]
    return [n for n in names if n in order and order[n] < t]


def plan_layers_before(loaded, target_layer: str, candidates: Sequence[Tuple[str, float]], stem_weight: float) -> List[Tuple[str, float]]:
    """The matched layers that run before ``target_layer`` (execution order), the first weighted ``stem_weight``.

    A target in the first matched layer, with nothing before it, is matched at its own layer.
    """
    before = names_before(loaded, target_layer, [l for l, _ in candidates])
    if not before:
        return [(target_layer, 1.0)]
    return [(l, stem_weight if i == 0 and len(before) > 1 else 1.0) for i, l in enumerate(before)]


def check_targets(loaded, targets: Sequence) -> Dict[str, tuple]:
    """Stop before any optimization on an unknown layer, an index out of range, a direction whose length is
    not the layer's channels, a neuron's location outside the layer's grid (at the model's input size)."""
    shapes = {d["name"]: d["shape"] for d in layer_table(loaded)}
    for t in targets:
        t.check(loaded, shapes)  # each kind checks itself (vital_fast.optim.targets)
    return shapes


def check_unit_target(loaded, t, shapes: Dict[str, tuple]) -> None:
    """The checks of a unit target (channel, direction, neuron) ``t`` on ``loaded`` (``shapes``: each layer's
    output shape): its layer has channels and a grid or tokens, its unit vector fits the channels (a channel index
    in range, a direction of the right length), its location lies on the grid."""
    resolve_layer(loaded.model, t.layer)
    shape = shapes.get(t.layer)
    if shape is None:
        raise ValueError(f"target {t.key}: layer {t.layer!r} produces no tensor output")
    tokens = loaded.channel_dim_of(t.layer) == -1
    if len(shape) < 2:
        raise ValueError(f"target {t.key}: layer {t.layer!r} outputs (B, {', '.join(map(str, shape))}) with no "
                         f"spatial grid or tokens; {t.kind} targets need a convolutional or token layer (a "
                         f"classifier's outputs are class:N targets)")
    if len(shape) == 2 and not tokens:
        raise ValueError(f"target {t.key}: layer {t.layer!r} outputs (B, {shape[0]}, {shape[1]}), whose channel "
                         f"dimension cannot be told for family {loaded.family!r}; for tokens (B, N, C), channels "
                         f"last, load the model with family='vit' (--family vit)")
    c = shape[-1] if tokens else shape[0]
    try:
        t.unit_vector(c)
    except ValueError as exc:
        raise ValueError(f"target {t.key}: {str(exc).removeprefix(t.key + ': ')}") from None
    if t.loc is not None:  # a neuron, or a direction read at one position (a token: (T, 0))
        grid = (shape[0], 1) if tokens else tuple(shape[1:3]) + (1,) * (3 - len(shape))
        if t.loc[0] >= grid[0] or t.loc[1] >= grid[1]:
            raise ValueError(f"target {t.key}: location ({t.loc[0]}, {t.loc[1]}) is outside layer "
                             f"{t.layer!r}'s {grid[0]}x{grid[1]} grid at the model's input size "
                             f"({loaded.input_size} px)")


def check_matched_layers(loaded, layers: Sequence, what: str = "matched layer") -> None:
    """Each ``(layer, weight)`` names a layer with a feature map (channels and a spatial grid, or tokens): the
    sort-matching loss compares each channel's distribution over its positions. ValueError otherwise, one line."""
    shapes = {d["name"]: d["shape"] for d in layer_table(loaded)}
    for l, _ in layers:
        resolve_layer(loaded.model, l)
        shape = shapes.get(l)
        if shape is not None and len(shape) < 2:
            raise ValueError(f"{what} {l!r} outputs (B, {', '.join(map(str, shape))}) with no spatial grid or tokens: "
                             f"the loss matches each channel's values over positions, so it needs a feature map")


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
            loaded.model(loaded.normalize(torch.zeros(1, 3, size, size, device=dev)))
    except Exception as exc:
        raise ValueError(
            f"the model fails on a {size}x{size} input ({type(exc).__name__}: {exc}); choose another "
            f"--size or a stage schedule whose resolutions the model accepts (its native size is "
            f"{loaded.input_size})"
        ) from None
