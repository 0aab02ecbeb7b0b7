"""Two-alternative forced choice (2-AFC) of unit visualizations, judged by a model.

The psychophysics protocol of Borowski et al. (2021) and Zimmermann et al. (2021) shows a person a
unit's visualization and asks which of two sets of real images (the unit's own top-activating
images and another unit's) it belongs to. Here a judge model (not the visualized one) answers:

- ``v_i``: the judge's penultimate features of target ``i``'s visualization (the input of its last
  ``nn.Linear``, the features of the FID, whole image, one view);
- ``p_i``: the prototype of target ``i``'s reference images, the mean of their judge features
  (resized and center-cropped as for the FID);
- for each ordered pair ``(i, j)`` of distinct unit targets, the trial is correct when
  ``d(v_i, p_i) < d(v_i, p_j)`` with ``d`` the cosine distance ``1 − cos``; a tie (e.g. identical
  reference sets) is a guess and counts as half a correct answer.

``accuracy = correct / trials`` with ``trials = n (n − 1)`` for ``n`` targets, chance level 0.5, with
a 95 % Wilson score interval (:func:`wilson_interval`; it treats the trials as independent, as the
psychophysics papers do, although each visualization enters ``n − 1`` of them). Each target's own
accuracy is over its ``n − 1`` trials.

A unit target is any target whose kind is not ``"class"`` (channels, directions, neurons): class
visualizations are judged by the judge's accuracy instead. Runs with fewer than two unit targets (with
reference images on disk) and judges without an ``nn.Linear`` give "n/a" and a message.

The second form (:func:`max_min_afc`) asks, per unit, whether its visualization is closer to the unit's
maximally activating patches than to its minimally activating ones (one trial per unit and visualization).

:func:`two_afc` is the number from feature vectors; :func:`afc_of_images` computes those with a judge;
:func:`run_afc` does it for a run folder read by :func:`vital_fast.evaluate.metrics.load_run`;
:func:`afc_metrics` is what ``evaluate_run`` calls; :func:`pool_afc` pools runs for ``compare_runs``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vital_fast.evaluate.features import cached_views

__all__ = ["AFCUnavailable", "afc_metrics", "afc_of_images", "judge_features", "max_min_afc", "pool_afc", "run_afc",
           "two_afc", "unit_targets", "wilson_interval"]

NA = "n/a"  # as vital_fast.report.metrics_io.NA
_TIE = 1e-12  # distances closer than this are a tie


class AFCUnavailable(ValueError):
    """The 2-AFC cannot be computed for a reason that is reported, not a failure (too few targets, no features)."""


def wilson_interval(k: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n`` (default: 95 %).

    ``k`` may be fractional (ties counted as half a success).

    Raises
    ------
    ValueError
        ``n < 1`` or ``k`` outside ``[0, n]``.

    Example
    -------
    >>> tuple(round(x, 3) for x in wilson_interval(8, 10))
    (0.49, 0.943)
    >>> wilson_interval(0, 5)[0], wilson_interval(5, 5)[1]
    (0.0, 1.0)
    """
    n = int(n)
    k = float(k)
    if n < 1:
        raise ValueError(f"wilson_interval: needs at least one trial, got n={n}")
    if not 0.0 <= k <= n:
        raise ValueError(f"wilson_interval: k must be in [0, n], got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n)))
    return max(0.0, center - half), min(1.0, center + half)


def _as_np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def two_afc(vis_feats: Sequence[Union[np.ndarray, torch.Tensor]],
            ref_feats: Sequence[Union[np.ndarray, torch.Tensor]]) -> Dict[str, Any]:
    """2-AFC accuracy of visualizations against the prototypes of their reference sets (cosine distance).

    Parameters
    ----------
    vis_feats : sequence of ``(D,)``
        The judge's features of each target's visualization.
    ref_feats : sequence of ``(K_i, D)``
        The judge's features of each target's reference images (``K_i ≥ 1``; a ``(D,)`` is one image).

    Returns
    -------
    dict
        ``accuracy``, ``ci_low``, ``ci_high`` (95 % Wilson), ``n_targets``, ``n_trials`` (``n (n − 1)``),
        ``n_correct`` (ties count ½) and ``per_target`` (each target's accuracy over its ``n − 1`` trials).

    Raises
    ------
    ValueError
        Fewer than two targets, different counts of visualizations and reference sets, an empty
        reference set, shapes that do not agree, or values that are not finite.

    Example
    -------
    >>> import numpy as np
    >>> r = two_afc(np.eye(3), [np.eye(3)[i][None] for i in range(3)])
    >>> r["accuracy"], r["n_trials"], r["per_target"]
    (1.0, 6, [1.0, 1.0, 1.0])
    """
    n = len(vis_feats)
    if n != len(ref_feats):
        raise ValueError(f"two_afc: {n} visualizations but {len(ref_feats)} reference sets")
    if n < 2:
        raise ValueError(f"two_afc: needs at least two targets, got {n}")
    v = np.stack([_as_np(x).reshape(-1) for x in vis_feats])
    protos = []
    for i, r in enumerate(ref_feats):
        r = _as_np(r)
        r = r[None] if r.ndim == 1 else r
        if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] != v.shape[1]:
            raise ValueError(f"two_afc: target {i}: reference features must be (K >= 1, {v.shape[1]}), got {r.shape}")
        protos.append(r.mean(0))
    p = np.stack(protos)
    if not (np.isfinite(v).all() and np.isfinite(p).all()):
        raise ValueError("two_afc: features are not all finite")
    d = 1.0 - _unit(v) @ _unit(p).T          # d[i, j]: distance of visualization i to prototype j
    own = np.diag(d)[:, None]
    score = np.where(np.abs(own - d) <= _TIE, 0.5, (own < d).astype(np.float64))
    np.fill_diagonal(score, 0.0)
    per = score.sum(1) / (n - 1)
    k, trials = float(score.sum()), n * (n - 1)
    lo, hi = wilson_interval(k, trials)
    return {"accuracy": k / trials, "ci_low": lo, "ci_high": hi, "n_targets": n, "n_trials": trials,
            "n_correct": k, "per_target": [float(x) for x in per]}


