"""What the visualized model itself says about a visualization, computed when a visualization ends.

- :func:`top_predictions`: the model's top-k classes of each image, ``[index, name, probability]``.
- :func:`channel_activation_ratio`: a channel's mean activation on the image relative to the mean
  over its reference images (1.0: as strong as on its references);
- :func:`annotate`: both for the targets of a result, by key (``VisualizationResult.annotations``: shown in
  notebooks, written into the run's records).

Both run one forward pass without gradients on images resized to the model's input size; they are
cheap next to the optimization, and a failure returns None instead of failing the save.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from vital_fast.models.identity import is_embedding_model
from vital_fast.models.taps import FeatureTaps


def _batch(loaded, images: Sequence[torch.Tensor]) -> torch.Tensor:
    s = loaded.input_size
    x = torch.stack([F.interpolate(im[None].float(), size=(s, s), mode="bilinear", align_corners=False,
                                   antialias=True)[0] for im in images]).clamp(0, 1)
    return loaded.normalize(x).to(loaded.device)


def top_predictions(loaded, images: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None,
                    k: int = 5) -> Optional[List[List[list]]]:
    """Top-``k`` softmax predictions of ``loaded`` for images ``(3, H, W)`` in [0, 1].

    Returns one list per image of ``[index, name, probability]`` (name ``"class <i>"`` without
    ``names``), or None when the model's output is not a ``(B, classes)`` logit matrix.
    """
    if not len(images):
        return []
    try:
        with torch.no_grad():
            out = loaded.model(_batch(loaded, images))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
            return None
        p = out.float().softmax(1).cpu()
        v, i = p.topk(min(k, p.shape[1]), dim=1)
    except Exception as exc:  # noqa: BLE001 - predictions are extra; a model we cannot run is noted
        warnings.warn(f"top-{k} predictions skipped: {exc}")
        return None
    names = list(names or [])
    return [[[int(c), names[int(c)] if int(c) < len(names) else f"class {int(c)}", round(float(pr), 5)]
             for c, pr in zip(ii, vv)] for ii, vv in zip(i.tolist(), v.tolist())]


def channel_activation_ratio(loaded, layer: str, channel, image: torch.Tensor,
                             references: Sequence[torch.Tensor]) -> Optional[float]:
    """Mean activation of ``channel`` at ``layer`` on ``image`` divided by its mean over ``references``.
    ``channel``: an index, or a unit target (a direction: its projection plus bias; a neuron: its channel at
    its location, in the grid at the model's input size)."""
    if not len(references):
        return None
    try:
        with torch.no_grad():
            out = FeatureTaps(loaded.model, [layer], detach=True, stop_after=True).run(
                _batch(loaded, [image] + list(references)))[layer]
        a = out.float().movedim(loaded.channel_dim_of(layer), 1)
        if isinstance(channel, int):
            a = a.select(1, channel)
        else:  # a unit target
            w = channel.unit_vector(a.shape[1]).to(a.device)
            a = torch.einsum("bc...,c->b...", a, w) + channel.unit_bias
            if channel.loc is not None:  # images run at the input size, where locations are given
                y, x = channel.loc
                a = a[:, y, x] if a.dim() == 3 else a[:, y]
        per = a.reshape(a.shape[0], -1).mean(1).cpu()
        ref = float(per[1:].mean())
        if abs(ref) < 1e-12:
            return None
        return round(float(per[0]) / ref, 4)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"channel activation of {layer}:{channel} skipped: {exc}")
        return None


def annotate(loaded, targets: Sequence, images: torch.Tensor, references: Sequence) -> dict:
    """``{key: {...}}`` for each target: ``predictions`` (top-5 ``[index, name, probability]``) of class targets,
    ``activation_ratio`` of unit targets (its mean activation on the image over the mean on its references). One
    forward pass each; cheap next to the optimization."""
    out: dict = {t.key: {} for t in targets}
    cls = [i for i, t in enumerate(targets) if not t.is_unit]
    if cls and not is_embedding_model(loaded.model):
        preds = top_predictions(loaded, [images[i] for i in cls], getattr(loaded, "class_names", None))
        for i, p in zip(cls, preds or []):
            out[targets[i].key]["predictions"] = p
    for i, t in enumerate(targets):
        if t.is_unit and references[i] is not None and len(references[i].images):
            r = channel_activation_ratio(loaded, t.layer, t.unit_at(), images[i],
                                         references[i].images)
            if r is not None:
                out[t.key]["activation_ratio"] = r
    return out
