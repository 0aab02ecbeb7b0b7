"""Metrics of a run folder: how recognizable, how natural and how diverse its visualizations are.

The paper compares methods by classification accuracy, FID and CLIP zero-shot accuracy. What is
computed here, offline, for any run folder (:func:`evaluate_run`):

``model_top1`` / ``model_top5``
    Accuracy of the class visualizations by the visualized model itself (top-1 and top-5 hits of
    the target class). Every method optimizes this model, so these are upper bounds.
``judge_top1`` / ``judge_top5``
    The same by an independent judge model (default for ImageNet models: efficientnet-lite2;
    efficientnet-lite0 when the visualized model is lite2). ``ref_judge_top1`` is the judge's
    top-1 accuracy on the run's real reference images. ``judge_top1_rec`` is the judge's top-1
    accuracy on the class targets whose references the judge itself recognizes (at least half
    of them classified as the class; ``recognized_targets`` counts them): a method that makes
    images like its references cannot be expected to be recognized where the references are not
    (with the offline photographs, lite2 calls the tiger-cat photo an Egyptian cat and the daisy
    photo something else).
``fid``
    The Fréchet distance between the class visualizations and their reference images in the
    judge's penultimate features (the input of its last ``nn.Linear``)::

        FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^{1/2}

    With N images in D dimensions (N ≪ D here) both covariances are rank-deficient. The trace of
    the matrix square root is computed exactly from the centered feature matrices
    A = (X_a − μ_a)/√(N_a − 1) and B likewise: Σ_a = AᵀA, Σ_b = BᵀB, and the nonzero eigenvalues of
    Σ_a Σ_b are those of (ABᵀ)(ABᵀ)ᵀ, so tr (Σ_a Σ_b)^{1/2} = ‖ABᵀ‖_* (the nuclear norm, a sum of
    singular values of an N_a × N_b matrix), in float64. It equals the real part of
    ``scipy.linalg.sqrtm(Σ_a Σ_b)``'s trace where sqrtm is stable (``method="sqrtm"`` computes
    that way, and a test checks that they agree), and it needs no ε·I regularization. Each image
    enters as ``fid_crops`` views (default 5: the whole image and its four corner crops of 3/4
    side, each resized to the judge's input), the same for both sets, which steadies the estimate
    with few images. At least 2 images per set are required; below that it is "n/a". With 6
    targets the value is noisy in absolute terms but comparable across methods computed the same
    way; it is not comparable with published FIDs (Inception features, 50 000 images).
``w2``
    Mean per-channel sort-matching distance (the squared 1-D Wasserstein-2 distance of
    :func:`vital_fast.sort_match_loss`) between a visualization's features and its references'
    sorted prototype (all D values per row, no quantile resampling), averaged over channels and
    then over the matched layers (the family's default layers for class targets, the default
    layers before the target's layer for channel targets), unweighted. Lower is closer.
``act_ratio``
    For channel targets: the channel's spatial maximum on the visualization divided by the mean
    of its spatial maxima on the target's reference images (the top-k images, ranked by that
    same score when mined). 1 means "as active as its typical top-k image".
``afc`` (``afc_ci``, ``afc_trials``)
    For unit targets (every kind but class): the judge's two-alternative forced choice accuracy,
    which of two targets' reference prototypes a visualization is closer to, with a 95 % Wilson
    interval (:mod:`vital_fast.evaluate.afc`); needs at least two unit targets. Chance is 0.5.
``specificity`` / ``spec_ratio``, ``copy``
    Whether an image is specific to its unit, and whether it copies one reference: :mod:`.specificity`.
``diversity``
    Across runs of the same method and model with different seeds (:func:`compare_runs`): for
    each class target present in several of them, the mean pairwise cosine distance between the
    judge's penultimate features of its images; averaged over targets. "n/a" for a single run.

Each target also gets ``metrics["primary"]``, the value the gallery sorts by: the judge's
probability of the target class for class targets (the model's without a judge), ``act_ratio``
for channel targets.

Bad input never loses the metrics that can be computed: a run without class targets, a judge
with another label space, too few images for a Fréchet distance, missing reference files, a
model that cannot be loaded, each gives "n/a" for what it prevents and one line in
``messages`` (and in the summary's ``notes``).

The models' inputs and features come from :mod:`vital_fast.evaluate.features`; the files
(``metrics.*``, ``compare.*``, the gallery) are written by :mod:`vital_fast.report.metrics_io`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vital_fast.evaluate.afc import afc_metrics, pool_afc
from vital_fast.evaluate.features import (
    cached_views,
    channel_max,
    layer_plan,
    load_spec,
    logits_and_features,
    ref_inputs,
    sort_match_distance,
    vis_inputs,
)
from vital_fast.evaluate.specificity import copy_metrics, specificity_metrics
from vital_fast.references.images import load_image
from vital_fast.report.metrics_io import COLUMNS, NA, markdown_table, write_compare_tables, write_run_metrics
from vital_fast.results import read_manifest

__all__ = [
    "NA", "RunData", "compare_runs", "evaluate_run", "frechet_distance", "judge_for", "load_run",
    "markdown_table", "topk_hits",
]

DEFAULT_JUDGE = "efficientnet-lite2"
FID_CROPS = 5
MAX_REFS = 50


# ------------------------------------------------------------------------------------------------
# Numbers with known answers
# ------------------------------------------------------------------------------------------------


def frechet_distance(a, b, method: str = "svd") -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors.

    ``FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^{1/2}`` with unbiased covariances.

    Parameters
    ----------
    a, b : array-like
        ``(N_a, D)`` and ``(N_b, D)`` features (float64 is used inside).
    method : {"svd", "sqrtm"}
        ``"svd"`` (default): tr (Σ_a Σ_b)^{1/2} as the nuclear norm of ABᵀ (exact, N × N work, see
        the module docstring). ``"sqrtm"``: the real part of ``scipy.linalg.sqrtm`` of the D × D
        product (the usual FID code; slow and unstable when N < D).

    Returns
    -------
    float
        Non-negative; 0 for identical sets.

    Raises
    ------
    ValueError
        Not 2-D, different D, or fewer than 2 vectors in a set.

    Example
    -------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(10, 4))
    >>> round(frechet_distance(x, x), 9), round(frechet_distance(x, x + 1.0), 9)
    (0.0, 4.0)
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: need (N, D) feature sets with the same D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance: needs at least 2 vectors per set, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    A = (a - mu_a) / math.sqrt(a.shape[0] - 1)
    B = (b - mu_b) / math.sqrt(b.shape[0] - 1)
    diff = float(((mu_a - mu_b) ** 2).sum())
    tr_a, tr_b = float((A * A).sum()), float((B * B).sum())
    if method == "svd":
        cross = float(np.linalg.svd(A @ B.T, compute_uv=False).sum())
    elif method == "sqrtm":
        from scipy import linalg

        covmean = linalg.sqrtm((A.T @ A) @ (B.T @ B))
        cross = float(np.real(np.trace(covmean)))
    else:
        raise ValueError(f"frechet_distance: method must be 'svd' or 'sqrtm', got {method!r}")
    fd = diff + tr_a + tr_b - 2.0 * cross
    # rounding can leave a tiny negative value for (nearly) identical sets
    return max(0.0, fd) if fd > -1e-9 * max(1.0, tr_a + tr_b) else fd


def topk_hits(logits: torch.Tensor, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> Dict[int, torch.Tensor]:
    """Per row, whether ``labels[i]`` is among the ``k`` largest logits, for each k: ``{k: (N,) bool}``.

    Example
    -------
    >>> import torch
    >>> h = topk_hits(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), [1, 2], ks=(1, 2))
    >>> h[1].tolist(), h[2].tolist()
    ([True, False], [True, True])
    """
    lab = torch.as_tensor(list(labels), dtype=torch.long).view(-1, 1)
    out = {}
    for k in ks:
        k_eff = min(int(k), logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices.cpu()
        out[int(k)] = (top == lab).any(dim=1)
    return out


def cosine_diversity(feats: Sequence[np.ndarray]) -> float:
    """Mean pairwise cosine distance ``1 − cos`` between feature vectors (at least two)."""
    x = np.stack([np.asarray(f, dtype=np.float64) for f in feats])
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    n = len(x)
    return float((1.0 - sim[np.triu_indices(n, 1)]).mean())


# ------------------------------------------------------------------------------------------------
# Run folders
# ------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A run folder read back: manifest, the visualization of each target, its reference images."""

    path: str
    manifest: Dict[str, Any]
    targets: List[Dict[str, Any]]                      # manifest entries that have an image
    images: Dict[str, torch.Tensor]                    # key -> (3, H, W) in [0, 1]
    references: Dict[str, List[torch.Tensor]]          # key -> reference images found on disk
    messages: List[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.manifest.get("method") or self.manifest.get("settings", {}).get("method") or "vital")

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", {}).get("name", ""))

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("model", {}).get("fingerprint", ""))


