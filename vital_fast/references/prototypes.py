"""Reference prototypes per target: features of the reference images -> sorted quantiles (cached).

Class targets match plain feature distributions at the model's matched layers. Channel targets
match relevance-weighted distributions at the layers before the target layer, each channel row
weighted by its importance (DESIGN.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.ops.prototype import channel_importance, sorted_prototype
from vital_fast.references.cache import DiskCache, check_tensor
from vital_fast.references.images import ImageSet, random_resized_crops, resize_center_crop


@dataclass
class TargetReferences:
    """What one target is matched against at one resolution."""

    layers: List[Tuple[str, float]]                       # (layer, weight λ)
    prototypes: Dict[str, torch.Tensor]                   # layer -> (C, Q) sorted quantiles
    importance: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (C,) (channel targets)
    n_images: int = 0


def _features(loaded, x: torch.Tensor, layers: Sequence[str], batch: int = 8) -> Dict[str, torch.Tensor]:
    """Features of ``x`` (model input, normalized) at ``layers``, in chunks, no grad, on CPU."""
    from vital_fast.models import FeatureTaps

    out: Dict[str, List[torch.Tensor]] = {l: [] for l in layers}
    dev = next(iter(loaded.model.parameters())).device
    with torch.no_grad(), FeatureTaps(loaded.model, list(layers), detach=True, stop_after=True) as taps:
        for i in range(0, x.shape[0], batch):
            feats = taps.run(x[i:i + batch].to(dev))
            for l in layers:
                out[l].append(feats[l].float().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def layer_channels(loaded, layer: str, channel_dim: Optional[int]) -> Optional[int]:
    """The size of ``layer``'s output along ``channel_dim`` (1, or -1 for tokens; ``None``: the last
    dimension of a ``(B, N, C)`` output, else dimension 1, as top-k mining reads it) from the model's
    layer table (one dry forward pass, memoized per model), or ``None`` when it cannot be found.
    A cache validator's check only: never raises."""
    try:
        from vital_fast.models.facts import layer_table

        shape = {d["name"]: tuple(d["shape"]) for d in layer_table(loaded)}.get(layer)
    except Exception:  # noqa: BLE001 - no table: the other checks still apply
        return None
    if not shape:
        return None
    if channel_dim is None:
        channel_dim = -1 if len(shape) == 2 else 1
    return int(shape[-1] if channel_dim == -1 else shape[0])


def _check_references(val, loaded, names: Sequence[str], q_max: int, with_importance: bool,
                      channel_dims: Optional[Dict[str, int]]) -> None:
    """Validate a cached references entry: ``{"prototypes": {layer: (C, Q)}, "importance": {layer:
    (C,)}, "n": int}`` with the layers asked for, C the layer's channels (where ``channel_dims``
    tells them), 1 <= Q <= ``q_max``, float, finite, rows sorted. Raises ValueError saying what is wrong."""
    if not isinstance(val, dict) or not isinstance(val.get("prototypes"), dict):
        raise ValueError("not a references entry")
    protos, imp = val["prototypes"], val.get("importance", {})
    if not isinstance(val.get("n"), int) or val["n"] < 1:
        raise ValueError(f"bad reference count {val.get('n')!r}")
    if set(protos) != set(names):
        raise ValueError(f"prototypes for layers {sorted(protos)}, expected {sorted(names)}")
    if with_importance and (not isinstance(imp, dict) or set(imp) != set(names)):
        raise ValueError(f"importance for layers {sorted(imp) if isinstance(imp, dict) else imp!r}, "
                         f"expected {sorted(names)}")
    for l in names:
        c = layer_channels(loaded, l, channel_dims[l]) if channel_dims and l in channel_dims else None
        p = protos[l]
        check_tensor(p, f"prototype of {l!r}", shape=(c, None))
        if not 1 <= p.shape[1] <= q_max:
            raise ValueError(f"prototype of {l!r} has {p.shape[1]} quantiles, expected 1 to {q_max}")
        if p.shape[1] > 1:
            step = (p[:, 1:] - p[:, :-1]).min()
            if bool(step < -1e-4 * (float(p.abs().max()) + 1e-6)):
                raise ValueError(f"prototype of {l!r} has unsorted rows")
        if with_importance:
            check_tensor(imp[l], f"importance of {l!r}", shape=(p.shape[0],))


