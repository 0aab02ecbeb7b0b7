"""The models as measuring instruments of :mod:`vital_fast.evaluate.metrics`: loading, the inputs a
model sees (visualizations resized, real images resized and center-cropped, corner crops), logits
and penultimate features (cached per process), feature taps, and the sort-matching distance and
channel maxima at a model's layers."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vital_fast import sort_match_loss, sorted_prototype
from vital_fast.models import FeatureTaps, LoadedModel, default_layers, load_model
from vital_fast.models.facts import plan_layers_before
from vital_fast.references.images import tensor_hash

CORNER = 0.75  # side of the corner crops, relative to the image


def load_spec(spec, device, arch=None):
    """A model spec (name, file, ``nn.Module`` or ``LoadedModel``) loaded onto ``device``."""
    if isinstance(spec, LoadedModel):
        return spec.to(device)
    return load_model(spec, device=device, arch=arch)


def _resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def vis_inputs(loaded, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Visualizations as the model sees them: the whole image resized to its input size, ``(N, 3, S, S)``."""
    return torch.cat([_resize_to(im[None].float(), loaded.input_size) for im in images])


def ref_inputs(loaded, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Real images as the model's evaluation geometry sees them (resize, center crop), ``(N, 3, S, S)``."""
    return torch.stack([loaded.resize_crop(im.float()) for im in images])


def crops_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` deterministic views per image, image-major: 1 = the image, 5 = the image and its 4 corner crops."""
    if n == 1:
        return x
    if n != 5:
        raise ValueError(f"fid_crops must be 1 or 5, got {n}")
    S = x.shape[-1]
    c = int(round(S * CORNER))
    views = [x, x[..., :c, :c], x[..., :c, S - c:], x[..., S - c:, :c], x[..., S - c:, S - c:]]
    views = [_resize_to(v, S) for v in views]
    return torch.stack(views, dim=1).flatten(0, 1)


def logits_and_features(loaded, x01: torch.Tensor, batch: int = 16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits ``(N, K)`` and penultimate features ``(N, D)`` (the input of the last ``nn.Linear``; None without one)."""
    model = loaded.model
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    dev = loaded.device
    got: List[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda mod, inp: got.append(inp[0].detach().flatten(1).float().cpu())) \
        if last is not None else None
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, x01.shape[0], batch):
                out = model(loaded.normalize(x01[i:i + batch]).to(dev))
                outs.append(out.float().cpu())
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(outs), (torch.cat(got) if got else None)


_FEATURE_CACHE: Dict[Tuple[str, str, str, int], Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}


def cached_views(loaded, img: torch.Tensor, kind: str, crops: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits and features of ``crops`` views of one image (cached per process: references are shared by runs)."""
    key = (loaded.fingerprint, tensor_hash(img), kind, crops)
    if key not in _FEATURE_CACHE:
        x = vis_inputs(loaded, [img]) if kind == "vis" else ref_inputs(loaded, [img])
        _FEATURE_CACHE[key] = logits_and_features(loaded, crops_of(x, crops))
        if len(_FEATURE_CACHE) > 4096:
            _FEATURE_CACHE.pop(next(iter(_FEATURE_CACHE)))
    return _FEATURE_CACHE[key]


def _tap(loaded, x01: torch.Tensor, layers: Sequence[str], batch: int = 8) -> Dict[str, torch.Tensor]:
    out: Dict[str, List[torch.Tensor]] = {l: [] for l in layers}
    with torch.no_grad(), FeatureTaps(loaded.model, list(layers), detach=True, stop_after=True) as taps:
        for i in range(0, x01.shape[0], batch):
            f = taps.run(loaded.normalize(x01[i:i + batch]).to(loaded.device))
            for l in layers:
                out[l].append(f[l].float().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def layer_plan(loaded, t: Mapping[str, Any]) -> List[str]:
    """The layers a target's W2 is measured at: the default layers (class), those before its layer (channel)."""
    base = list(default_layers(loaded))
    if t.get("kind") == "class":
        return [l for l, _ in base]
    return [l for l, _ in plan_layers_before(loaded, t["layer"], base, 0.1)]


def sort_match_distance(loaded, image: torch.Tensor, refs: Sequence[torch.Tensor],
                        layers: Sequence[str]) -> Dict[str, float]:
    """Per layer, the mean over channels of the sort-matching W2 between ``image`` and the references' prototype."""
    fv = _tap(loaded, vis_inputs(loaded, [image]), layers)
    fr = _tap(loaded, ref_inputs(loaded, refs), layers)
    out = {}
    for l in layers:
        cd = loaded.channel_dim_of(l)
        proto = sorted_prototype(fr[l], None, channel_dim=cd)
        out[l] = float(sort_match_loss(fv[l], proto, channel_dim=cd, check_values=False))
    return out


def channel_max(loaded, x01: torch.Tensor, layer: str, channel: int) -> torch.Tensor:
    """The spatial maximum of one channel of ``layer`` per image, ``(N,)``."""
    f = _tap(loaded, x01, [layer])[layer]
    if loaded.channel_dim_of(layer) == -1:
        f = f.transpose(1, 2)
    return f[:, channel].flatten(1).amax(1)
