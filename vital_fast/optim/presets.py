"""Settings of a visualization run, and the named presets."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from vital_fast.runfolder import SETTING_DEFAULTS

# Allowed values and lower bounds of the fields, declared once: Settings checks them at construction, the CLI's
# --set and --config read them (vital_fast.cli.settings_args). ``compile`` (any dynamo backend) and ``param`` (the
# parametrization registry, or "auto") are checked against what is registered.
CHOICES = {
    "channel_refs": ("image", "patch"),
    "channel_prototype": ("mean", "pooled"),
    "lrp_composite": ("paper", "epsilon_plus", "epsilon_plus_flat"),
    "amp": ("off", "bf16", "fp16", "auto"),
    "channels_last": ("auto", "on", "off"),
    "fold_batchnorm": ("auto", "off"),
    "rules_dtype": ("auto", "float32"),
}
MINIMUM = {
    "warmup": 0, "jitter": 0.0, "scale": 0.0, "rotate": 0.0, "init_std": 0.0, "tv_l1": 0.0, "tv_l2": 0.0,
    "l2": 0.0, "quantiles": 2, "n_refs": 1, "ref_crops": 0, "lrp_every": 1, "channel_stem_weight": 0.0,
    "channel_target_weight": 0.0, "channel_activation_weight": 0.0, "channel_later_weight": 0.0, "class_logit_weight": 0.0,
    "channel_activation_norm": 0, "channel_activation_rfs": 0.0, "channel_later_layers": 0, "channel_later_stages": 0,
    "channel_later_every": 1,
    "loss_every": 1,
    "resample_cache_mb": 0,
}


def type_name(tp) -> str:
    """A field type as the messages write it (``int``, ``list of [float, int]``)."""
    if tp in (int, float, bool, str):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, List):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (tuple, Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def has_type(value: Any, tp) -> bool:
    """``value`` is of field type ``tp`` (an int stands for a float; a bool is no number; lists and tuples
    alike for sequences)."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin in (tuple, Tuple) and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(has_type(v, a) for v, a in zip(value, args))
        return not args or all(has_type(v, args[0]) for v in value)
    return True


def check_setting(name: str, value: Any) -> None:
    """Raise ValueError naming the setting and what it allows when ``value`` is not a valid value of it (its
    type already checked)."""
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"setting {name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    if name == "compile":
        from vital_fast.models.compiled import resolve_compile

        resolve_compile(value)
    if name == "param" and value != "auto":  # a registry (register_parametrization): its own message lists it
        from vital_fast.optim.parametrizations import PARAMETRIZATIONS, get_parametrization

        if value not in PARAMETRIZATIONS:
            get_parametrization(value)
    if name in MINIMUM and value < MINIMUM[name]:
        raise ValueError(f"setting {name} must be >= {MINIMUM[name]}, got {value!r}")
    if name == "channel_activation_top" and not 0 < value <= 1:
        raise ValueError(f"setting channel_activation_top must be in (0, 1], got {value!r}")
    if name == "lr" and not value > 0:
        raise ValueError(f"setting lr must be > 0, got {value!r}")
    if name == "betas" and not all(0 <= b < 1 for b in value):
        raise ValueError(f"setting betas must be two numbers in [0, 1), got {list(value)}")
    if name == "stages":
        if not value:
            raise ValueError("setting stages must hold at least one [scale, steps] pair")
        if any(not sc > 0 or n < 0 for sc, n in value) or sum(n for _, n in value) < 1:
            raise ValueError(f"setting stages needs scales > 0 and steps >= 0 (at least 1 in all), "
                             f"got {[list(s) for s in value]}")