def _ref_path(name: str, run_dir: str) -> Optional[str]:
    base = str(name).split("#patch", 1)[0]  # a patch reference: its full image (same channel maximum)
    for cand in (base, os.path.join(run_dir, base)):
        if os.path.isfile(cand):
            return cand
    return None


def load_run(run_dir: str, max_refs: int = MAX_REFS) -> RunData:
    """Read a run folder: its manifest, each target's ``image.png`` and the reference files that exist.

    Raises
    ------
    ValueError
        Not a vital_fast run folder, or no target with an image.
    """
    manifest = read_manifest(run_dir)
    messages: List[str] = []
    targets, images, refs = [], {}, {}
    missing_img, missing_ref, total_ref, not_files = 0, 0, 0, 0
    for t in manifest.get("targets", []):
        rel = (t.get("files") or {}).get("image")
        path = os.path.join(run_dir, rel) if rel else None
        if not path or not os.path.isfile(path):
            missing_img += 1
            continue
        try:
            images[t["key"]] = load_image(path)
        except ValueError:
            missing_img += 1
            continue
        targets.append(t)
        found = []
        for name in list(t.get("references") or [])[:max_refs]:
            total_ref += 1
            p = _ref_path(name, run_dir)
            if p is None:
                if str(name).startswith("tensor"):
                    not_files += 1
                missing_ref += 1
                continue
            try:
                found.append(load_image(p))
            except ValueError:
                missing_ref += 1
        refs[t["key"]] = found
    if missing_img:
        messages.append(f"{missing_img} target(s) have no readable image.png and are left out")
    if missing_ref:
        extra = f" ({not_files} were tensors, not files)" if not_files else ""
        messages.append(f"{missing_ref} of {total_ref} reference images listed in the manifest were not found{extra}; "
                        f"metrics use the {total_ref - missing_ref} found")
    if not targets:
        raise ValueError(f"{run_dir}: no target with a readable image.png in the manifest")
    return RunData(run_dir, manifest, targets, images, refs, messages)