def max_min_afc(vis_feats: Sequence[Union[np.ndarray, torch.Tensor]],
                max_feats: Sequence[Union[np.ndarray, torch.Tensor]],
                min_feats: Sequence[Union[np.ndarray, torch.Tensor]]) -> Dict[str, Any]:
    """The second form of the 2-AFC: for each unit, is its visualization closer (cosine distance to the
    prototypes) to the unit's maximally activating references than to its minimally activating ones?

    Parameters
    ----------
    vis_feats : sequence of ``(D,)``
        The judge's features of each unit's visualization (one unit may appear several times, e.g. seeds).
    max_feats, min_feats : sequence of ``(K_i, D)``
        The judge's features of each entry's maximally and minimally activating references.

    Returns
    -------
    dict
        ``accuracy``, ``ci_low``, ``ci_high`` (95 % Wilson), ``n_trials`` (one per entry), ``n_correct``
        (ties count ½), ``per_target``.

    Raises
    ------
    ValueError
        No entries, counts that differ, empty reference sets, shapes that do not agree, or values that are
        not finite.

    Example
    -------
    >>> import numpy as np
    >>> r = max_min_afc(np.eye(2), [np.eye(2)[:1], np.eye(2)[1:]], [np.eye(2)[1:], np.eye(2)[:1]])
    >>> r["accuracy"], r["n_trials"]
    (1.0, 2)
    """
    n = len(vis_feats)
    if n < 1 or n != len(max_feats) or n != len(min_feats):
        raise ValueError(f"max_min_afc: {n} visualizations, {len(max_feats)} max and {len(min_feats)} min "
                         f"reference sets (need as many, at least one)")
    v = np.stack([_as_np(x).reshape(-1) for x in vis_feats])

    def protos(sets, what):
        out = []
        for i, r in enumerate(sets):
            r = _as_np(r)
            r = r[None] if r.ndim == 1 else r
            if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] != v.shape[1]:
                raise ValueError(f"max_min_afc: entry {i}: {what} features must be (K >= 1, {v.shape[1]}), "
                                 f"got {r.shape}")
            out.append(r.mean(0))
        return np.stack(out)

    pmax, pmin = protos(max_feats, "max"), protos(min_feats, "min")
    if not (np.isfinite(v).all() and np.isfinite(pmax).all() and np.isfinite(pmin).all()):
        raise ValueError("max_min_afc: features are not all finite")
    vu = _unit(v)
    dmax = 1.0 - (vu * _unit(pmax)).sum(1)
    dmin = 1.0 - (vu * _unit(pmin)).sum(1)
    score = np.where(np.abs(dmax - dmin) <= _TIE, 0.5, (dmax < dmin).astype(np.float64))
    k = float(score.sum())
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n, "ci_low": lo, "ci_high": hi, "n_trials": n, "n_correct": k,
            "per_target": [float(x) for x in score]}


# ------------------------------------------------------------------------------------------------
# With a judge model
# ------------------------------------------------------------------------------------------------