@dataclass
class Settings:
    """Every knob of the optimizer; recorded in full with each result.

    ``stages`` is the multi-resolution schedule: ``(scale, steps)`` pairs, scale relative to the
    model's input size (e.g. ``[(0.5, 100), (1.0, 100)]``). References are recomputed at each
    resolution and the image is upsampled between stages.
    """

    stages: List[Tuple[float, int]] = field(default_factory=lambda: [(1.0, 2000)])
    lr: float = 1.0
    betas: Tuple[float, float] = (0.5, 0.9)
    warmup: int = 100                 # linear warm-up steps (per stage), then cosine to 0
    jitter: float = 30 / 224          # max circular roll, as a fraction of the side (paper: 30 px at 224)
    flip: bool = False                # random horizontal flip per step
    scale: float = 0.0                # random zoom in [1 - scale, 1 + scale] per step (0: off, the paper)
    rotate: float = 0.0               # random rotation in [-rotate, rotate] degrees per step (0: off)
    init_std: float = 1.0             # randn init in the model's normalized space (the paper's)
    tv_l1: float = 0.0                # total variation, L1 form (mean over the four neighbour differences)
    tv_l2: float = 0.0                # total variation, L2 form
    l2: float = 0.0                   # mean squared pixel value (normalized space)
    quantiles: int = 256              # Q: quantiles stored per channel in a prototype
    n_refs: int = 50                  # reference images per target (class: first n; channel: top-k)
    ref_crops: int = 0                # random resized crops per reference image (0: one center crop)
    lrp_every: int = 1                # relevance of the synthetic image every k steps (channel targets)
    lrp_composite: str = "paper"
    class_relevance: bool = False     # weight class targets by relevance from the logit (off: the paper)
    # "patch" (crops at the unit, the paper's text) or "image" (full images, the paper's code). Patches
    # measure better: the target channel reaches 0.81 of its mean top-k activation against 0.77 with
    # full images (4 channels of lite0 _blocks.10, `python -m benchmarks.bench_quality --only channel`).
    channel_refs: str = "patch"
    channel_stem_weight: float = 0.1  # weight of the first matched layer for channel targets (paper: 0.1)
    # weight of the target's own layer in a unit target's loss (its relevance there is the unit's own
    # activation map, so only the target channel is matched); 0: only the matched layers before it
    channel_target_weight: float = 0.0
    # weight of an activation term for unit targets: minus the unit's mean activation on the image, added to the
    # matching loss (0: none, the paper; class targets never get it). Unlike channel_target_weight, which matches
    # the unit's distribution to its references' and so holds its activation near theirs, this pushes it up
    channel_activation_weight: float = 0.0
    # 0: that weight applies as it is; N > 0: it is scaled by N / C, C the channel count of the unit's layer. The
    # matching loss averages its rows over the C channels of a layer while the activation term reads one unit, so
    # at a fixed weight the term grows with the layer's width: on lite0 the unit's activation reached 0.53x, 1.7x
    # and 3.5x its references' at the 24-, 80- and 192-channel _blocks.2, _blocks.7 and _blocks.14
    channel_activation_norm: int = 0
    # the share of a channel target's positions that term averages, its strongest ones (1.0: every position, the
    # mean; 0.1: the top tenth), so that it can push a few places of the image and leave the rest to the matching
    channel_activation_top: float = 1.0
    # > 0: that share is instead what this many of the unit's receptive fields cover of the image (min(1, n * (rf /
    # side)^2)): about one patch's worth of positions at an early layer, every position (the mean) at a late one
    channel_activation_rfs: float = 0.0
    # weight of the matched layers after a unit target's own layer (the class targets' layers that run later), matched
    # against the unit's top-k references too (0: none, the paper: only the layers up to the unit's)
    channel_later_weight: float = 0.0
    # how many of those later layers (the first N after the unit; 0: all): the step's forward and backward run only
    # as far as the last layer matched, so fewer later layers make an early unit's step cheaper
    channel_later_layers: int = 0
    # in how many of the schedule's first stages those later layers are matched (0: every stage); 1 with the fast
    # preset's half-resolution first stage matches them only at the cheap, low-resolution steps
    channel_later_stages: int = 0
    # match those later layers at every N-th step of a stage only (1: every step), at N times their weight, so that
    # their time-averaged pull stays the same; the other steps run forward and backward only as far as the unit's
    # own layer (or the last layer before it that is matched), as lrp_every does for relevance
    channel_later_every: int = 1
    # what a unit's references are matched as, per channel: "mean" (the mean of their sorted rows, the Wasserstein
    # barycenter of the K distributions: DESIGN.md §1, the paper) or "pooled" (the quantiles of all K references'
    # values together: the distribution of an image made of pieces of each, rather than of their average)
    channel_prototype: str = "mean"
    # weight of a logit term for class targets: minus the class logit, added to the matching loss (0: none, the
    # paper; unit targets never get it)
    class_logit_weight: float = 0.0
    # weight a unit target's features by their LRP relevance to the unit (the paper); off: plain sort matching
    # of the matched layers against the unit's top-k references, as for class targets
    channel_relevance: bool = True
    # mixed precision of the network's forward and backward: "off" (float32), "bf16", "fp16" or "auto"
    # (bfloat16 on GPUs and on CPUs with AMX, float32 elsewhere); see vital_fast.optim.precision
    amp: str = "off"
    # the network's forward under torch.compile: "off" (eager), "on" (the default backend, inductor) or the
    # name of a torch dynamo backend ("aot_eager", "eager": debug backends); see vital_fast.models.compiled
    compile: str = "off"
    # the network's memory layout: "auto" (channels-last for the convolutional families vital_fast knows, on
    # CPU and CUDA: the same values, faster convolutions), "on" (any model) or "off" (as the model comes);
    # see vital_fast.models.layout
    channels_last: str = "auto"
    # the step's eager forward with each eval-mode batch norm folded into the convolution before it: "auto" (where
    # the network has such pairs, found and checked on the first step's input) or "off"; the same values up to
    # rounding, one elementwise pass less per batch norm each way; see vital_fast.models.folding
    fold_batchnorm: str = "auto"
    # VITAL's image parametrization: "pixel" (the paper's), "fourier" (the fast preset's), "maco", or "auto"
    # (per target kind: Fourier for class targets, pixels for channels); see vital_fast.optim.methods
    param: str = "pixel"
    # steps between two reads of the loss record from the device (progress, early stopping and the record's
    # completeness follow it; images do not): a GPU step never waits for the device in between
    loss_every: int = 10
    # how the step computes channel relevance (the maps are the same either way; benchmarks compare them):
    # from the step's own forward pass where it can serve (True), or by a second hooked forward (False)
    share_forward: bool = True
    # the dtype of the shared forward's LRP rules: "auto" (bfloat16 under bfloat16 autocast, else the forward's),
    # or "float32" (reading the bfloat16 forward; the casts then cost about as much as the rules)
    rules_dtype: str = "auto"
    # largest prototype tensor resampled to the features' row length and kept for the following steps (MiB;
    # 0: resample at every step)
    resample_cache_mb: int = 256

    def __post_init__(self) -> None:
        """Every field checked: its type, then its allowed values or range (``CHOICES``, ``MINIMUM`` and the
        rules of :func:`check_setting`), one ValueError naming the field and what it allows."""
        if isinstance(self.amp, str) and self.amp not in CHOICES["amp"]:  # its own message ("unknown amp ...")
            from vital_fast.optim.precision import resolve_amp

            resolve_amp(self.amp, "cpu")
        if self.channels_last not in ("auto", "on", "off"):  # the one message that lists the valid values
            from vital_fast.models.layout import resolve_channels_last

            resolve_channels_last(self.channels_last, "generic", "cpu")
        if self.compile not in ("off", "on"):  # an unknown backend: one line listing the valid ones, now
            from vital_fast.models.compiled import resolve_compile

            resolve_compile(self.compile)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not has_type(value, hints[f.name]):
                raise ValueError(f"setting {f.name} expects {type_name(hints[f.name])}, got {value!r}")
            check_setting(f.name, value)
        if self.channel_later_weight > 0 and self.channel_relevance:
            raise ValueError("setting channel_later_weight needs channel_relevance=False: relevance starts at a unit's "
                             "own layer, so the matched layers after it have none to weight their features by")

    @property
    def steps(self) -> int:
        return sum(s for _, s in self.stages)

    def to_dict(self) -> Dict[str, Any]:
        """Every field (``Settings(**d)`` gives the same settings back); run identities record it whole, under
        their version number (:data:`vital_fast.runfolder.IDENTITY_VERSION`)."""
        return dataclasses.asdict(self)

    def with_steps(self, steps: int) -> "Settings":
        """These settings with the stage schedule scaled to exactly ``steps`` steps in all: stages keep their share
        (a stage whose share rounds to nothing is dropped; the last, at the final resolution, always stays, so
        ``steps=1`` runs one step) and the warm-up is at most a tenth of the steps."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        total = self.steps
        counts = [int(n * steps // total) for _, n in self.stages]
        counts[-1] = max(counts[-1], 1)
        i = len(counts) - 1
        while sum(counts) < steps:  # the remainder goes to the latest stages first
            counts[i] += 1
            i = i - 1 if i > 0 else len(counts) - 1
        while sum(counts) > steps:  # only when the last stage was raised to 1
            j = max(k for k in range(len(counts) - 1) if counts[k] > 0)
            counts[j] -= 1
        stages = [(sc, n) for (sc, _), n in zip(self.stages, counts) if n > 0]
        return self.replace(stages=stages, warmup=min(self.warmup, max(1, steps // 10)))

    def replace(self, **kw: Any) -> "Settings":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; valid: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **kw)


def _paper() -> Settings:
    # DESIGN.md §5: 2000 steps at full resolution, Adam lr 1.0 betas (0.5, 0.9), 100-step warm-up
    # then cosine, roll jitter up to 30 px, flip off, 50 references, relevance every step.
    return Settings(channel_refs="image")


def _fast() -> Settings:
    # A CPU-practical schedule: half resolution first (references recomputed there), then full;
    # a smaller learning rate suits the short schedule (DESIGN.md §6: lr 0.25 over 300 steps).
    # Flip, zoom and rotation make the image robust to small transforms, which is what lets an
    # independent judge model recognize it (efficientnet-lite2 top-1 on the demo classes over seeds
    # 0-2: 8 of 18 without them, 11 of 18 with them, at the same 150 steps; benchmarks/bench_quality.py).
    # Every target on a Fourier image: for class targets the judge benchmark's Frechet distance to the real
    # photographs fell from 109.0 to 81.2 and the judge's top-1 rose from 9 to 10 of 18 (seeds 0-2,
    # `python -m benchmarks.bench_methods --methods vital+pixel vital+fourier --seeds 0 1 2`).
    # Unit targets (channels, directions, neurons): plain sort matching of the matched layers up to and
    # including the unit's own layer against its top-k patches, without relevance weighting. On the channel
    # benchmark (`python -m benchmarks.bench_channels`, 16 channels each of lite0 _blocks.4 and _blocks.10,
    # seed 0) the model-observer 2-AFC went from 48 % and 65 % (pixels, relevance, layers before the unit)
    # to 80 % and 93 %; on pixels, short schedules leave the initial noise, and at this budget relevance
    # weighting measured worse than none (README, "Channel quality").
    # Then (issue 26), on the benchmark with top-k patches from distinct photographs, those images were barely
    # specific to their channel (59 % and 73 % of pairs). Two terms fixed it (seed 0, 16 channels of _blocks.4 and
    # _blocks.10, 2-AFC / specificity / own-over-strongest-other): an activation term on the unit
    # (channel_activation_weight 2) for specificity, and the matched layers after the unit at weight 0.3
    # (channel_later_weight) for recognizability: 75 % / 55 % / 0.76 and 84 % / 78 % / 0.85 before,
    # 88 % / 98 % / 1.31 and 86 % / 100 % / 1.78 after (docs/methods.md, "Channel quality"). On the held-out layers
    # (32 channels of _blocks.2, _blocks.7, _blocks.14, 46 photographs) that fixed weight pushed the 192-channel late
    # layer's units to 3.5x their references' activation and its 2-AFC fell to 81 %: the term is now scaled by 80 / C
    # (channel_activation_norm) at weight 1.2, which gave 68/91/95 % 2-AFC with 90/100/100 % specificity (seed 0).
    # The later layers are matched at every third step, at three times their weight (channel_later_every): over
    # three seeds the quality of every second step (lite0 68/90/96 % 2-AFC, lite1 83/93/96 %; 68/91/95 % and
    # 84/92/97 % at every second step), and a cheaper early step (docs/methods.md, "The early layer, once more").
    # The activation term reads the unit's strongest positions that one receptive field covers, scaled by the root of
    # their share (channel_activation_rfs): the early units' specificity went from 91 and 98 % of pairs at 1.01 and
    # 1.14 own over strongest other to 100 % at 1.73 and 1.72 (lite0 _blocks.2, lite1 _blocks.3, three seeds), 2-AFC
    # 67 -> 71 % and 83 -> 85 %; a unit that sees the whole image reads the mean as before (docs/methods.md, "The
    # activation term over one receptive field").
    # With that term holding specificity, pooled prototypes (channel_prototype) and the later layers at weight 3.0
    # (channel_later_weight) buy likeness back: over three seeds 2-AFC 74 % and 86 % at the early layers (lite0
    # _blocks.2, lite1 _blocks.3; 71 and 85 % before) and 93 % at lite0 _blocks.7 (89 %), specificity 99-100 %
    # (docs/methods.md, "Pooled references and the later layers at 3.0").
    # Class targets: a logit term (class_logit_weight) lifts the judge's top-1 where it does not recognize the
    # reference photographs VITAL reproduces (docs/methods.md, "Evaluation against baselines").
    # Mixed precision where it is faster at equal quality: amp="auto" is bfloat16 on GPUs and float32 on CPUs,
    # AMX ones included, where the demo's lite0 ran no faster end to end in bfloat16 and its own top-1 on the
    # images fell (vital_fast.optim.precision; README, "Mixed precision and memory layout"); the manifest's
    # `precision` says which ran.
    return Settings(
        stages=[(0.5, 60), (1.0, 90)], lr=0.2, warmup=10, init_std=0.5, n_refs=8, ref_crops=16,
        quantiles=128, lrp_every=1, tv_l2=0.0, l2=0.0, flip=True, scale=0.1, rotate=5.0, param="fourier",
        channel_relevance=False, channel_target_weight=1.0, channel_activation_weight=1.2, channel_activation_norm=80,
        channel_activation_rfs=1.0, channel_prototype="pooled", channel_later_weight=3.0, channel_later_every=3,
        class_logit_weight=0.1, amp="auto",
    )


SETTING_DEFAULTS.update({f.name: f.default for f in dataclasses.fields(Settings)
                         if f.default is not dataclasses.MISSING})


PRESETS = {"paper": _paper, "fast": _fast}


def get_preset(name: str) -> Settings:
    """The settings of a named preset (``paper`` or ``fast``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
