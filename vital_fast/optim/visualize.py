"""The batched VITAL optimizer: many targets (any mix of classes and channels) in one pass.

``visualize`` returns tensors and writes nothing; :mod:`vital_fast.results` saves them.
"""

from __future__ import annotations

import contextlib
import time
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch

from vital_fast.models.facts import as_loaded, check_resolution, check_size, check_targets
from vital_fast.models.predict import annotate
from vital_fast.models.text import is_text_spec, text_key
from vital_fast.optim.engine import Engine, Recipe
from vital_fast.optim.methods import build_recipe, get_objective
from vital_fast.optim.objectives import Objective
from vital_fast.optim.parametrizations import Parametrization, Pixel, get_parametrization
from vital_fast.optim.presets import Settings, get_preset
from vital_fast.optim.progress import ProgressArg, resolve_progress
from vital_fast.optim.result import ProgressFn, VisualizationResult
from vital_fast.optim.targets import Target, parse_target, resolve_model_targets
from vital_fast.optim.transforms import RollViews
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_images


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
    param: Union[None, str, Parametrization] = None,
    objective: Union[None, str, Objective] = None,
    options: Optional[Mapping[str, object]] = None,
    pool=None,
    steps: Optional[int] = None,
) -> VisualizationResult:
    """Visualize several targets in one batched optimization.

    Each batch element is its own target with its own references, seed and random transforms, so
    B targets in one pass give the images of B single-target runs with the same seeds.

    The common case is one call: ``visualize(model, "class:285", "photos/cats/", steps=300)`` (a single
    target, and its references as a single source).

    Parameters
    ----------
    model : LoadedModel or torch.nn.Module
        The network (see :func:`vital_fast.models.load_model`). It runs frozen and in eval mode, and is left
        as it was given: its training and ``requires_grad`` flags and its device after the call equal those
        before (``device=`` moves it for the call only).
    targets : sequence of str or Target
        ``"class:285"``, ``"channel:layer3:17"``, or :class:`Target` objects.
    references : mapping, or one source for a single target
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
        ``None``: nothing; a callable: called as ``progress(step, total_steps, losses)`` at every
        read of the losses (every ``settings.loss_every`` steps, 10 by default, at stage ends and at
        the end; ``losses`` are that step's, on the CPU).
    method : str
        A registered method (:data:`vital_fast.optim.methods.METHODS`): ``"vital"`` (this method),
        or a baseline, ``"actmax"``, ``"fourier"``, ``"maco"``, ``"bnstats"``
        (:mod:`vital_fast.evaluate.baselines`), all run by the same engine
        (:mod:`vital_fast.optim.engine`) with the same targets, references, seeds and outputs.
    param : str or Parametrization, optional
        The image parametrization: ``"pixel"``, ``"fourier"``, ``"maco"`` (or a registered name or an
        instance); default: the method's own (pixels for VITAL).
    objective : Objective or str, optional
        Optimize this objective (or a named one: ``"actmax"``, ``"sort_match"``, ...,
        :data:`vital_fast.optim.methods.OBJECTIVES`) (:mod:`vital_fast.optim.objectives`; they compose: ``a + 0.1 * b``)
        instead of a method's, with ``param`` (default pixels), VITAL's views and Adam with the
        settings' learning rate and schedule.
    options : mapping, optional
        Overrides of the method's options (:func:`vital_fast.optim.methods.method_options`).
    steps : int, optional
        The total number of steps: the preset's (or ``settings``') stages scaled to it
        (:meth:`Settings.with_steps`).
    pool : folder, list of files, Dataset, ImagePool or ImageSet, optional
        Candidate images for the channel targets that ``references`` leaves out: their top
        ``settings.n_refs`` images (or patches, ``settings.channel_refs``) are mined from the pool in
        one streaming pass per layer (:func:`vital_fast.references.mining.mine_topk`, cached).
        A channel target given a plain folder in ``references`` is refused: mining, not the folder's
        first files, chooses a channel's references.

    Returns
    -------
    VisualizationResult

    Raises
    ------
    ValueError
        Unknown method, parametrization or option (the valid ones listed), an objective that does
        not return one value per batch element (the shapes named), unknown layer, target index out of range, missing or empty references, reference
        channels that do not match the layer, or a resolution the model cannot run, all before
        any optimization step.
    """
    t_start = time.perf_counter()
    callback, close_progress = resolve_progress(progress, "visualize" if objective is not None or method == "vital" else method)
    from vital_fast.models.state import preserved

    module = getattr(model, "model", model)
    try:
        # the caller's model comes back as given: training and requires_grad flags, device
        with preserved(module) if isinstance(module, torch.nn.Module) else contextlib.nullcontext():
            return _visualize(model, targets, references, preset=preset, settings=settings, seed=seed, size=size,
                              device=device, class_layers=class_layers, cache=cache, progress=callback,
                              t_start=t_start, method=method, param=param, objective=objective, options=options,
                              pool=pool, steps=steps)
    finally:
        close_progress()