def unit_targets(targets: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    """The manifest targets that are units (every kind but ``"class"``: channel, direction, neuron, ...)."""
    return [t for t in targets if t.get("kind") != "class"]


def judge_features(judge, images: Sequence[torch.Tensor], kind: str) -> Optional[np.ndarray]:
    """The judge's penultimate features of images, ``(N, D)`` float64; None when it has no ``nn.Linear``.

    ``kind`` is ``"vis"`` (a visualization, resized whole) or ``"ref"`` (a real image, resized and
    center-cropped), one view each, through the per-process cache of :mod:`~vital_fast.evaluate.features`.
    """
    out = []
    for im in images:
        _, fe = cached_views(judge, im, kind, 1)
        if fe is None:
            return None
        out.append(fe[0].double().numpy())
    return np.stack(out) if out else None


def _no_features(judge) -> AFCUnavailable:
    return AFCUnavailable(f"the judge {getattr(judge, 'name', judge)} has no nn.Linear: no penultimate features, "
                          f"2-AFC is n/a")


def afc_of_images(judge, vis: Sequence[torch.Tensor], refs: Sequence[Sequence[torch.Tensor]]) -> Dict[str, Any]:
    """:func:`two_afc` of visualizations (one image per target) against their reference images, by ``judge``.

    Raises
    ------
    AFCUnavailable
        Fewer than two targets, or a judge without features.
    ValueError
        A target without reference images.
    """
    if len(vis) < 2:
        raise AFCUnavailable(f"2-AFC needs at least two channel/unit targets, got {len(vis)}: n/a")
    if any(len(r) == 0 for r in refs):
        raise ValueError("afc_of_images: every target needs at least one reference image")
    vf = judge_features(judge, vis, "vis")
    if vf is None:
        raise _no_features(judge)
    rf = [judge_features(judge, list(r), "ref") for r in refs]
    return two_afc(list(vf), rf)


def run_afc(rd, judge) -> Dict[str, Any]:
    """2-AFC of a run's unit targets (``rd``: a :class:`~vital_fast.evaluate.metrics.RunData`) by ``judge``.

    Targets without a reference image on disk are left out (listed in ``messages``).

    Returns
    -------
    dict
        What :func:`two_afc` returns, with ``keys`` (the targets in the trials, in the order of
        ``per_target``) and ``messages``.

    Raises
    ------
    AFCUnavailable
        Fewer than two unit targets (with references), or a judge without features: the message says which.
    """
    units = unit_targets(rd.targets)
    if len(units) < 2:
        raise AFCUnavailable(f"2-AFC needs at least two channel/unit targets, got {len(units)}: n/a")
    used = [t for t in units if rd.references.get(t["key"])]
    msgs = []
    if len(used) < len(units):
        msgs.append(f"{len(units) - len(used)} unit target(s) have no reference image on disk: left out of the 2-AFC")
    if len(used) < 2:
        raise AFCUnavailable(" · ".join(msgs + [f"2-AFC needs at least two channel/unit targets with reference "
                                                f"images, got {len(used)}: n/a"]))
    res = afc_of_images(judge, [rd.images[t["key"]] for t in used], [rd.references[t["key"]] for t in used])
    res["keys"] = [t["key"] for t in used]
    res["messages"] = msgs
    return res


def afc_metrics(rd, judge, summary: MutableMapping[str, Any], per: Mapping[str, MutableMapping[str, Any]],
                msgs: List[str]) -> None:
    """Put a run's 2-AFC into an evaluation: ``summary`` gets ``afc``, ``afc_ci`` ``[low, high]``,
    ``afc_trials`` and ``afc_targets``, ``per[key]`` each target's ``afc``; what prevents it goes to ``msgs``.

    Runs without unit targets get no message (class runs are judged by accuracy); without a judge
    (``None``) there is nothing to compute.
    """
    if not unit_targets(rd.targets) or judge is None:
        return
    try:
        res = run_afc(rd, judge)
    except AFCUnavailable as why:
        msgs.append(str(why))
        return
    msgs.extend(res["messages"])
    summary.update(afc=res["accuracy"], afc_ci=[res["ci_low"], res["ci_high"]], afc_trials=res["n_trials"],
                   afc_targets=res["n_targets"])
    for key, acc in zip(res["keys"], res["per_target"]):
        per[key]["afc"] = acc


def pool_afc(summaries: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The 2-AFC of several runs (e.g. seeds) pooled: all their trials in one proportion and its Wilson interval.

    ``{}`` when no run has one.

    Example
    -------
    >>> pool_afc([{"afc": 1.0, "afc_trials": 6}, {"afc": 0.5, "afc_trials": 2}, {"afc": "n/a"}])["afc"]
    0.875
    """
    k, n = 0.0, 0
    for s in summaries:
        a, t = s.get("afc"), s.get("afc_trials")
        if isinstance(a, (int, float)) and isinstance(t, int) and t > 0 and math.isfinite(float(a)):
            k, n = k + float(a) * t, n + t
    if not n:
        return {}
    lo, hi = wilson_interval(min(max(k, 0.0), n), n)
    return {"afc": k / n, "afc_ci": [lo, hi], "afc_trials": n}
