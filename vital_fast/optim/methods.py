"""Methods: named recipes of a parametrization, an objective, views and an optimizer.

The registry (:data:`METHODS`) is what ``visualize(method=...)`` and the CLI's ``--method`` read;
:func:`register_method` adds a user's own. Each method has its usual options
(:func:`method_options`), overridable with ``visualize(..., options={...})``, and its own
parametrization, replaceable with ``param=`` (``--param``). :mod:`vital_fast.evaluate.baselines`
documents the baselines and where their settings come from.

``vital``     pixels, :class:`~vital_fast.optim.objectives.SortMatch` plus the settings' image priors,
              VITAL's roll/flip/zoom/rotation views, Adam with the settings' lr, betas and warm-up
              then cosine.
``actmax``    pixels (init N(0, 0.01²)), minus the target's activation plus TV-L2 and L2 priors, the
              same views, Adam lr 0.05, warm-up then cosine.
``fourier``   Lucid's spectrum, minus the activation, Lucid's views, Adam lr 0.05, constant.
``maco``      MACO's phase over the references' magnitude, minus the activation, MACO's crops and
              noise, NAdam lr 1.0, constant.
``bnstats``   DeepInversion: pixels (randn), cross-entropy of the class (a channel: minus its
              activation) plus BatchNorm statistics and DeepInversion's priors, roll/flip views,
              Adam lr 0.25 betas (0.5, 0.9), warm-up then cosine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from vital_fast.optim.engine import Recipe
from vital_fast.optim.objectives import L2, ActMax, BNStats, DeepInversionPriors, ImagePriors, Objective, TotalVariation
from vital_fast.optim.matching import SortMatch
from vital_fast.optim.parametrizations import Fourier, Maco, Parametrization, Pixel, get_parametrization
from vital_fast.optim.presets import Settings
from vital_fast.optim.transforms import LucidViews, MacoViews, RollViews

__all__ = ["BaselineSettings", "METHODS", "Method", "OBJECTIVES", "build_recipe", "get_objective", "method_options",
           "register_method", "settings_with_param"]

# Objectives by name (``visualize(objective="actmax")``): factories of the run's settings.
OBJECTIVES: Dict[str, Callable[[Settings], Objective]] = {
    "sort_match": lambda s: SortMatch(s),
    "actmax": lambda s: ActMax(),
    "bnstats": lambda s: BNStats(),
    "priors": lambda s: ImagePriors(s.tv_l1, s.tv_l2, s.l2),
    "tv_l1": lambda s: TotalVariation(1),
    "tv_l2": lambda s: TotalVariation(2),
    "l2": lambda s: L2(),
}


def get_objective(objective: Any, settings: Settings) -> Objective:
    """An :class:`~vital_fast.optim.objectives.Objective` itself, or one by name (:data:`OBJECTIVES`).

    Raises
    ------
    ValueError
        An unknown name (the valid ones listed) or anything else.
    """
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)} "
                             f"(or an Objective, e.g. ActMax() + 0.1 * L2())")
        return OBJECTIVES[objective](settings)
    raise ValueError(f"objective must be an Objective (vital_fast.optim.objectives) or one of "
                     f"{', '.join(OBJECTIVES)}, got {type(objective).__name__}")


@dataclass
class BaselineSettings(Settings):
    """:class:`~vital_fast.optim.Settings` plus the method and its options, recorded in the manifest.

    The stages, warm-up and transforms (jitter, flip, zoom, rotation) come from the preset; ``lr``
    and ``betas`` are the method's, copied here from ``baseline`` (all of the method's options) so
    that the recorded settings say what ran.
    """

    method: str = "actmax"
    baseline: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A named recipe: ``build(settings, options, param, context) -> Recipe``.

    ``options``: the method's settings and their defaults (:func:`method_options`); ``param``: its
    own parametrization's name; ``context`` carries what ``visualize`` was given (``class_layers``,
    ``cache``).
    """

    name: str
    build: Callable[..., Recipe]
    options: Dict[str, Any] = field(default_factory=dict)
    param: str = "pixel"
    description: str = ""
    # the method's image parametrization is a setting (Settings.param): a parametrization asked for by name is
    # written there (settings_with_param), so that the recorded settings say what ran
    settings_param: bool = False


METHODS: Dict[str, Method] = {}


