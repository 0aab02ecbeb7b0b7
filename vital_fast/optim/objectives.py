"""Objectives: per-element losses that compose (``a + 0.1 * b``, ``a - b``, ``-a``, ``a / 2``).

An :class:`Objective` maps one engine step (a :class:`StepContext`: the batch's images, the views the
model saw, its features and logits) to one loss per batch element, shape ``(B,)``; the engine sums
them and steps each element's own optimizer, so elements stay independent. Objectives are
minimized.

=========================  ==========================================================================
:class:`SortMatch`         (:mod:`vital_fast.optim.matching`) VITAL: the sort-matching loss against each target's reference prototypes at
                           every matched layer; relevance-weighted (LRP of the synthetic image) for
                           channel targets, and for class targets with ``class_relevance``
:class:`ActMax`            minus the activation of each element's target (its class logit, or its
                           channel's mean activation), or of one fixed unit (``ActMax("channel:l:3")``);
                           ``class_loss="ce"`` uses the cross-entropy of the class instead
:class:`BNStats`           DeepInversion's BatchNorm-statistics distance of every BatchNorm input
:class:`ImagePriors`       total variation (L1, L2 forms) and an L2 penalty of the image
:class:`DeepInversionPriors` DeepInversion's TV (sum of L2 norms) or the image norm, of the view
:func:`objective`          any function ``f(ctx) -> (B,)`` as an objective
=========================  ==========================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vital_fast.optim.regularizers import image_priors, l2_penalty, total_variation
from vital_fast.optim.targets import Target, parse_target

__all__ = ["ActMax", "BNStats", "DeepInversionPriors", "ImagePriors", "L2", "Objective", "StepContext",
           "TotalVariation", "objective"]


@dataclass
class StepContext:
    """What an objective sees at one step of a batch of slots.

    ``image`` is the batch rendered by the parametrization at the step's resolution (the model's
    normalized space for pixels, [0, 1] for spectral parametrizations); ``view`` the transformed
    images in the model's normalized space, ``repeat`` rows per element (element-major), which the
    model ran on; ``features`` the tapped layers' outputs of ``view``; ``logits`` the model's output
    when some objective asked for it.
    """

    engine: Any
    slots: Sequence[Any]
    image: torch.Tensor
    view: torch.Tensor
    repeat: int = 1
    features: Dict[str, torch.Tensor] = field(default_factory=dict)
    logits: Optional[torch.Tensor] = None
    size: int = 0

    @property
    def targets(self) -> List[Target]:
        return [sl.target for sl in self.slots]

    @property
    def batch(self) -> int:
        return len(self.slots)


class Objective:
    """A per-element loss. Subclasses override :meth:`__call__` and say what they need.

    ``needs_references``: every target must come with reference images. :meth:`layers` names the
    layers whose outputs the step must tap; :meth:`needs_logits` whether it must run the whole
    network; :meth:`hooks` may give a context manager entered around the forward pass (and
    :meth:`forward_pass` one that shares the eager pass, with layers of its own);
    :meth:`setup` validates before any step; :meth:`enter_stage` prepares a slot for a stage;
    :meth:`plan` gives the (layer, weight) pairs recorded with a target's result.
    """

    name = "objective"
    needs_references = False

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def layers(self, slots: Sequence[Any]) -> List[str]:
        return []

    def needs_logits(self, slots: Sequence[Any]) -> bool:
        return False

    def hooks(self, model: nn.Module):
        return None

    def forward_pass(self, engine, slots: Sequence[Any]):
        """A context manager the engine enters around this step's (eager) forward pass, before its taps,
        with ``layers``: more layers the pass must reach (SortMatch's relevance shares the pass this way);
        None: nothing."""
        return None

    def setup(self, engine, targets: Sequence[Target]) -> None:
        pass

    def enter_stage(self, engine, slot) -> None:
        pass

    def plan(self, engine, target: Target) -> List[Tuple[str, float]]:
        return []

    def parts(self) -> List[Tuple[float, "Objective"]]:
        return [(1.0, self)]

    # --- composition -------------------------------------------------------------------------

    def __add__(self, other: "Objective") -> "Objective":
        return Sum(self.parts() + _as_objective(other).parts())

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([a, b, c]) starts from 0
            return self
        return _as_objective(other) + self

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-1.0) * _as_objective(other)

    def __neg__(self) -> "Objective":
        return (-1.0) * self

    def __mul__(self, k: float) -> "Objective":
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            raise TypeError(f"an objective scales by a number, not {type(k).__name__}")
        return Sum([(float(k) * c, o) for c, o in self.parts()])

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> "Objective":
        return self * (1.0 / float(k))

    def __repr__(self) -> str:
        return self.name


def _as_objective(o: Any) -> Objective:
    if isinstance(o, Objective):
        return o
    raise TypeError(f"objectives compose with objectives, not {type(o).__name__}")


def check_per_element(v: Any, B: int, what: str) -> torch.Tensor:
    """``v`` must be a tensor of shape ``(B,)``: one loss per batch element."""
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != B:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"objective {what} returned shape {shape}; an objective must return one value per batch "
                         f"element, shape ({B},)")
    return v


class Sum(Objective):
    """``Σ c_i · o_i``, evaluated left to right (a weight of 1 multiplies nothing)."""

    def __init__(self, parts: Sequence[Tuple[float, Objective]]) -> None:
        self._parts = [(float(c), o) for c, o in parts]
        self.needs_references = any(o.needs_references for _, o in self._parts)
        self.name = " + ".join(o.name if c == 1 else f"{c:g} * {o.name}" for c, o in self._parts)

    def parts(self):
        return list(self._parts)

    def __call__(self, ctx):
        out = None
        for c, o in self._parts:
            v = check_per_element(o(ctx), ctx.batch, o.name)
            v = v if c == 1.0 else c * v
            out = v if out is None else out + v
        return out

    def layers(self, slots):
        return sorted({l for _, o in self._parts for l in o.layers(slots)})

    def needs_logits(self, slots):
        return any(o.needs_logits(slots) for _, o in self._parts)

    def hooks(self, model):
        hs = [h for h in (o.hooks(model) for _, o in self._parts) if h is not None]
        return hs[0] if len(hs) == 1 else (_all_of(hs) if hs else None)

    def forward_pass(self, engine, slots):
        for _, o in self._parts:  # the first part that asks; the others take their own way this step
            fp = o.forward_pass(engine, slots)
            if fp is not None:
                return fp
        return None

    def setup(self, engine, targets):
        for _, o in self._parts:
            o.setup(engine, targets)

    def enter_stage(self, engine, slot):
        for _, o in self._parts:
            o.enter_stage(engine, slot)

    def plan(self, engine, target):
        out: List[Tuple[str, float]] = []
        for _, o in self._parts:
            out += [p for p in o.plan(engine, target) if p not in out]
        return out


@contextlib.contextmanager
def _all_of(contexts):
    """Enter every context manager of ``contexts``, exit them in reverse order."""
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


class _FnObjective(Objective):
    def __init__(self, fn: Callable[[StepContext], torch.Tensor], name: str, layers: Sequence[str],
                 logits: bool) -> None:
        self.fn, self.name, self._layers, self._logits = fn, name, list(layers), bool(logits)

    def __call__(self, ctx):
        return self.fn(ctx)

    def layers(self, slots):
        return list(self._layers)

    def needs_logits(self, slots):
        return self._logits


def objective(fn: Optional[Callable[[StepContext], torch.Tensor]] = None, *, layers: Sequence[str] = (),
              logits: bool = False, name: Optional[str] = None):
    """Make ``fn(ctx) -> (B,)`` an :class:`Objective` (usable as a decorator).

    ``layers``: layers whose outputs ``ctx.features`` must hold; ``logits``: ``ctx.logits`` needed.

    Example
    -------
    >>> from vital_fast.optim.objectives import objective
    >>> @objective(layers=["layer3"])
    ... def mean_layer3(ctx):
    ...     return -ctx.features["layer3"].flatten(1).mean(1)
    >>> (mean_layer3 + 0.1 * mean_layer3).name
    'mean_layer3 + 0.1 * mean_layer3'
    """
    def wrap(f):
        return _FnObjective(f, name or getattr(f, "__name__", "objective"), layers, logits)

    return wrap(fn) if fn is not None else wrap


# --- image priors ---------------------------------------------------------------------------------

class ImagePriors(Objective):
    """``tv_l1 · TV₁(image) + tv_l2 · TV₂(image) + l2 · mean(image²)`` (:mod:`vital_fast.optim.regularizers`)."""

    name = "priors"

    def __init__(self, tv_l1: float = 0.0, tv_l2: float = 0.0, l2: float = 0.0) -> None:
        self.tv_l1, self.tv_l2, self.l2 = float(tv_l1), float(tv_l2), float(l2)

    def __call__(self, ctx):
        return image_priors(ctx.image, self)


class TotalVariation(Objective):
    """Mean |neighbour difference|^p of the image (p = 1 or 2), per element."""

    def __init__(self, p: int = 2) -> None:
        self.p = int(p)
        self.name = f"tv_l{self.p}"

    def __call__(self, ctx):
        return total_variation(ctx.image, self.p)


class L2(Objective):
    """Mean squared value of the image, per element."""

    name = "l2"

    def __call__(self, ctx):
        return l2_penalty(ctx.image)


class DeepInversionPriors(Objective):
    """DeepInversion's priors of the view: ``"tv"`` (the sum of the L2 norms of the four neighbour
    differences) or ``"norm"`` (‖x‖₂)."""

    def __init__(self, kind: str) -> None:
        if kind not in ("tv", "norm"):
            raise ValueError(f"DeepInversionPriors kind must be 'tv' or 'norm', got {kind!r}")
        self.kind = kind
        self.name = f"deepinversion_{kind}"

    def __call__(self, ctx):
        x = ctx.view
        if self.kind == "norm":
            return x.flatten(1).norm(dim=1)
        d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
        d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
        d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
        d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
        return sum(d.flatten(1).norm(dim=1) for d in (d1, d2, d3, d4))


# --- activation maximization ----------------------------------------------------------------------

def last_linear(model: nn.Module) -> Optional[str]:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


class ActMax(Objective):
    """Minus the activation of each element's target: its class logit, or its channel's mean
    activation over space (tokens for ViT layers), averaged over the element's views; a direction's
    projection (plus bias) averaged over space; a neuron's activation at its location.

    ``unit``: one fixed unit for every element instead (``"class:3"``, ``"channel:layer3:5"``).
    ``class_loss="ce"``: class targets take the cross-entropy of their class (DeepInversion's).
    ``units_only``: class targets get nothing (0) from it: an activation term for unit targets alone, composed with
    another objective (``Settings.channel_activation_weight``). ``classes_only``: unit targets get nothing from it
    (``Settings.class_logit_weight``). ``channel_norm`` N > 0: a unit's activation is scaled by N / C, C the
    channel count of its layer, as a matching loss averages over a layer's channels
    (``Settings.channel_activation_norm``). ``top`` < 1: a channel's activation is the mean of its strongest
    ``top`` share of positions instead of all (``Settings.channel_activation_top``). ``rfs`` > 0 instead: that
    share is what ``rfs`` receptive fields of the unit cover of the image, ``min(1, rfs * (rf / side) ** 2)``, so
    a small unit's term reads about one patch's worth of positions and a unit that sees the whole image its mean;
    the term is then scaled by the square root of the share at the model's input size, which gives its gradient
    on the unit's map the L2 norm of the mean's (``Settings.channel_activation_rfs``).
    """

    def __init__(self, unit: Union[None, str, Target] = None, class_loss: str = "logit",
                 units_only: bool = False, classes_only: bool = False, channel_norm: int = 0,
                 top: float = 1.0, rfs: float = 0.0) -> None:
        if class_loss not in ("logit", "ce"):
            raise ValueError(f"ActMax class_loss must be 'logit' or 'ce', got {class_loss!r}")
        if units_only and classes_only:
            raise ValueError("ActMax: units_only and classes_only exclude each other")
        if isinstance(channel_norm, bool) or not isinstance(channel_norm, int) or channel_norm < 0:
            raise ValueError(f"ActMax channel_norm must be a whole number >= 0, got {channel_norm!r}")
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0 < top <= 1:
            raise ValueError(f"ActMax top must be a share of positions in (0, 1], got {top!r}")
        if isinstance(rfs, bool) or not isinstance(rfs, (int, float)) or not rfs >= 0:
            raise ValueError(f"ActMax rfs must be a number of receptive fields >= 0, got {rfs!r}")
        if rfs and top < 1:
            raise ValueError("ActMax: top and rfs each set the share of positions; give one of them (Settings: "
                             "channel_activation_top < 1 needs channel_activation_rfs=0)")
        self.rfs = float(rfs)
        self._rf: Dict[str, int] = {}
        self._scale: Dict[str, float] = {}
        self.channel_norm = channel_norm
        self.top = float(top)
        self.unit = parse_target(unit) if unit is not None else None
        self.class_loss = class_loss
        self.units_only = bool(units_only)
        self.classes_only = bool(classes_only)
        self.name = ("actmax" if self.unit is None else f"actmax({self.unit.key})") + (
            "[units]" if self.units_only else "[classes]" if self.classes_only else "")
        self._index: Dict[Any, Any] = {}

    def _targets(self, slots) -> List[Target]:
        return [self.unit] * len(slots) if self.unit is not None else [sl.target for sl in slots]

    def layers(self, slots):
        return [] if self.classes_only else sorted({t.layer for t in self._targets(slots) if t.is_unit})

    def needs_logits(self, slots):
        return not self.units_only and any(not t.is_unit for t in self._targets(slots))

    def setup(self, engine, targets):
        from vital_fast.models.facts import check_targets

        if self.unit is not None:
            check_targets(engine.loaded, [self.unit])
        if self.rfs and not self.classes_only:
            from vital_fast.references.mining import receptive_field

            size = engine.loaded.input_size
            for layer in {t.layer for t in self._targets_of(targets) if t.is_unit} - set(self._rf):
                self._rf[layer] = receptive_field(engine.loaded, layer, size)
                self._scale[layer] = self._share(layer, size) ** 0.5

    def _targets_of(self, targets: Sequence[Target]) -> List[Target]:
        return [self.unit] if self.unit is not None else list(targets)

    def _share(self, layer: str, side: int) -> float:
        """The share of a channel's positions the term reads on an image of ``side`` pixels."""
        if not self.rfs:
            return self.top
        return min(1.0, self.rfs * (self._rf.get(layer, side) / side) ** 2)

    def plan(self, engine, target):
        t = self.unit or target
        if (self.classes_only and t.is_unit) or (self.units_only and not t.is_unit):
            return []
        return [(t.layer or last_linear(engine.loaded.model) or "output", 1.0)]  # a class: the logits

    def _indices(self, targets: Sequence[Target], dev):
        key = (tuple(t.key for t in targets), str(dev))
        if key not in self._index:
            cls = [] if self.units_only else [i for i, t in enumerate(targets) if not t.is_unit]
            by_layer: Dict[str, List[int]] = {}
            for i, t in enumerate(targets):
                if t.is_unit and not self.classes_only:
                    by_layer.setdefault(t.layer, []).append(i)
            self._index[key] = (
                torch.tensor(cls, device=dev, dtype=torch.long),
                torch.tensor([targets[i].index for i in cls], device=dev, dtype=torch.long),
                {l: (torch.tensor(idx, device=dev), torch.tensor([targets[i].index for i in idx], device=dev),
                     [targets[i] for i in idx])
                 for l, idx in by_layer.items()})
            if len(self._index) > 64:
                self._index.pop(next(iter(self._index)))
        return self._index[key]

    def __call__(self, ctx):
        targets = self._targets(ctx.slots)
        B, R = len(targets), ctx.repeat
        cls_pos, cls_ids, groups = self._indices(targets, ctx.view.device)
        scores = torch.zeros(B, R, device=ctx.view.device, dtype=torch.float32)
        if len(cls_pos):
            lg = ctx.logits.float().view(B, R, -1)[cls_pos]                                # (n, R, K)
            picked = lg.gather(2, cls_ids.view(-1, 1, 1).expand(-1, R, 1))[..., 0]        # (n, R)
            scores = scores.index_put((cls_pos,), picked)
        for layer, (idx, ch, ts) in groups.items():
            f = ctx.features[layer].float()
            if ctx.engine.loaded.channel_dim_of(layer) == -1:  # tokens (B*R, N, C) -> (B*R, C, N)
                f = f.transpose(1, 2)
            grid = tuple(f.shape[2:]) if f.dim() == 4 else (f.shape[2], 1)
            f = f.reshape(B, R, f.shape[1], -1)[idx]                                      # (n, R, C, D)
            if all(t.whole_channel is not None for t in ts):
                act = f.gather(2, ch.view(-1, 1, 1, 1).expand(-1, R, 1, f.shape[-1]))[:, :, 0]     # (n, R, D)
                share = self._share(layer, ctx.view.shape[-1])
                if share < 1:
                    act = act.topk(max(1, round(share * act.shape[-1])), dim=-1).values
                act = act.mean(-1) * self._scale.get(layer, 1.0)
            else:
                act = _unit_activation(f, ts, grid, ctx.view.shape[-1], ctx.engine.loaded.input_size)
            if self.channel_norm:
                act = act * (self.channel_norm / f.shape[2])
            scores = scores.index_put((idx,), act)
        loss = -scores.mean(1)
        if self.class_loss == "ce" and len(cls_pos):
            lg = ctx.logits.float().view(B, R, -1)[cls_pos]
            ce = F.cross_entropy(lg[:, 0], cls_ids, reduction="none")
            loss = loss.index_put((cls_pos,), ce)
        return loss


def _unit_activation(f: torch.Tensor, ts: Sequence[Target], grid, size: int, final: int) -> torch.Tensor:
    """Features ``(n, R, C, D)`` of ``n`` unit targets -> their activations ``(n, R)``: the projection on each
    target's vector plus bias, averaged over the ``D`` positions, or read at a neuron's location (moved from
    the grid at the model's input size to this one's)."""
    w = torch.stack([t.unit_vector(f.shape[2]) for t in ts]).to(f.device, f.dtype)           # (n, C)
    b = torch.tensor([t.unit_bias for t in ts], device=f.device, dtype=f.dtype)
    u = torch.einsum("nrcd,nc->nrd", f, w) + b[:, None, None]                                  # (n, R, D)
    out = u.mean(-1)
    for j, t in enumerate(ts):
        if t.loc is not None:
            y, x = (min(v, g - 1) for v, g in zip(t.at_size(size, final).loc, grid))
            out = out.index_put((torch.tensor([j], device=f.device),), u[j:j + 1, :, y * grid[1] + x])
    return out


# --- DeepInversion's BatchNorm statistics ---------------------------------------------------------

class _BNHooks:
    """Forward hooks on every ``BatchNorm2d``: per element, ‖μ(x) − μ_BN‖₂ + ‖σ²(x) − σ²_BN‖₂ of its
    input (or one term for the whole batch, shared out, with ``batch_stats``). A context manager:
    the hooks are removed on exit, also when the body raises."""

    def __init__(self, modules, first_multiplier: float, batch_stats: bool, sink: List[torch.Tensor]) -> None:
        self.modules, self.first, self.batch_stats, self.sink = modules, first_multiplier, batch_stats, sink
        self._handles: List[Any] = []

    def _hook(self, i: int):
        def hook(mod, inputs, output):
            x = inputs[0]
            dims = (0, 2, 3) if self.batch_stats else (2, 3)
            mean = x.mean(dim=dims).view(-1, x.shape[1])
            var = x.var(dim=dims, unbiased=False).view(-1, x.shape[1])
            r = (var - mod.running_var[None]).norm(dim=1) + (mean - mod.running_mean[None]).norm(dim=1)
            if self.batch_stats:  # one term for the batch, shared out so that the sum counts it once
                r = r.expand(x.shape[0]) / x.shape[0]
            self.sink.append(r * (self.first if i == 0 else 1.0))

        return hook

    def __enter__(self):
        try:
            for i, (_, m) in enumerate(self.modules):
                self._handles.append(m.register_forward_hook(self._hook(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        while self._handles:
            self._handles.pop().remove()
        return False


class BNStats(Objective):
    """DeepInversion's feature prior: Σ_l m_l (‖μ_l(x) − μ_l^BN‖₂ + ‖σ²_l(x) − σ²_l^BN‖₂) over every
    ``BatchNorm2d`` input, ``m_l = first_multiplier`` on the first and 1 elsewhere; per element over
    space (``batch_stats=False``) or over the whole batch (DeepInversion's coupling)."""

    name = "bnstats"

    def __init__(self, first_multiplier: float = 10.0, batch_stats: bool = False, weight: float = 1.0) -> None:
        self.first, self.batch_stats, self.weight = float(first_multiplier), bool(batch_stats), float(weight)
        self._terms: List[torch.Tensor] = []
        self._modules: List[Tuple[str, nn.Module]] = []

    def _bn(self, model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
                and m.running_mean is not None and m.running_var is not None]

    def setup(self, engine, targets):
        self._modules = self._bn(engine.loaded.model)
        if not any(isinstance(m, nn.BatchNorm2d) for m in engine.loaded.model.modules()):
            raise ValueError(f"method bnstats matches BatchNorm statistics, but {engine.loaded.name} has no "
                             f"BatchNorm2d layer; choose another method")

    def needs_logits(self, slots):
        return True

    def hooks(self, model):
        self._terms = []
        return _BNHooks(self._modules or self._bn(model), self.first, self.batch_stats, self._terms)

    def plan(self, engine, target):
        return [(n, self.weight * (self.first if i == 0 else 1.0)) for i, (n, _) in enumerate(self._modules)]

    def __call__(self, ctx):
        out = torch.stack(self._terms).sum(0) if self._terms else torch.zeros(ctx.batch, device=ctx.view.device)
        self._terms = []
        return out