# ------------------------------------------------------------------------------------------------
# The judge
# ------------------------------------------------------------------------------------------------


def judge_for(model_name: str, num_classes: Optional[int]) -> Optional[str]:
    """The default judge of a visualized model: efficientnet-lite2 for ImageNet models (lite0 for lite2).

    ``None`` when the model is not known to be an ImageNet classifier.

    Example
    -------
    >>> judge_for("efficientnet-lite0", 1000), judge_for("efficientnet-lite2", 1000), judge_for("Tiny", 10)
    ('efficientnet-lite2', 'efficientnet-lite0', None)
    """
    imagenet = num_classes == 1000 or (num_classes is None and (
        model_name.startswith("efficientnet-lite") or model_name.startswith("torchvision:")))
    if not imagenet:
        return None
    return "efficientnet-lite0" if model_name == DEFAULT_JUDGE else DEFAULT_JUDGE


# ------------------------------------------------------------------------------------------------
# evaluate_run
# ------------------------------------------------------------------------------------------------


def _mean(vals: Sequence[Any]) -> Union[float, str]:
    v = [float(x) for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))]
    return float(np.mean(v)) if v else NA


def _s_per_target(m: Mapping[str, Any]) -> Union[float, str]:
    """Optimization seconds per target from the manifest (per-target s/step times the steps)."""
    steps = sum(int(n) for _, n in (m.get("settings", {}).get("stages") or [])) or None
    vals = [(t.get("timings") or {}).get("s_per_target_step") for t in m.get("targets", [])]
    v = _mean(vals)
    return v * steps if steps and isinstance(v, float) else NA


class _Evaluation:
    """What one run's evaluation produces: the JSON metrics and, for diversity, the judge features."""

    def __init__(self, metrics: Dict[str, Any], features: Dict[str, np.ndarray]) -> None:
        self.metrics = metrics
        self.features = features


