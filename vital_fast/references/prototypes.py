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
from vital_fast.references.cache import DiskCache
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


def prepare_inputs(loaded, images: ImageSet, size: int, crops: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Reference images as a normalized model input ``(K', 3, size, size)``.

    Each image gives its center crop (after resizing its shorter side in the model's ratio) and,
    with ``crops > 0``, random resized crops, ``ceil(crops / K)`` per image in all.
    """
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    xs = []
    per_image = -(-crops // max(1, len(images))) if crops > 0 else 0
    for img in images.images:
        xs.append(resize_center_crop(img, size, resize)[None])
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
        "resize": loaded.resize_size / loaded.input_size, "norm": [loaded.mean, loaded.std],
    }
    if use_rel:  # only then, so entries cached before this option existed stay valid
        parts["relevance"] = settings.lrp_composite
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

    val = cache.get_or_compute("class_ref", parts, compute)
    return TargetReferences(list(layers), val["prototypes"], val.get("importance", {}), val["n"])


def _relevance_of(loaded, x: torch.Tensor, start_layer: str, index: int, names: Sequence[str],
                  settings) -> Dict[str, torch.Tensor]:
    """LRP relevance at ``names`` of the reference inputs ``x``, started from unit ``index`` of
    ``start_layer`` (a channel, or the class logit) for every image."""
    from vital_fast.references.relevance import reference_relevance

    dev = next(iter(loaded.model.parameters())).device
    return reference_relevance(loaded.model, x.to(dev), start_layer,
                               torch.full((x.shape[0],), index, dtype=torch.long, device=dev), list(names),
                               family=loaded.family, composite=settings.lrp_composite)


def channel_references(
    loaded,
    target_key: str,
    target_layer: str,
    channel: int,
    images: ImageSet,
    record_layers: Sequence[Tuple[str, float]],
    size: int,
    settings,
    cache: DiskCache,
) -> TargetReferences:
    """Relevance-weighted prototypes and channel importance of a channel target's top-k references."""
    parts = {
        "model": loaded.fingerprint, "target": target_key, "layers": list(record_layers), "images": images.hashes,
        "size": size, "q": settings.quantiles, "composite": settings.lrp_composite,
        "resize": loaded.resize_size / loaded.input_size, "norm": [loaded.mean, loaded.std],
    }
    names = [l for l, _ in record_layers]

    def compute():
        x = prepare_inputs(loaded, images, size, 0, None)
        rel = _relevance_of(loaded, x, target_layer, channel, names, settings)
        feats = _features(loaded, x, names)
        protos, imp = {}, {}
        for l in names:
            f, r = feats[l], rel[l].float().cpu()
            d = f[0, 0].numel()
            protos[l] = sorted_prototype(f, q=min(settings.quantiles, d), relevance=r)
            imp[l] = channel_importance(r)
        return {"prototypes": protos, "importance": imp, "n": int(x.shape[0])}

    val = cache.get_or_compute("channel_ref", parts, compute)
    return TargetReferences(list(record_layers), val["prototypes"], val["importance"], val["n"])