def prepare_inputs(loaded, images: ImageSet, size: int, crops: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Reference images as a normalized model input ``(K', 3, size, size)``.

    Each image gives its center crop (after resizing its shorter side in the model's ratio) and,
    with ``crops > 0``, random resized crops, ``ceil(crops / K)`` per image in all.
    """
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    xs = []
    per_image = -(-crops // max(1, len(images))) if crops > 0 else 0
    for img in images.images:
        xs.append(resize_center_crop(img, size, resize, loaded.interpolation)[None])
        if per_image > 1:
            xs.append(random_resized_crops(img, size, per_image - 1, generator))
    return loaded.normalize(torch.cat(xs))


def class_references(
    loaded,
    target_key: str,
    images: ImageSet,
    layers: Sequence[Tuple[str, float]],
    size: int,
    settings,
    seed: int,
    cache: DiskCache,
) -> TargetReferences:
    """Prototypes of a class target's reference images at each matched layer (cached).

    With ``settings.class_relevance`` the features are relevance-weighted as for channel targets,
    the relevance starting from the class logit (:func:`vital_fast.models.class_logit_layer`), and
    each channel row gets its importance.
    """
    imgs = images.subset(range(min(len(images), settings.n_refs)))
    use_rel = settings.class_relevance
    parts = {
        "model": loaded.fingerprint, "target": target_key, "layers": list(layers), "images": imgs.hashes,
        "size": size, "q": settings.quantiles, "crops": settings.ref_crops, "seed": seed,
        "resize": loaded.resize_size / loaded.input_size, "norm": loaded.norm_key,
        # the features round differently at another thread count (up to 11/255 in an image made from them)
        "threads": torch.get_num_threads(),
    }
    parts["relevance"] = settings.lrp_composite if use_rel else None
    parts["interpolation"] = loaded.interpolation
    names = [l for l, _ in layers]

    def compute():
        gen = torch.Generator().manual_seed(seed)
        x = prepare_inputs(loaded, imgs, size, settings.ref_crops, gen)
        feats = _features(loaded, x, names)
        if use_rel:
            from vital_fast.models import class_logit_layer

            rel = _relevance_of(loaded, x, class_logit_layer(loaded), int(target_key.split(":")[1]), names, settings)
        protos, imp = {}, {}
        for l, f in feats.items():
            cd = loaded.channel_dim_of(l)
            d = f.numel() // (f.shape[0] * f.shape[cd])
            r = rel[l].float().cpu() if use_rel else None
            protos[l] = sorted_prototype(f, q=min(settings.quantiles, d), relevance=r, channel_dim=cd)
            if use_rel:
                imp[l] = channel_importance(r, channel_dim=cd)
        return {"prototypes": protos, "importance": imp, "n": int(x.shape[0])}

    def validate(val):
        _check_references(val, loaded, names, settings.quantiles, use_rel,
                          {l: loaded.channel_dim_of(l) for l in names})

    val = cache.get_or_compute("class_ref", parts, compute, validate)
    return TargetReferences(list(layers), val["prototypes"], val.get("importance", {}), val["n"])


def _relevance_of(loaded, x: torch.Tensor, start_layer: str, index, names: Sequence[str],
                  settings) -> Dict[str, torch.Tensor]:
    """LRP relevance at ``names`` of the reference inputs ``x``, started from unit ``index`` of
    ``start_layer`` (a channel, or the class logit) for every image; or from a unit target (a
    :class:`~vital_fast.optim.targets.Target`: a direction's vector, a neuron's channel and location)."""
    from vital_fast.references.relevance import reference_relevance

    dev = next(iter(loaded.model.parameters())).device
    loc = None
    if hasattr(index, "unit_vector"):  # a unit target
        t = index
        loc = t.loc
        if t.direction is not None:
            unit = t.unit_vector(t.direction.channels).to(dev)
        else:
            unit = torch.full((x.shape[0],), t.index, dtype=torch.long, device=dev)
    else:
        unit = torch.full((x.shape[0],), int(index), dtype=torch.long, device=dev)
    return reference_relevance(loaded.model, x.to(dev), start_layer, unit, list(names),
                               family=loaded.family, composite=settings.lrp_composite, location=loc)


def _pool_rows(f: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(K, C, *spatial)`` (or ``(K, N, C)`` tokens, ``channel_dim=-1``) as one image whose rows hold all K
    images' values: ``(1, C, K·D)`` (or ``(1, K·N, C)``)."""
    if channel_dim == 1:
        return f.transpose(0, 1).reshape(1, f.shape[1], -1)
    return f.reshape(1, -1, f.shape[-1])


def channel_references(
    loaded,
    target_key: str,
    target_layer: str,
    channel: int,
    images: ImageSet,
    *,
    record_layers: Sequence[Tuple[str, float]],
    size: int,
    settings,
    cache: DiskCache,
) -> TargetReferences:
    """Relevance-weighted prototypes and channel importance of a unit target's top-k references: ``channel``
    is the channel's index, or the unit :class:`~vital_fast.optim.targets.Target` (direction, neuron)."""
    parts = {
        "model": loaded.fingerprint, "target": target_key, "layers": list(record_layers), "images": images.hashes,
        "size": size, "q": settings.quantiles, "composite": settings.lrp_composite,
        "resize": loaded.resize_size / loaded.input_size, "norm": loaded.norm_key, "threads": torch.get_num_threads(),
    }
    parts["layout"] = [loaded.channel_dim_of(l) for l, _ in record_layers]  # tokens are read channels-last
    parts["interpolation"] = loaded.interpolation
    # the key names a direction's file; the digest names its values
    parts["unit"] = channel.direction.digest if getattr(channel, "kind", None) == "direction" else None
    use_rel = bool(getattr(settings, "channel_relevance", True))
    parts["relevance"] = use_rel
    names = [l for l, _ in record_layers]
    pooled = getattr(settings, "channel_prototype", "mean") == "pooled"
    if pooled:  # the key of the barycenter (the default) stays what it was: caches made before stay valid
        parts["prototype"] = "pooled"

    def compute():
        x = prepare_inputs(loaded, images, size, 0, None)
        rel = _relevance_of(loaded, x, target_layer, channel, names, settings) if use_rel else {}
        feats = _features(loaded, x, names)
        protos, imp = {}, {}
        for l in names:
            f = feats[l]
            r = rel[l].float().cpu() if use_rel else None
            cd = loaded.channel_dim_of(l)  # tokens (B, N, C): channels last, CLS included
            d = f.numel() // (f.shape[0] * f.shape[cd])
            if use_rel:  # per reference image, as with the mean: pooling changes the prototypes only
                imp[l] = channel_importance(r, channel_dim=cd)
            if pooled:  # the K references' rows as one row of K·D values per channel
                f, r = _pool_rows(f, cd), None if r is None else _pool_rows(r, cd)
            protos[l] = sorted_prototype(f, q=min(settings.quantiles, d), relevance=r, channel_dim=cd)
        return {"prototypes": protos, "importance": imp, "n": int(x.shape[0])}

    def validate(val):
        # rows: the channels of each layer (dim 1 of (B, C, H, W), the last of (B, N, C) tokens)
        _check_references(val, loaded, names, settings.quantiles, use_rel,
                          {l: loaded.channel_dim_of(l) for l in names})

    val = cache.get_or_compute("channel_ref", parts, compute, validate)
    return TargetReferences(list(record_layers), val["prototypes"], val["importance"], val["n"])