def _evaluate(run_dir: str, *, model=None, judge: Any = "auto", arch: Optional[str] = None, fid_crops: int = FID_CROPS,
              device: str = "cpu", models: Optional[Dict[Any, Any]] = None) -> _Evaluation:
    from vital_fast.models import LoadedModel

    models = models if models is not None else {}
    rd = load_run(run_dir)
    msgs = list(rd.messages)
    per: Dict[str, Dict[str, Any]] = {t["key"]: {} for t in rd.targets}

    # --- the visualized model ---
    lm = None
    try:
        spec = model if model is not None else rd.model_name
        key = ("model", id(spec) if not isinstance(spec, str) else spec, arch)
        if key not in models:
            models[key] = load_spec(spec, device, arch)
        lm = models[key]
        if rd.fingerprint and lm.fingerprint != rd.fingerprint:
            msgs.append(f"the model loaded as {spec!r} has weights {lm.fingerprint}, the run was made with "
                        f"{rd.fingerprint}: model-based metrics (model accuracy, W2, act. ratio) are n/a")
            lm = None
    except Exception as exc:  # noqa: BLE001 - reported, the judge metrics still run
        msgs.append(f"the visualized model {rd.model_name!r} could not be loaded ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); pass --model: model-based metrics are n/a")
    # --- the judge ---
    jm = None
    jname = NA
    if judge == "auto":
        judge = judge_for(rd.model_name, lm.num_classes if lm is not None else None)
        if judge is None:
            msgs.append(f"no default judge for {rd.model_name!r} (not an ImageNet model): pass --judge; "
                        f"judge accuracy, FID and 2-AFC are n/a")
    if judge is not None and judge != "none":
        key = ("judge", id(judge) if not isinstance(judge, str) else judge)
        if key not in models:
            models[key] = judge if isinstance(judge, LoadedModel) else load_spec(judge, device)
        jm = models[key]
        jname = jm.name
    judge_labels_ok = jm is not None
    class_t = [t for t in rd.targets if t.get("kind") == "class"]
    if jm is not None:
        if lm is not None and jm.fingerprint == lm.fingerprint:
            msgs.append("the judge is the visualized model itself: its accuracy is not an independent measure")
        if lm is not None and lm.num_classes is not None and jm.num_classes != lm.num_classes:
            msgs.append(f"the judge {jm.name} has {jm.num_classes} classes but the model {lm.name} has "
                        f"{lm.num_classes}: different label spaces, judge accuracy is n/a")
            judge_labels_ok = False
        elif class_t and jm.num_classes is not None and max(t["index"] for t in class_t) >= jm.num_classes:
            msgs.append(f"the judge {jm.name} has {jm.num_classes} classes, fewer than the run's class indices: "
                        f"judge accuracy is n/a")
            judge_labels_ok = False
    if not class_t:
        msgs.append("no class targets in this run: accuracy and FID are n/a")

    summary: Dict[str, Any] = {
        "method": rd.method, "model": rd.model_name, "judge": jname, "targets": len(rd.targets),
        "class_targets": len(class_t), "seed": rd.manifest.get("seed"), "s_per_target": _s_per_target(rd.manifest),
    }
    vis_class = [rd.images[t["key"]] for t in class_t]
    labels = [int(t["index"]) for t in class_t]

    def guarded(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one metric failing must not lose the others
            msgs.append(f"{name} failed ({type(exc).__name__}: {exc}); reported as n/a")

    # --- accuracy by the model ---
    def model_acc():
        logits, _ = logits_and_features(lm, vis_inputs(lm, vis_class))
        hits = topk_hits(logits, labels)
        prob = logits.softmax(1)
        for i, t in enumerate(class_t):
            per[t["key"]].update(model_top1=int(hits[1][i]), model_top5=int(hits[5][i]),
                                 model_prob=float(prob[i, labels[i]]), model_pred=int(logits[i].argmax()))
        summary["model_top1"] = float(hits[1].float().mean())
        summary["model_top5"] = float(hits[5].float().mean())

    if class_t and lm is not None:
        guarded("model accuracy", model_acc)

    # --- judge: accuracy, FID, features ---
    feats_vis: Dict[str, np.ndarray] = {}

    def judge_metrics():
        vl, vf = [], []
        for im in vis_class:
            lg, fe = cached_views(jm, im, "vis", fid_crops)
            vl.append(lg[:1])
            vf.append(fe)
        if judge_labels_ok:
            logits = torch.cat(vl)
            hits = topk_hits(logits, labels)
            prob = logits.softmax(1)
            for i, t in enumerate(class_t):
                per[t["key"]].update(judge_top1=int(hits[1][i]), judge_top5=int(hits[5][i]),
                                     judge_prob=float(prob[i, labels[i]]), judge_pred=int(logits[i].argmax()))
            summary["judge_top1"] = float(hits[1].float().mean())
            summary["judge_top5"] = float(hits[5].float().mean())
        if vf[0] is None:
            msgs.append(f"the judge {jm.name} has no nn.Linear: no penultimate features, FID is n/a")
            return
        for t, f in zip(class_t, vf):
            feats_vis[t["key"]] = f[0].numpy()
        rf, rhits = [], []
        for t in class_t:
            hits_t = []
            for im in rd.references.get(t["key"], []):
                lg, fe = cached_views(jm, im, "ref", fid_crops)
                rf.append(fe)
                hits_t.append(int(lg[0].argmax()) == int(t["index"]))
            rhits += hits_t
            if hits_t and judge_labels_ok:
                per[t["key"]]["refs_recognized"] = int(2 * sum(hits_t) >= len(hits_t))
        if rhits and judge_labels_ok:
            summary["ref_judge_top1"] = float(np.mean(rhits))
            rec = [per[t["key"]]["judge_top1"] for t in class_t if per[t["key"]].get("refs_recognized")]
            summary["recognized_targets"] = len(rec)
            summary["judge_top1_rec"] = float(np.mean(rec)) if rec else NA
        n_vis, n_ref = len(vf), len(rf)
        if n_vis < 2 or n_ref < 2:
            msgs.append(f"FID needs at least 2 visualizations and 2 reference images, got {n_vis} and {n_ref}: n/a")
            return
        summary["fid"] = frechet_distance(torch.cat(vf).numpy(), torch.cat(rf).numpy())
        summary["fid_images"] = f"{n_vis} vs {n_ref} images x {fid_crops} views"

    if class_t and jm is not None:
        guarded("judge metrics", judge_metrics)
    guarded("2-AFC", lambda: afc_metrics(rd, jm, summary, per, msgs))

    # --- W2 and channel activation ---
    def model_feature_metrics():
        no_refs = 0
        for t in rd.targets:
            refs = rd.references.get(t["key"], [])
            if not refs:
                no_refs += 1
                continue
            d = sort_match_distance(lm, rd.images[t["key"]], refs, layer_plan(lm, t))
            per[t["key"]]["w2"] = float(np.mean(list(d.values())))
            if t.get("kind") == "channel":
                v = channel_max(lm, vis_inputs(lm, [rd.images[t["key"]]]), t["layer"], int(t["index"]))
                r = channel_max(lm, ref_inputs(lm, refs), t["layer"], int(t["index"]))
                denom = float(r.mean())
                per[t["key"]]["act_ratio"] = float(v[0]) / denom if abs(denom) > 1e-12 else NA
        if no_refs:
            msgs.append(f"{no_refs} target(s) have no reference image on disk: their W2 / act. ratio are n/a")
        summary["w2"] = _mean([p.get("w2") for p in per.values()])
        if any(t.get("kind") == "channel" for t in rd.targets):
            summary["act_ratio"] = _mean([per[t["key"]].get("act_ratio") for t in rd.targets
                                          if t.get("kind") == "channel"])

    if lm is not None:
        guarded("W2 / activation metrics", model_feature_metrics)
        guarded("specificity", lambda: specificity_metrics(lm, rd, summary, per, msgs))
    if jm is not None:
        guarded("copy", lambda: copy_metrics(jm, rd, summary, per, msgs))

    for t in rd.targets:
        p = per[t["key"]]
        if t.get("kind") == "class":
            p["primary"] = p.get("judge_prob", p.get("model_prob", NA))
        else:
            p["primary"] = p.get("act_ratio", NA)
    for k, _, _ in COLUMNS:
        summary.setdefault(k, NA)
    summary["diversity"] = NA
    summary["notes"] = " · ".join(msgs) if msgs else ""
    metrics = {
        "run": os.path.abspath(run_dir), "method": rd.method, "model": rd.model_name, "judge": jname,
        "fid_crops": fid_crops, "summary": summary, "targets": per, "messages": msgs,
    }
    return _Evaluation(metrics, feats_vis)


def evaluate_run(run_dir: str, *, model=None, judge: Any = "auto", arch: Optional[str] = None,
                 fid_crops: int = FID_CROPS, device: str = "cpu", write: bool = True,
                 models: Optional[Dict[Any, Any]] = None) -> Dict[str, Any]:
    """Compute the metrics of a run folder; write ``metrics.json``, ``metrics.md``, ``metrics.csv`` and the gallery.

    Parameters
    ----------
    run_dir : str
        A folder written by ``vital-fast visualize`` / :func:`vital_fast.results.save_result`.
    model : str, LoadedModel or nn.Module, optional
        The visualized model (default: loaded by the manifest's name; its weights fingerprint must
        match the manifest's, otherwise the model-based metrics are n/a).
    judge : "auto", str, LoadedModel or None
        The independent classifier: ``"auto"`` picks :func:`judge_for`; ``None`` or ``"none"``
        skips the judge metrics.
    arch : str, optional
        Architecture of a state-dict model file (as for ``load_model``).
    fid_crops : {1, 5}
        Views per image in the Fréchet distance.
    write : bool
        Write the files and update the manifest (atomically) and the gallery.
    models : dict, optional
        A cache of loaded models shared between calls (:func:`compare_runs` passes one).

    Returns
    -------
    dict
        ``{"summary": {...}, "targets": {key: {...}}, "messages": [...], ...}`` (what metrics.json holds).

    Raises
    ------
    ValueError
        Not a run folder, or a judge spec that cannot be loaded. Everything else that goes wrong
        makes a metric "n/a" with a message.
    """
    ev = _evaluate(run_dir, model=model, judge=judge, arch=arch, fid_crops=fid_crops, device=device, models=models)
    if write:
        write_run_metrics(run_dir, ev.metrics)
    return ev.metrics


def compare_runs(run_dirs: Sequence[str], *, judge: Any = "auto", model=None, arch: Optional[str] = None,
                 fid_crops: int = FID_CROPS, device: str = "cpu", write: bool = True,
                 out: Optional[str] = None) -> Tuple[List[Dict[str, Any]], str]:
    """Evaluate several runs and make one table: a row per (model, method), a column per metric.

    Runs of the same model and method (e.g. several seeds) share a row: their metrics are
    averaged, and their diversity is computed across seeds for the targets they share.

    Returns
    -------
    (rows, markdown)
        With ``out``, also writes ``compare.md``, ``compare.csv`` and ``compare.json`` there.
    """
    if not run_dirs:
        raise ValueError("compare: no run folders given")
    models: Dict[Any, Any] = {}
    evals = []
    for r in run_dirs:
        ev = _evaluate(r, model=model, judge=judge, arch=arch, fid_crops=fid_crops, device=device, models=models)
        if write:
            write_run_metrics(r, ev.metrics)
        evals.append(ev)
    groups: Dict[Tuple[str, str], List[_Evaluation]] = {}
    for ev in evals:
        groups.setdefault((ev.metrics["model"], ev.metrics["method"]), []).append(ev)
    rows = []
    for (mname, method), evs in groups.items():
        row: Dict[str, Any] = {"method": method, "model": mname, "runs": len(evs)}
        for k, _, f in COLUMNS:
            if k in ("method", "model", "diversity"):
                continue
            vals = [e.metrics["summary"].get(k) for e in evs]
            row[k] = _mean(vals) if f != "d" else (vals[0] if len(set(map(str, vals))) == 1 else _mean(vals))
        row["diversity"] = NA
        seeds = {str(e.metrics["summary"].get("seed")) for e in evs}
        if len(evs) > 1 and len(seeds) > 1:
            keys = set().union(*[set(e.features) for e in evs])
            per_t = []
            for k in keys:
                fs = [e.features[k] for e in evs if k in e.features]
                if len(fs) >= 2:
                    per_t.append(cosine_diversity(fs))
            row["diversity"] = float(np.mean(per_t)) if per_t else NA
        row.update(pool_afc([e.metrics["summary"] for e in evs]))
        if len(evs) > 1:
            row["method"] = f"{method} ({len(evs)} runs)"
        row["notes"] = " · ".join(sorted({m for e in evs for m in e.metrics["messages"]}))
        rows.append(row)
    md = markdown_table(rows)
    if out:
        write_compare_tables(out, run_dirs, rows, md, [e.metrics for e in evals])
    return rows, md