def register_method(name: str, build: Callable[..., Recipe], *, options: Optional[Dict[str, Any]] = None,
                    param: str = "pixel", description: str = "", settings_param: bool = False) -> Method:
    """Register a recipe under ``name`` (``visualize(method=name)``, CLI ``--method name``).

    ``build(settings, options, param, context)`` returns a :class:`~vital_fast.optim.engine.Recipe`;
    ``param`` is the :class:`~vital_fast.optim.parametrizations.Parametrization` to use (the
    method's own unless the caller chose another). ``settings_param``: the method reads its parametrization from
    ``Settings.param`` (VITAL), where a parametrization asked for by name goes (:func:`settings_with_param`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    m = Method(name, build, dict(options or {}), param, description, bool(settings_param))
    METHODS[name] = m
    return m


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def method_options(method: str, **overrides: Any) -> Dict[str, Any]:
    """The options a method runs with: its defaults, updated with ``overrides``.

    Raises
    ------
    ValueError
        An unknown method or option (the message lists the valid ones).
    """
    m = get_method(method)
    opts = dict(m.options)
    unknown = set(overrides) - set(opts)
    if unknown:
        raise ValueError(f"unknown {method} options {sorted(unknown)}; valid: {sorted(opts)}")
    opts.update(overrides)
    return opts


def settings_with_param(method: str, settings: Settings, param: Any) -> Settings:
    """The settings a run of ``method`` records when asked for parametrization ``param``: for a method whose
    parametrization is a setting (``settings_param``, VITAL), ``Settings.param`` set to a name given
    (``visualize(param="fourier")``, ``--param fourier``), so that ``Settings.param`` is the one home of VITAL's
    parametrization and two runs on different images never record the same settings; otherwise as they are (a
    baseline's parametrization is its method's, or the ``param`` its label records; an instance is the caller's)."""
    if isinstance(param, str) and get_method(method).settings_param:
        get_parametrization(param)  # an unknown name: the registry's message
        return settings.replace(param=param) if settings.param != param else settings
    return settings


def build_recipe(method: str, settings: Settings, *, param: Any = None, options: Optional[Dict[str, Any]] = None,
                 class_layers=None, cache=None) -> Recipe:
    """The recipe of ``method`` with ``settings``, its options overridden by ``options``, on
    parametrization ``param`` (a name, an instance, or None for the method's own). A name given to a method that
    reads ``Settings.param`` goes there (:func:`settings_with_param`). The step size and schedule follow the
    parametrization that runs: one that is not the method's own and has its usual step size (a spectral image)
    brings it, and a constant schedule."""
    m = get_method(method)
    opts = method_options(method, **dict(options or {}))
    own = param is None or param == m.param
    settings = settings_with_param(method, settings, param)
    folded = isinstance(param, str) and m.settings_param
    default = _default_param(m, settings, opts)
    p = default if own or folded else get_parametrization(param)
    recipe = m.build(settings, opts, p, {"class_layers": class_layers, "cache": cache,
                                         "explicit_param": param is not None and not folded})
    if recipe.param is not default and recipe.param.lr is not None:
        recipe.lr, recipe.schedule = recipe.param.lr, "constant" if not recipe.param.per_stage else recipe.schedule
    recipe.method = method if own else f"{method}+{recipe.param.name}"
    return recipe


def _default_param(m: Method, s: Settings, o: Dict[str, Any]) -> Parametrization:
    if m.param == "pixel":
        return Pixel(o.get("init_std", s.init_std))
    if m.param == "fourier":
        return Fourier(o.get("decay_power", 1.0), o.get("init_std", 0.01))
    if m.param == "maco":
        return Maco(s.ref_crops, s.n_refs)
    return get_parametrization(m.param)


def _roll(s: Settings, affine: bool = True) -> RollViews:
    return RollViews(s.jitter, s.flip, s.scale if affine else 0.0, s.rotate if affine else 0.0)


def _baseline_settings(s: Settings, method: str, o: Dict[str, Any]) -> BaselineSettings:
    rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()}
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(Settings)}
    fields.update(lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))))
    return BaselineSettings(**fields, method=method, baseline=rec)


def _weighted(*parts) -> Objective:
    """``Σ w · o`` over the parts with a non-zero weight (the first part always kept)."""
    out: Optional[Objective] = None
    for i, (w, o) in enumerate(parts):
        if i and not w:
            continue
        term = o if w == 1 else w * o
        out = term if out is None else out + term
    return out  # type: ignore[return-value]