def _visualize(model, targets, references, *, preset, settings, seed, size, device, class_layers, cache,
               progress: Optional[ProgressFn], t_start: float, method: str, param, objective, options, pool=None,
               steps: Optional[int] = None) -> VisualizationResult:
    loaded = as_loaded(model)
    if device is not None:
        loaded = loaded.to(device)
    settings = settings if settings is not None else get_preset(preset)
    if steps is not None:
        settings = settings.with_steps(steps)
    if isinstance(targets, (str, Target)):
        targets = [targets]
    targets = [parse_target(t) for t in resolve_model_targets(loaded, targets)]
    if isinstance(references, Mapping) and any(is_text_spec(k) for k in references):
        references = {text_key(k) if is_text_spec(k) else k: v for k, v in references.items()}
    if not targets:
        raise ValueError("visualize: no targets given")
    if references is not None and not isinstance(references, Mapping):  # one source: the one target's
        if len(targets) != 1:
            raise ValueError(f"visualize: a single reference source is for one target, got {len(targets)} targets; "
                             f"pass references={{'{targets[0].key}': ..., ...}}, one source per target")
        references = {targets[0].key: references}
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        raise ValueError(f"visualize: duplicate targets in {keys}")
    if objective is not None:
        recipe = custom_recipe(objective, settings, param)
    else:
        recipe = build_recipe(method, settings, param=param, options=options, class_layers=class_layers, cache=cache)
    check_targets(loaded, targets)
    final = check_size(size, loaded.input_size)
    stage_sizes = [max(16, int(round(s * final))) for s, _ in settings.stages]
    spectral = any(not p.per_stage for p in recipe.parametrizations())
    for s in sorted(set(stage_sizes + ([final] if spectral else []))):
        check_resolution(loaded, s)
    required = recipe.objective.needs_references or any(p.needs_references for p in recipe.parametrizations())
    references = _mined(loaded, targets, references, pool, settings, final, cache)
    ref_sets = _reference_sets(targets, references, required)
    by_key = {t.key: r for t, r in zip(targets, ref_sets)}
    engine = Engine(loaded, recipe, seed, final, refs_for=lambda t: (by_key[t.key], {}))
    engine.setup(targets)
    layer_plan = [engine.plan(t) for t in targets]
    slots = engine.run(targets, progress)
    images = torch.stack([engine.image(sl) for sl in slots])
    transparency = torch.stack([engine.transparency(sl) for sl in slots])
    losses = torch.tensor([sl.losses for sl in slots], dtype=torch.float32)
    timings = engine.timings(t_start)
    return VisualizationResult(targets, images, transparency, losses, recipe.settings, [sl.seed for sl in slots],
                               ref_sets, layer_plan, timings, loaded.name, loaded.fingerprint, recipe.method,
                               _describe(recipe, targets), engine.precision, dict(engine.loss_scale),
                               annotations=annotate(loaded, targets, images, ref_sets))


def _describe(recipe: Recipe, targets: Sequence[Target]) -> dict:
    """The parametrization that ran: one description, or one per target kind when they differ."""
    per = {k: recipe.kind_param.get(k, recipe.param).describe() for k in sorted({t.kind for t in targets})}
    first = next(iter(per.values()))
    return first if all(d == first for d in per.values()) else {"per_kind": per}


def custom_recipe(objective: Objective, settings: Settings, param=None) -> Recipe:
    """A recipe for a caller's own objective: ``param`` (default pixels with the settings' init),
    VITAL's views and Adam with the settings' lr, betas, warm-up and cosine schedule."""
    objective = get_objective(objective, settings)
    p = Pixel(settings.init_std) if param is None else get_parametrization(param)
    views = RollViews(settings.jitter, settings.flip, settings.scale, settings.rotate)
    lr = settings.lr if p.lr is None else p.lr
    return Recipe(p, objective, views, settings, optimizer="adam", lr=lr, betas=tuple(settings.betas),
                  schedule="cosine", warmup=settings.warmup, method=f"custom:{objective.name}")


def _mined(loaded, targets: Sequence[Target], references, pool, settings: Settings, size: int, cache) -> dict:
    """``references`` with the missing channel targets' references mined from ``pool``."""
    import os

    refs = dict(references or {})
    for t in targets:
        src = refs.get(t.key, refs.get(t))  # type: ignore[arg-type]
        if t.is_unit and isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
            raise ValueError(f"visualize: {t.key} was given the folder {src} as references; a channel's references "
                             f"are its top-k images mined from a pool: pass pool={str(src)!r} (or load_images(...) of "
                             f"the files to use them as they are)")
    if pool is None or not any(t.is_unit and refs.get(t.key, refs.get(t)) is None for t in targets):  # type: ignore
        return refs
    from vital_fast.references.gather import gather_references
    from vital_fast.references.pool import as_pool

    return gather_references(loaded, targets, given=refs, pool=as_pool(pool, what="visualize: pool"),
                             n_refs=settings.n_refs, mode=settings.channel_refs, size=size, cache=cache,
                             check_pool=False)


def _reference_sets(targets: Sequence[Target], references, required: bool) -> List[ImageSet]:
    """Each target's reference images, checked up front (needed by VITAL and MACO; optional otherwise)."""
    refs_in = dict(references or {})
    out: List[ImageSet] = []
    for t in targets:
        src = refs_in.get(t.key, refs_in.get(t))  # type: ignore[arg-type]
        if src is None:
            if required:
                raise ValueError(f"visualize: no reference images for target {t.key}; "
                                 f"pass references={{'{t.key}': ...}}"
                                 + (" or pool=... (candidate images its top-k are mined from)" if t.is_unit else ""))
            out.append(ImageSet())
            continue
        s = src if isinstance(src, ImageSet) else load_images(src, what=f"references of {t.key}")
        if len(s) == 0 and required:
            raise ValueError(f"visualize: the reference set of {t.key} is empty")
        out.append(s)
    return out
