"""Two checks that a visualization shows its own unit, not something that merely looks right (issue 26).

``specificity`` (``spec_ratio``)
    For the channel targets of one layer: how often a channel's image drives it harder than the other channels' images
    do (the fraction of (own image, other image) pairs, over every unit; chance 0.5), and the median over units
    of the ratio of its own image's drive to the strongest other image's drive (> 1: its own image is the
    strongest; only units whose strongest other drive is positive count). The drive of an image on a unit is the
    unit's spatial maximum (:func:`~vital_fast.evaluate.features.channel_max`), as ``act_ratio`` reads it. A
    texture that drives every unit of the layer shows as a low specificity however high its ``act_ratio``.
``copy``
    For every target with references: the judge-feature cosine similarity of its image to the nearest of its
    references, over the references' own typical nearest-neighbour similarity (each reference to the nearest other
    one, averaged). 1: the image is as close to a reference as the references are to each other; well above 1:
    it reproduces one reference (a method that copies shows here, whatever its recognizability).

:func:`specificity` and :func:`copy_index` compute from arrays; :func:`specificity_metrics` and
:func:`copy_metrics` fill a run's summary and per-target records (:mod:`vital_fast.evaluate.metrics`).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, MutableMapping, Tuple

import numpy as np

from vital_fast.evaluate.features import cached_views, channel_max, vis_inputs

__all__ = ["copy_index", "copy_metrics", "specificity", "specificity_metrics"]


def specificity(drive: np.ndarray) -> Tuple[float, float, np.ndarray]:
    """``(fraction, median ratio, per-unit ratios)`` of a drive matrix ``(U, U)``: ``drive[i, j]`` = unit ``j``'s
    response to unit ``i``'s image. Needs U >= 2; units whose strongest other drive is not positive get NaN."""
    d = np.asarray(drive, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(f"specificity: a square drive matrix of at least 2 units is needed, got {d.shape}")
    n = d.shape[0]
    own = np.diag(d)
    other = d.copy()
    np.fill_diagonal(other, np.nan)
    off = ~np.eye(n, dtype=bool)
    valid = (np.isfinite(own)[None, :] & np.isfinite(other))[off]  # a NaN drive is no trial, won or lost
    wins = (own[None, :] > other)[off][valid]
    if not wins.size:
        raise ValueError("specificity: every drive is NaN")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: no strongest other
        strongest = np.nanmax(other, axis=0)
    ratios = np.where(strongest > 0, own / np.where(strongest > 0, strongest, 1.0), np.nan)
    ratios = np.where(np.isfinite(own), ratios, np.nan)
    good = ratios[np.isfinite(ratios)]
    return float(wins.mean()), (float(np.median(good)) if good.size else float("nan")), ratios


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def copy_index(vis: np.ndarray, refs: np.ndarray) -> float:
    """Nearest-reference similarity of ``vis`` ``(D,)`` over the references' mean nearest-neighbour similarity
    (``refs`` ``(K, D)``, K >= 2), cosine in the features given."""
    r = _unit(refs)
    if r.shape[0] < 2:
        raise ValueError(f"copy_index: at least 2 references are needed, got {r.shape[0]}")
    v = _unit(np.asarray(vis)[None])[0]
    nearest = float((r @ v).max())
    sims = r @ r.T
    np.fill_diagonal(sims, -np.inf)
    typical = float(sims.max(axis=1).mean())
    return nearest / typical if typical > 1e-12 else float("nan")


def specificity_metrics(lm, rd, summary: MutableMapping[str, Any], per: Mapping[str, MutableMapping[str, Any]],
                        msgs: List[str]) -> None:
    """``specificity`` and ``spec_ratio`` of a run's channel targets, layer by layer, pooled over layers (the
    fraction weighted by pairs, the median over every unit); per target its ``spec_ratio``."""
    by_layer: Dict[str, List[Mapping[str, Any]]] = {}
    for t in rd.targets:
        if t.get("kind") == "channel" and t.get("layer"):
            by_layer.setdefault(t["layer"], []).append(t)
    wins, pairs, ratios = 0.0, 0, []
    for layer, ts in by_layer.items():
        if len(ts) < 2:
            continue
        x = vis_inputs(lm, [rd.images[t["key"]] for t in ts])
        drive = np.stack([channel_max(lm, x, layer, int(t["index"])).double().numpy() for t in ts], axis=1)
        frac, _, r = specificity(drive)
        n = len(ts)
        wins += frac * n * (n - 1)
        pairs += n * (n - 1)
        for t, v in zip(ts, r):
            per[t["key"]]["spec_ratio"] = float(v) if np.isfinite(v) else "n/a"
        ratios += [v for v in r if np.isfinite(v)]
    if not pairs:
        if any(t.get("kind") != "class" for t in rd.targets):
            msgs.append("specificity needs at least 2 channel targets of one layer: n/a")
        return
    summary["specificity"] = wins / pairs
    summary["spec_ratio"] = float(np.median(ratios)) if ratios else "n/a"


def copy_metrics(jm, rd, summary: MutableMapping[str, Any], per: Mapping[str, MutableMapping[str, Any]],
                 msgs: List[str], crops: int = 1) -> None:
    """``copy`` of every target with at least 2 reference images, in the judge's penultimate features (the whole
    image; ``crops`` views averaged); the mean over targets in the summary."""
    vals: List[float] = []
    for t in rd.targets:
        refs = rd.references.get(t["key"], [])
        if len(refs) < 2:
            continue
        _, fv = cached_views(jm, rd.images[t["key"]], "vis", crops)
        if fv is None:
            msgs.append(f"the judge {jm.name} has no penultimate features: copy is n/a")
            return
        fr = [cached_views(jm, im, "ref", crops)[1] for im in refs]
        v = copy_index(fv.mean(0).numpy(), np.stack([f.mean(0).numpy() for f in fr]))
        per[t["key"]]["copy"] = v
        vals.append(v)
    if vals:
        summary["copy"] = float(np.mean(vals))
    else:
        msgs.append("copy needs targets with at least 2 reference images: n/a")