def _vital(s: Settings, o, param, ctx) -> Recipe:
    obj: Objective = SortMatch(s, ctx.get("class_layers"), ctx.get("cache"))
    if s.channel_activation_weight:
        obj = obj + s.channel_activation_weight * ActMax(units_only=True, channel_norm=s.channel_activation_norm,
                                                         top=s.channel_activation_top, rfs=s.channel_activation_rfs)
    if s.class_logit_weight:
        obj = obj + s.class_logit_weight * ActMax(classes_only=True)
    if s.tv_l1 or s.tv_l2 or s.l2:
        obj = obj + ImagePriors(s.tv_l1, s.tv_l2, s.l2)
    kind_param: Dict[str, Parametrization] = {}
    if not ctx.get("explicit_param"):  # Settings.param: pixels, a Fourier image, or one per target kind
        if s.param == "auto":
            kind_param = {"class": Fourier()}
        elif s.param not in ("pixel", None):
            param = get_parametrization(s.param)
    return Recipe(param, obj, _roll(s), s, optimizer="adam", lr=s.lr, betas=tuple(s.betas), schedule="cosine",
                  warmup=s.warmup, method="vital", kind_param=kind_param)


def _actmax(s: Settings, o, param, ctx) -> Recipe:
    obj = _weighted((1, ActMax()), (o["tv_l1"], TotalVariation(1)), (o["tv_l2"], TotalVariation(2)), (o["l2"], L2()))
    return Recipe(param, obj, _roll(s, o["affine"]), _baseline_settings(s, "actmax", o), optimizer="adam",
                  lr=o["lr"], betas=tuple(o["betas"]), schedule=o["schedule"], warmup=s.warmup, method="actmax")


def _fourier(s: Settings, o, param, ctx) -> Recipe:
    return Recipe(param, ActMax(), LucidViews(o), _baseline_settings(s, "fourier", o), optimizer="adam",
                  lr=o["lr"], betas=(0.9, 0.999), schedule=o["schedule"], warmup=s.warmup, method="fourier")


def _maco(s: Settings, o, param, ctx) -> Recipe:
    return Recipe(param, ActMax(), MacoViews(o), _baseline_settings(s, "maco", o), optimizer="nadam",
                  lr=o["lr"], betas=(0.9, 0.999), schedule=o["schedule"], warmup=s.warmup, method="maco")


def _bnstats(s: Settings, o, param, ctx) -> Recipe:
    if o["bn_stats"] not in ("element", "batch"):
        raise ValueError(f"bnstats option bn_stats must be 'element' or 'batch', got {o['bn_stats']!r}")
    bn = BNStats(o["first_bn_multiplier"], o["bn_stats"] == "batch", weight=o["r_feature"])
    obj = _weighted((o["main"], ActMax(class_loss="ce")), (o["r_feature"], bn),
                    (o["tv_l2"], DeepInversionPriors("tv")), (o["l2"], DeepInversionPriors("norm")))
    return Recipe(param, obj, _roll(s, o["affine"]), _baseline_settings(s, "bnstats", o), optimizer="adam",
                  lr=o["lr"], betas=tuple(o["betas"]), schedule=o["schedule"], warmup=s.warmup, method="bnstats")


register_method("vital", _vital, options={}, param="pixel", settings_param=True,
                description="VITAL: sort-matching of feature distributions to references (relevance-weighted for channels)")
register_method("actmax", _actmax, param="pixel", description="activation maximization in pixel space",
                options=dict(lr=0.05, betas=(0.9, 0.999), schedule="cosine", init_std=0.01, tv_l1=0.0, tv_l2=10.0,
                             l2=0.05, affine=True))
register_method("fourier", _fourier, param="fourier", description="Lucid: 1/f Fourier image, decorrelated colour",
                options=dict(lr=0.05, schedule="constant", decay_power=1.0, init_std=0.01, pad=12, jitter_a=8,
                             jitter_b=4, scale=(0.9, 1.1), rotate=10))
register_method("maco", _maco, param="maco", description="MACO: optimized phase, magnitude from the references",
                options=dict(lr=1.0, schedule="constant", box_start=1.0, box_end=0.6, box_std=0.05, center_std=0.15,
                             noise=0.08, crops=1))
register_method("bnstats", _bnstats, param="pixel", description="DeepInversion: BatchNorm statistics",
                options=dict(lr=0.25, betas=(0.5, 0.9), schedule="cosine", init_std=1.0, main=1.0, r_feature=0.01,
                             first_bn_multiplier=10.0, bn_stats="element", tv_l2=1e-4, l2=1e-5, affine=False))
