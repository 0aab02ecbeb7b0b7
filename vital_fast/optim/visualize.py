"""The batched VITAL optimizer: many targets (any mix of classes and channels) in one pass.

``visualize`` returns tensors and writes nothing; :mod:`vital_fast.results` saves them.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from vital_fast.ops import lrp_weight, sort_match_loss
from vital_fast.models.facts import as_loaded, check_resolution, check_size, check_targets, plan_layers_before
from vital_fast.optim.presets import Settings, get_preset
from vital_fast.optim.progress import ProgressArg, resolve_progress
from vital_fast.optim.regularizers import image_priors, lr_factor
from vital_fast.optim.result import ProgressFn, VisualizationResult
from vital_fast.optim.step import descend
from vital_fast.optim.targets import Target, parse_target
from vital_fast.optim.transforms import draw_affine, draw_jitter, roll_flip, scale_rotate
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_images
from vital_fast.references.prototypes import TargetReferences, channel_references, class_references


def visualize(
    model,
    targets: Sequence[Union[str, Target]],
    references: Optional[Mapping[str, Union[ImageSet, str, Sequence, torch.Tensor]]] = None,
    *,
    preset: str = "fast",
    settings: Optional[Settings] = None,
    seed: int = 0,
    size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    class_layers: Optional[Sequence[Tuple[str, float]]] = None,
    cache: Optional[DiskCache] = None,
    progress: ProgressArg = None,
    method: str = "vital",
) -> VisualizationResult:
    """Visualize several targets in one batched optimization.

    Each batch element is its own target with its own references, seed and random transforms, so
    B targets in one pass give the images of B single-target runs with the same seeds.

    Parameters
    ----------
    model : LoadedModel or torch.nn.Module
        The network (see :func:`vital_fast.models.load_model`); its parameters are frozen.
    targets : sequence of str or Target
        ``"class:285"``, ``"channel:layer3:17"``, or :class:`Target` objects.
    references : mapping
        Target key -> reference images (an :class:`ImageSet`, a folder, a list of files or
        ``(3, H, W)`` tensors, or a ``(K, 3, H, W)`` tensor). For channel targets these are the
        top-k images or patches (see :mod:`vital_fast.references.mining`).
    preset : {"fast", "paper"}
        Named settings (:mod:`vital_fast.optim.presets`); ``settings`` overrides them whole.
    seed : int
        The run's seed; each target's seed is derived from it and the target.
    size : int, optional
        Final resolution (default: the model's input size).
    device : str or torch.device, optional
        Where to run (default: where the model's parameters are).
    class_layers : sequence of (layer, weight), optional
        Matched layers of class targets (default: the architecture family's preset).
    cache : DiskCache, optional
        Where prototypes are cached (default: the user cache folder).
    progress : bool or callable, optional
        ``True``: a tqdm progress bar on stderr (``tqdm.auto``: the notebook widget in Jupyter) when
        tqdm is installed, else a plain stderr line at every tenth of the steps; ``False`` or
        ``None``: nothing; a callable: called as ``progress(step, total_steps, losses)`` after
        every step.
    method : str
        ``"vital"`` (this method); the baselines of :mod:`vital_fast.evaluate.baselines` run in the
        same engine with the same targets, references, seeds and outputs.

    Returns
    -------
    VisualizationResult

    Raises
    ------
    ValueError
        Unknown layer, target index out of range, missing or empty references, reference
        channels that do not match the layer, or a resolution the model cannot run, all before
        any optimization step.
    """
    t_start = time.perf_counter()
    if method != "vital":
        from vital_fast.evaluate.baselines import run_baseline

        return run_baseline(model, targets, references, method=method, preset=preset, settings=settings, seed=seed,
                            size=size, device=device, class_layers=class_layers, cache=cache, progress=progress)
    callback, close_progress = resolve_progress(progress, "visualize")
    try:
        return _visualize(model, targets, references, preset, settings, seed, size, device, class_layers, cache,
                          callback, t_start)
    finally:
        close_progress()


def _visualize(model, targets, references, preset, settings, seed, size, device, class_layers, cache,
               progress: Optional[ProgressFn], t_start: float) -> VisualizationResult:
    loaded = as_loaded(model)
    if device is not None:
        loaded = loaded.to(device)
    dev = next(iter(loaded.model.parameters())).device
    settings = settings if settings is not None else get_preset(preset)
    cache = cache if cache is not None else DiskCache()
    targets = [parse_target(t) for t in targets]
    if not targets:
        raise ValueError("visualize: no targets given")
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        raise ValueError(f"visualize: duplicate targets in {keys}")
    from vital_fast.models import default_layers

    shapes = check_targets(loaded, targets)
    final = check_size(size, loaded.input_size)
    stage_sizes = [max(16, int(round(s * final))) for s, _ in settings.stages]
    for s in sorted(set(stage_sizes)):
        check_resolution(loaded, s)
    cls_layers = list(class_layers) if class_layers is not None else list(default_layers(loaded))
    for l, _ in cls_layers:
        if l not in shapes:
            from vital_fast.models import resolve_layer

            resolve_layer(loaded.model, l)
    logit_layer = None
    if settings.class_relevance and any(t.kind == "class" for t in targets):
        from vital_fast.models import class_logit_layer

        logit_layer = class_logit_layer(loaded)  # a model without class logits fails here, before any work
    # references, checked up front
    refs_in = dict(references or {})
    ref_sets: List[ImageSet] = []
    for t in targets:
        src = refs_in.get(t.key, refs_in.get(t))  # type: ignore[arg-type]
        if src is None:
            raise ValueError(f"visualize: no reference images for target {t.key}; pass references={{'{t.key}': ...}}")
        ref_sets.append(src if isinstance(src, ImageSet) else load_images(src, what=f"references of {t.key}"))
        if len(ref_sets[-1]) == 0:
            raise ValueError(f"visualize: the reference set of {t.key} is empty")
    layer_plan: List[List[Tuple[str, float]]] = []
    for t in targets:
        if t.kind == "class":
            layer_plan.append(cls_layers)
        else:
            layer_plan.append(plan_layers_before(loaded, t.layer, cls_layers, settings.channel_stem_weight))

    seeds = [t.seed(seed) for t in targets]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    B = len(targets)
    lo = torch.tensor([(0 - m) / s for m, s in zip(loaded.mean, loaded.std)], device=dev).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(loaded.mean, loaded.std)], device=dev).view(1, 3, 1, 1)
    total_steps = settings.steps
    losses = torch.zeros(B, total_steps)
    x: Optional[torch.Tensor] = None
    alpha: Optional[torch.Tensor] = None
    t_refs = t_opt = t_lrp = 0.0
    step_global = 0
    for (scale, n_steps), S in zip(settings.stages, stage_sizes):
        # --- references at this resolution (recomputed per stage; cached on disk) ---
        t0 = time.perf_counter()
        stage_refs: List[TargetReferences] = []
        for t, rs, plan, sd in zip(targets, ref_sets, layer_plan, seeds):
            if t.kind == "class":
                stage_refs.append(class_references(loaded, t.key, rs, plan, S, settings, sd, cache))
            else:
                stage_refs.append(channel_references(loaded, t.key, t.layer, t.index, rs.subset(range(min(len(rs), settings.n_refs))),
                                                     plan, S, settings, cache))
        groups = _build_groups(targets, stage_refs, dev)
        t_refs += time.perf_counter() - t0
        # --- the image: randn init, or the previous stage upsampled ---
        if x is None:
            x0 = torch.stack([torch.randn(3, S, S, generator=g) for g in gens]) * settings.init_std
            x = x0.to(dev)
            alpha = torch.zeros(B, 1, S, S, device=dev)
        else:
            x = F.interpolate(x.detach(), size=(S, S), mode="bilinear", align_corners=False)
            alpha = F.interpolate(alpha, size=(S, S), mode="bilinear", align_corners=False)
        x = torch.max(torch.min(x, hi), lo).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=settings.lr, betas=tuple(settings.betas))
        max_shift = int(round(settings.jitter * S))
        layer_names = sorted({l for g in groups for l, _ in g["layers"]})
        rel_cache: Dict[int, Dict[str, torch.Tensor]] = {}
        t0 = time.perf_counter()
        for step in range(n_steps):
            for pg in opt.param_groups:
                pg["lr"] = settings.lr * lr_factor(step, n_steps, settings.warmup)
            dy, dx, fl = draw_jitter(gens, max_shift, settings.flip)
            xt = roll_flip(x, dy, dx, fl)
            if settings.scale or settings.rotate:
                xt = scale_rotate(xt, *draw_affine(gens, settings.scale, settings.rotate))
            if step % max(1, settings.lrp_every) == 0:
                tl = time.perf_counter()
                rel_cache = _synthetic_relevance(loaded, xt, groups, settings, logit_layer)
                t_lrp += time.perf_counter() - tl
            feats = _forward_taps(loaded, xt, layer_names)
            per_elem = matching_loss(loaded, groups, feats, lambda gi, g: rel_cache[gi], B, dev)
            total = per_elem + image_priors(x, settings)
            step_global = descend(opt, x, total, alpha, losses, step_global, total_steps, progress, bounds=(lo, hi))
        t_opt += time.perf_counter() - t0
    with torch.no_grad():
        images = loaded.denormalize(x.detach()).clamp(0, 1).cpu()
        a = alpha.cpu()
        amax = a.flatten(1).amax(1).clamp_min(1e-12).view(B, 1, 1, 1)
        transparency = a / amax
    timings = {
        "total_s": time.perf_counter() - t_start, "references_s": t_refs, "optimize_s": t_opt,
        "relevance_s": t_lrp, "steps": total_steps, "s_per_step": t_opt / max(1, total_steps),
        "s_per_target_step": t_opt / max(1, total_steps) / B,
    }
    return VisualizationResult(targets, images, transparency, losses, settings, seeds, ref_sets, layer_plan,
                               timings, loaded.name, loaded.fingerprint)


def matching_loss(loaded, groups: Sequence[dict], feats: Dict[str, torch.Tensor],
                  relevance: Callable[[int, dict], Dict[str, torch.Tensor]], B: int, dev) -> torch.Tensor:
    """Each element's weighted sum over its matched layers of the sort-matching loss (class groups)
    or the relevance-weighted loss (channel groups, and class groups with ``class_relevance``: the
    groups that carry an importance; ``relevance(gi, group)`` gives the maps)."""
    per_elem = torch.zeros(B, device=dev)
    for gi, g in enumerate(groups):
        idx = g["index"]
        rel = relevance(gi, g) if g["importance"] else None
        for l, w in g["layers"]:
            f = feats[l].index_select(0, idx) if len(idx) < B else feats[l]
            cd = loaded.channel_dim_of(l)
            if rel is None:
                lv = sort_match_loss(f, g["protos"][l], channel_dim=cd, reduction="none", check_values=False)
            else:
                lv = lrp_weight(f, rel[l], g["protos"][l], g["importance"][l],
                                channel_dim=cd, reduction="none", check_values=False)
            per_elem = per_elem.index_add(0, idx, w * lv)
    return per_elem


def _build_groups(targets: Sequence[Target], refs: Sequence[TargetReferences], dev) -> List[dict]:
    """Batch elements grouped so each group shares its matched layers: all class targets, and the
    channel targets of each target layer. Prototypes are stacked to ``(B_group, C, Q)``."""
    groups: Dict[tuple, dict] = {}
    for i, (t, r) in enumerate(zip(targets, refs)):
        gkey = ("class",) if t.kind == "class" else ("channel", t.layer)
        g = groups.setdefault(gkey, {"kind": t.kind, "layer": t.layer, "members": [], "layers": r.layers})
        g["members"].append((i, t, r))
    out = []
    for g in groups.values():
        members = g["members"]
        g["index"] = torch.tensor([i for i, _, _ in members], device=dev)
        g["channels"] = torch.tensor([t.index for _, t, _ in members], device=dev)
        g["protos"] = {}
        g["importance"] = {}
        for l, _ in g["layers"]:
            ps = [r.prototypes[l] for _, _, r in members]
            q = min(p.shape[-1] for p in ps)
            g["protos"][l] = torch.stack([p if p.shape[-1] == q else _requantize(p, q) for p in ps]).to(dev)
            if all(l in r.importance for _, _, r in members):
                g["importance"][l] = torch.stack([r.importance[l] for _, _, r in members]).to(dev)
        del g["members"]
        out.append(g)
    return out


def _requantize(p: torch.Tensor, q: int) -> torch.Tensor:
    from vital_fast.reference import resample_quantiles

    return resample_quantiles(p, q)


def _forward_taps(loaded, x: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The tapped features of ``x`` (``FeatureTaps.run`` pads a one-element CPU batch to two, so one
    target alone gets the image it gets in a batch: :mod:`vital_fast.models.batching`)."""
    from vital_fast.models import FeatureTaps

    with FeatureTaps(loaded.model, list(layers), stop_after=True) as taps:
        return taps.run(x)


def _synthetic_relevance(loaded, xt: torch.Tensor, groups: Sequence[dict], settings: Settings,
                         logit_layer: Optional[str] = None) -> Dict[int, Dict[str, torch.Tensor]]:
    """Relevance of the current (jittered) synthetic images for each weighted group: constant masks.

    Channel groups start from their channel at the target layer; class groups (with
    ``class_relevance``) from their class logit at ``logit_layer``.
    """
    out: Dict[int, Dict[str, torch.Tensor]] = {}
    if not any(g["importance"] for g in groups):
        return out
    from vital_fast.references.relevance import relevance_maps

    for gi, g in enumerate(groups):
        if not g["importance"]:
            continue
        xs = xt.detach().index_select(0, g["index"])
        start = g["layer"] if g["kind"] == "channel" else logit_layer
        out[gi] = relevance_maps(loaded.model, xs, start, g["channels"], [l for l, _ in g["layers"]],
                                 family=loaded.family, composite=settings.lrp_composite)
    return out
