"""The one optimization engine under :func:`~vital_fast.optim.visualize`, sweeps and every baseline.

A :class:`Recipe` says what to optimize (a :class:`~vital_fast.optim.parametrizations.Parametrization`,
an :class:`~vital_fast.optim.objectives.Objective`, the random :class:`~vital_fast.optim.transforms.Views`
each step takes, the optimizer and its learning-rate schedule); the :class:`Engine` owns the loop.

**Slots.** Each target occupies a slot with its own state: parameters and buffers, its own
optimizer moments and step count, its own seeded generator (initialization and every
random view), its stage of the multi-resolution schedule, its step, its transparency accumulator
and its loss record. Every :meth:`Engine.tick` stacks the occupied slots (one stack per resolution
when slots sit in different stages), renders them, takes their views, runs the network once,
evaluates the objective (one loss per element), backpropagates the sum, and updates every slot of
the stack at once (:mod:`vital_fast.optim.update`: one multi-tensor Adam/NAdam step with each slot's
own learning rate and step count; the transparency accumulation and the projection likewise), so the
ops of a step do not grow with the batch. Per-slot arithmetic never mixes slots, so a target's result
does not depend on its neighbours or its slot (up to the convolutions' rounding, which differs with the
batch size in oneDNN). A finished slot can be refilled with the next target (sweeps) or the batch can
stay fixed (:meth:`Engine.run`, what ``visualize`` does).

**No device reads per step.** The losses stay on the device and are read in one transfer every
``settings.loss_every`` steps (:meth:`Engine.flush`; also when a slot finishes or changes stage, and at
the end): a GPU step then never waits for the device. The per-step loss record is complete after a
read. Progress callbacks run at reads. The early-stopping test runs at a slot's own check points, every
``loss_every`` of its steps (the engine reads the losses when a slot in its last stage reaches one), so
that a target's result depends on its own losses only, never on when its neighbours made the engine read. Under ``amp="fp16"`` the loss scale is dynamic and on the device too
(:class:`~vital_fast.optim.precision.LossScale`).

**Stages.** ``settings.stages`` gives ``(scale, steps)`` pairs. When a slot enters a stage the
objective prepares it (VITAL recomputes the references' prototypes at the stage's resolution); a
per-stage parametrization (pixels) is resized and its optimizer restarts; the learning rate follows
the recipe's schedule (warm-up then cosine per stage, or constant).

**Compiled network.** With ``settings.compile`` other than ``"off"`` the network's forward runs under
``torch.compile`` (:mod:`vital_fast.models.compiled`): the tapped layers get hooks once, one compiled
module per set of layers (and whether the logits are read) is cached on the engine, and
:meth:`Engine.close` removes the hooks when the run ends (:meth:`Engine.run` and the sweep driver call
it; the engine is also a context manager). A step whose objective brings its own hooks
(``objective.hooks(model)``, e.g. BatchNorm statistics) runs eagerly; relevance runs on the eager model.

**Layout.** With ``settings.channels_last`` (default ``"auto"``: the known convolutional families) the
network runs channels-last (:mod:`vital_fast.models.layout`): its 4-D weights are converted before the
first slot's references are computed and given back by :meth:`Engine.close`, and each step's views enter
in that layout.

**Batch norms folded.** ``settings.fold_batchnorm`` (:mod:`vital_fast.models.folding`): an eager step that
computes no relevance and brings no hooks runs with eval-mode batch norms folded into their convolutions.

**Shared forward.** An objective may ask to share the step's eager forward pass
(``objective.forward_pass(engine, slots)``): VITAL's relevance of channel targets (and of class targets
with ``class_relevance``) then comes from the step's own pass (:class:`~vital_fast.references.shared_relevance.SharedRelevance`)
instead of a second hooked forward; such a step runs eagerly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vital_fast.models.compiled import compiled_frames, resolve_compile
from vital_fast.models.folding import BatchNormFold, resolve_fold
from vital_fast.models.layout import ChannelsLast, resolve_channels_last
from vital_fast.optim.objectives import Objective, StepContext, check_per_element
from vital_fast.optim.parametrizations import Parametrization
from vital_fast.optim.precision import LossScale, autocast, precision_name, resolve_amp
from vital_fast.optim.presets import Settings
from vital_fast.optim.regularizers import lr_factor
from vital_fast.optim.result import ProgressFn
from vital_fast.optim.targets import Target
from vital_fast.optim.transforms import Views
from vital_fast.optim.update import OPTIMIZERS, SlotMoments, multi_step
from vital_fast.references.images import ImageSet

__all__ = ["Engine", "Recipe", "Slot"]

LOSS_EVERY = 10  # Settings.loss_every's default: steps between two reads of the loss record


@dataclass
class Recipe:
    """What one run optimizes: parametrization, objective, views, optimizer and schedule.

    ``schedule``: ``"cosine"`` (linear warm-up over ``warmup`` steps, then cosine to 0; per stage
    for a per-stage parametrization, over the whole run otherwise) or ``"constant"``.
    ``settings`` are recorded with the result; ``method`` names the recipe.
    """

    param: Parametrization
    objective: Objective
    views: Views
    settings: Settings
    _: KW_ONLY
    optimizer: str = "adam"
    lr: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup: int = 0
    method: str = "custom"
    kind_param: Dict[str, Parametrization] = field(default_factory=dict)  # target kind -> its own parametrization

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: constant, cosine")

    def param_of(self, target: Target) -> Parametrization:
        """The parametrization of ``target``: its kind's (``kind_param``) or the recipe's."""
        return self.kind_param.get(target.kind, self.param)

    def parametrizations(self) -> List[Parametrization]:
        return [self.param] + [p for p in self.kind_param.values() if p is not self.param]

    def lr_of(self, p: Parametrization) -> Tuple[float, str]:
        """Learning rate and schedule for ``p``: the recipe's, or for a per-kind parametrization
        other than the recipe's own, its usual ones (a spectral one: constant)."""
        if p is self.param or p.lr is None:
            return self.lr, self.schedule
        return p.lr, ("constant" if not p.per_stage else self.schedule)

    def make_optimizer(self, params: List[torch.Tensor], lr: Optional[float] = None) -> torch.optim.Optimizer:
        """A ``torch.optim`` optimizer with the recipe's settings (for callers' own loops; the engine updates
        every slot at once with :func:`vital_fast.optim.update.multi_step`, the same arithmetic)."""
        lr = self.lr if lr is None else lr
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(self.betas), eps=self.eps)
        return torch.optim.NAdam(params, lr=lr, betas=tuple(self.betas), eps=self.eps)


class Slot:
    """One target's optimization state (see the module docstring)."""

    _serial = 0

    def __init__(self, target: Target, seed: int) -> None:
        Slot._serial += 1
        self.uid = Slot._serial
        self.target = target
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.stage = 0
        self.step = 0                # step within the stage
        self.global_step = 0         # steps taken in all
        self.param: Optional[Parametrization] = None
        self.p: Optional[torch.Tensor] = None   # the parameters (no grad: each step stacks them into a leaf)
        self.buffers: Dict[str, torch.Tensor] = {}
        self.moments: Optional[SlotMoments] = None
        self.alpha: Optional[torch.Tensor] = None
        self.refset: ImageSet = ImageSet()
        self.state: Dict[str, Any] = {}   # the objective's per-slot state (references, relevance)
        self.losses: List[float] = []   # complete up to the engine's latest read (Engine.flush)
        self.pending = 0                # steps whose losses are still on the device
        self.t0 = time.perf_counter()
        self.stopped_early = False
        self.done = False
        self.extra: Dict[str, Any] = {}


class Engine:
    """Runs a :class:`Recipe` over slots (see the module docstring).

    Parameters
    ----------
    loaded : LoadedModel
    recipe : Recipe
    seed : int
        The run's seed; a target's slot is seeded with ``target.seed(seed)``.
    final_size : int
        The last stage's side; stage sides are ``max(16, round(scale · final_size))``.
    refs_for : callable, optional
        ``refs_for(target) -> (ImageSet, extra)``: a target's reference images (and metrics to
        record with it); default: none.
    early_stop, early_stop_window : optional
        Stop a slot in its last stage when its mean loss over the last window improved by less than
        ``early_stop`` (relative) over the window before.
    """

    def __init__(self, loaded, recipe: Recipe, seed: int, final_size: int,
                 refs_for: Optional[Callable[[Target], Tuple[ImageSet, Dict[str, Any]]]] = None,
                 early_stop: Optional[float] = None, early_stop_window: Optional[int] = None) -> None:
        self.loaded = loaded
        self.recipe = recipe
        self.s = recipe.settings
        self.seed = int(seed)
        self.final = int(final_size)
        self.refs_for = refs_for
        self.dev = next(iter(loaded.model.parameters())).device
        self.amp = resolve_amp(getattr(self.s, "amp", None), self.dev)
        self.precision = precision_name(self.amp)
        self.compile_backend = resolve_compile(getattr(self.s, "compile", None))
        # channels-last layout of the network for the run (vital_fast.models.layout): converted before the
        # first slot's references (so that every slot's are computed in one layout), given back by close()
        self.channels_last = resolve_channels_last(getattr(self.s, "channels_last", None), loaded.family, self.dev)
        self._layout = None
        self.fold = BatchNormFold(loaded.model) if resolve_fold(getattr(self.s, "fold_batchnorm", None)) else None
        self._taps = None  # PersistentTaps while a compiled forward has hooks on the model
        self._compiled: Dict[Tuple[Tuple[str, ...], bool], Any] = {}
        self._compiled_now = False  # the latest compiled forward compiled (a first call or a new shape)
        self.t_compile = 0.0        # time of the steps that compiled (included in t_opt)
        self.sizes = [max(16, int(round(sc * final_size))) for sc, _ in self.s.stages]
        self.stage_steps = [int(n) for _, n in self.s.stages]
        self.total_steps = sum(self.stage_steps)
        self.early_stop = early_stop
        self.window = int(early_stop_window or max(5, self.total_steps // 10))
        self.t_refs = self.t_lrp = self.t_opt = 0.0
        self.loss_every = int(getattr(self.s, "loss_every", LOSS_EVERY))
        if self.loss_every < 1:
            raise ValueError(f"loss_every must be >= 1 (steps between reads of the loss record), got {self.loss_every}")
        self._pending: List[Tuple[List[Slot], torch.Tensor]] = []  # losses not yet read, on the device
        self.reads = 0
        self.scaler = LossScale(self.dev) if self.amp is torch.float16 else None
        self.loss_scale: Dict[str, float] = {}  # float16: the scale and the skipped steps at the latest read
        self.ticks = 0
        self.slot_steps = 0
        # where a step's time goes (CPU wall time; on a GPU, without synchronization, launch time):
        # rendering and views, the network's forward, the loss (relevance excluded: relevance_s),
        # the backward, and the per-slot update (transparency, optimizer, projection, loss record)
        self.phases: Dict[str, float] = {k: 0.0 for k in ("views_s", "forward_s", "loss_s", "backward_s",
                                                          "update_s")}

    # --- slots -------------------------------------------------------------------------------

    def setup(self, targets: Sequence[Target]) -> None:
        """Validate the objective against the targets before any work (unknown layers, no logits...)."""
        self.recipe.objective.setup(self, targets)

    def plan(self, t: Target) -> List[Tuple[str, float]]:
        """The (layer, weight) pairs the objective reads for ``t`` (recorded with its result)."""
        return self.recipe.objective.plan(self, t)

    def _convert_layout(self) -> None:
        if self.channels_last and self._layout is None:
            self._layout = ChannelsLast(self.loaded.model)

    def new_slot(self, t: Target) -> Slot:
        self._convert_layout()
        slot = Slot(t, t.seed(self.seed))
        slot.param = self.recipe.param_of(t)
        t0 = time.perf_counter()
        if self.refs_for is not None:
            slot.refset, slot.extra = self.refs_for(t)
        needs = self.recipe.objective.needs_references or slot.param.needs_references
        if needs and len(slot.refset) == 0:
            raise ValueError(f"the reference set of {t.key} is empty")
        self.t_refs += time.perf_counter() - t0
        self.recipe.objective.enter_stage(self, slot)
        t0 = time.perf_counter()
        bufs = slot.param.init(slot.gen, self.sizes[0], self.final, self.loaded, slot)
        if slot.param.needs_references:
            self.t_refs += time.perf_counter() - t0
        slot.buffers = {k: v.to(self.dev) for k, v in bufs.items() if k != "p"}
        self._enter_stage(slot, bufs["p"].to(self.dev))
        return slot

    def _enter_stage(self, slot: Slot, p: torch.Tensor) -> None:
        with torch.no_grad():
            slot.param.project(p, self.loaded)
        slot.p = p.detach()
        slot.moments = SlotMoments(slot.p)
        slot.step = 0

    def _advance(self, slot: Slot) -> bool:
        """Count the slot's step; True when it finished, changed stage or reached an early-stopping check point
        (the engine then reads the losses)."""
        slot.step += 1
        slot.global_step += 1
        last = slot.stage == len(self.sizes) - 1
        if slot.step >= self.stage_steps[slot.stage]:
            if last:
                slot.done = True
                return True
            self.flush()  # the stage's losses read before the next stage's references are prepared
            slot.stage += 1
            S = self.sizes[slot.stage]
            self.recipe.objective.enter_stage(self, slot)
            if slot.param.per_stage:
                slot.alpha = F.interpolate(slot.alpha, size=(S, S), mode="bilinear", align_corners=False)
                self._enter_stage(slot, slot.param.resize(slot.p.detach(), S, self.loaded))
            else:
                slot.step = 0
            return True
        return self._check_point(slot)

    def _check_point(self, slot: Slot) -> bool:
        """The slot is at one of its early-stopping check points (every ``loss_every`` of its steps, in its
        last stage, once it has two windows of losses there)."""
        w = self.window
        return (self.early_stop is not None and not slot.done and slot.stage == len(self.sizes) - 1
                and slot.step >= 2 * w and slot.global_step % self.loss_every == 0)

    def _early_stop(self, slot: Slot) -> None:
        """The early-stopping test of a slot at a check point, on its losses up to there (read: no pending)."""
        w = self.window
        if not self._check_point(slot) or slot.pending or len(slot.losses) < 2 * w:
            return
        prev = sum(slot.losses[-2 * w:-w]) / w
        cur = sum(slot.losses[-w:]) / w
        if prev - cur <= self.early_stop * abs(prev):
            slot.done = True
            slot.stopped_early = True

    def flush(self) -> bool:
        """Read every loss still on the device in one transfer (and float16's loss scale with them), append
        them to their slots' records and run the early-stopping test; False when there was nothing to read.

        Raises
        ------
        FloatingPointError
            float16's loss scale fell below its floor: every step overflowed (use bf16 or float32).
        """
        if not self._pending:
            return False
        pending, self._pending = self._pending, []
        parts = [t for _, t in pending] + ([self.scaler.record()] if self.scaler is not None else [])
        vals = torch.cat(parts).cpu().tolist()
        self.reads += 1
        i = 0
        for slots, _ in pending:
            for sl in slots:
                sl.losses.append(vals[i])
                sl.pending -= 1
                i += 1
        if self.scaler is not None:
            scale, skipped = vals[i], vals[i + 1]
            self.loss_scale = {"scale": scale, "skipped_steps": int(skipped)}
            if scale < LossScale.FLOOR:
                raise FloatingPointError(
                    f"amp fp16: the loss scale fell to {scale:.3g} ({int(skipped)} steps skipped): the gradients "
                    f"overflow float16 at every scale; run with amp bf16 (--amp bf16) or float32 (--amp off)")
        for slots, _ in pending:
            for sl in slots:
                self._early_stop(sl)
        return True

    def _lr(self, slot: Slot) -> float:
        r = self.recipe
        lr, schedule = r.lr_of(slot.param)
        if schedule == "constant":
            return lr
        if slot.param.per_stage:
            return lr * lr_factor(slot.step, self.stage_steps[slot.stage], r.warmup)
        return lr * lr_factor(slot.global_step, self.total_steps, r.warmup)

    # --- one optimization step of every occupied slot ------------------------------------------

    def tick(self, slots: Sequence[Slot]) -> bool:
        """One step of every slot in ``slots``. Their losses stay on the device until the next read
        (:meth:`flush`: every ``settings.loss_every`` ticks, and when a slot finishes or changes stage);
        returns True when this tick read them."""
        groups: Dict[Tuple[int, int], List[int]] = {}  # (side, parametrization) -> slots stacked together
        order = {id(p): j for j, p in enumerate(self.recipe.parametrizations())}
        for i, sl in enumerate(slots):
            groups.setdefault((self.sizes[sl.stage], order.get(id(sl.param), len(order))), []).append(i)
        t0 = time.perf_counter()
        refs0 = self.t_refs
        reads0 = self.reads
        ended = False
        for key in sorted(groups):
            ended |= self._step_group(key[0], [slots[i] for i in groups[key]])
        self.ticks += 1
        self.slot_steps += len(slots)
        if ended or self.ticks % self.loss_every == 0:
            self.flush()
        self.t_opt += time.perf_counter() - t0 - (self.t_refs - refs0)
        return self.reads != reads0

    def _forward(self, view: torch.Tensor, slots: Sequence[Slot]):
        """One network pass over ``view`` (under autocast with ``Settings.amp``): the tapped features
        the objective asks for and, when it needs them, the logits."""
        from vital_fast.models import FeatureTaps
        from vital_fast.models.batching import pad_batch
        from vital_fast.models.padding import needs_padding

        obj, model = self.recipe.objective, self.loaded.model
        layers = obj.layers(slots)
        logits_needed = obj.needs_logits(slots)
        hooks = obj.hooks(model)
        shared = obj.forward_pass(self, slots)  # e.g. relevance computed from this pass (SortMatch)
        if shared is not None:
            layers = list(dict.fromkeys([*layers, *shared.layers]))
        n = view.shape[0]
        x = view
        if hooks is None and n == 1 and view.device.type == "cpu":
            # a one-element CPU batch runs as two where a convolution would otherwise leave oneDNN (batching.py)
            with torch.no_grad(), autocast(self.amp, self.dev):
                partial = layers if layers and not logits_needed and shared is None else None
                pad = needs_padding(model, self._input(view.detach()), partial)
            x = pad_batch(view) if pad else view
        x = self._input(x)
        feats: Dict[str, torch.Tensor] = {}
        logits = None
        if self.compile_backend is not None and hooks is None and shared is None and (layers or logits_needed):
            with autocast(self.amp, self.dev):
                feats, logits = self._forward_compiled(x, layers, logits_needed)
            return self._unpad(feats, logits, n, x.shape[0])
        with contextlib.ExitStack() as stack:
            if hooks is not None:
                stack.enter_context(hooks)
            if shared is not None:  # before the taps: they see what it re-attaches
                stack.enter_context(shared)
            elif hooks is None and self.fold is not None:  # relevance and hooks see the network as it is
                stack.enter_context(self.fold.applied(x, layers))
            stack.enter_context(autocast(self.amp, self.dev))
            if layers and not logits_needed:
                feats = FeatureTaps(model, layers, stop_after=True).run(x, pad=False)  # padded above where needed
            elif layers:
                taps = stack.enter_context(FeatureTaps(model, layers))
                logits = model(x)
                feats = dict(taps.outputs)
            elif logits_needed:
                logits = model(x)
        return self._unpad(feats, logits, n, x.shape[0])

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input: in a half-precision model's dtype (the image and the loss stay float32), and
        channels-last when the run converted the network."""
        dt = self.loaded.dtype
        if dt in (torch.float16, torch.bfloat16) and x.dtype != dt:
            x = x.to(dt)
        if self.channels_last:
            self._convert_layout()
            x = ChannelsLast.input(x)
        return x

    @staticmethod
    def _unpad(feats: Dict[str, torch.Tensor], logits: Optional[torch.Tensor], n: int, padded: int):
        from vital_fast.models.batching import unpad

        feats = unpad(feats, n, padded)
        if logits is not None and logits.shape[0] != n:
            logits = logits[:n]
        return feats, logits

    def _forward_compiled(self, x: torch.Tensor, layers: Sequence[str], logits_needed: bool):
        """The network's pass through the ``torch.compile``d :class:`~vital_fast.models.compiled.TappedForward`
        of ``(layers, logits_needed)`` (compiled at its first call, then cached); ``(feats, logits)``."""
        from vital_fast.models.compiled import PersistentTaps, TappedForward, tapped_outputs

        key = (tuple(dict.fromkeys(layers)), bool(logits_needed))
        fn = self._compiled.get(key)
        if fn is None:
            if self._taps is None:
                self._taps = PersistentTaps(self.loaded.model)
            fn = torch.compile(TappedForward(self._taps, key[0], key[1]), backend=self.compile_backend)
            self._compiled[key] = fn
        frames = compiled_frames()
        try:
            outs = fn(x)
        finally:
            self._taps.reset()
        self._compiled_now = compiled_frames() != frames
        return tapped_outputs(outs, key[0], key[1])

    def close(self) -> None:
        """Remove the compiled forward's hooks from the model and drop the compiled modules, and give the
        model its own memory layout back (nothing to do for an eager engine in the model's layout). A later
        step compiles (and converts) again."""
        taps, self._taps = self._taps, None
        self._compiled.clear()
        if taps is not None:
            taps.close()
        layout, self._layout = self._layout, None
        if self.fold is not None:  # its weights are in the layout of the run: found again by a later step
            self.fold.pairs = None
        if layout is not None:
            layout.restore()
            from vital_fast.references.lrp_rules import forget_clamped_params

            forget_clamped_params(self.loaded.model)  # the z+ rules' copies of the channels-last weights

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _step_group(self, S: int, slots: Sequence[Slot]) -> bool:
        """One step of a stack of slots at side ``S``; True when one of them finished or changed stage."""
        r, B = self.recipe, len(slots)
        t0 = time.perf_counter()
        # the stacked parameters are the step's leaf: one gradient tensor, split into per-slot views
        p = (torch.cat([sl.p for sl in slots]) if B > 1 else slots[0].p.detach()).requires_grad_(True)
        bufs = {k: torch.cat([sl.buffers[k] for sl in slots]) for k in slots[0].buffers}
        param = slots[0].param
        img = param.render(p, bufs, self.loaded)
        if img.requires_grad and not img.is_leaf:
            img.retain_grad()
        image = img if img.shape[-1] == S else F.interpolate(img, size=(S, S), mode="bilinear",
                                                             align_corners=False, antialias=True)
        gens = [sl.gen for sl in slots]
        prog = [(sl.global_step, self.total_steps) for sl in slots]
        normalized = param.space == "normalized"
        if r.views.space == "unit" and normalized:
            view = self.loaded.normalize(r.views(self.loaded.denormalize(image), gens, S, prog))
        else:
            view = r.views(image, gens, S, prog)
            if not normalized:
                view = self.loaded.normalize(view)
            elif self.loaded.preprocess is not None:  # the caller's own input mapping, from [0, 1]
                view = self.loaded.normalize(self.loaded.denormalize(view))
        t1 = time.perf_counter()
        self._compiled_now = False
        feats, logits = self._forward(view, slots)
        t2 = time.perf_counter()
        lrp0, refs0 = self.t_lrp, self.t_refs
        ctx = StepContext(self, slots, image, view, r.views.repeat, feats, logits, S)
        total = check_per_element(r.objective(ctx), B, r.objective.name)
        t3 = time.perf_counter()
        scaler = self.scaler
        (total.sum() * scaler.scale if scaler is not None else total.sum()).backward()
        t4 = time.perf_counter()
        grad = (p if img is p else img).grad
        if grad is None:
            raise ValueError(f"objective {r.objective.name} does not depend on the image (no gradient reached it)")
        grad = grad.detach()
        ok = None
        if scaler is not None:  # unscale; a step that overflowed is skipped on the device (ok == 0)
            ok = scaler.unscale([p.grad] if img is p else [p.grad, grad])
        self._pending.append((list(slots), total.detach().float()))
        for sl in slots:
            sl.pending += 1
        with torch.no_grad():
            a = grad.abs().sum(1, keepdim=True)
            if ok is not None:
                a.mul_(ok)
            parts = stack_rows(a, B)
            alphas = [sl.alpha for sl in slots if sl.alpha is not None]
            if len(alphas) == B:
                torch._foreach_add_(alphas, parts)
            else:  # a slot's first step
                for sl, part in zip(slots, parts):
                    sl.alpha = part.clone() if sl.alpha is None else sl.alpha.add_(part)
            ps = [sl.p for sl in slots]
            multi_step(r.optimizer, ps, stack_rows(p.grad, B), [sl.moments for sl in slots],
                       [self._lr(sl) for sl in slots], r.betas, r.eps, ok)
            param.project_many(ps, self.loaded)
            if scaler is not None:
                scaler.update(ok)
        ph = self.phases
        ph["views_s"] += t1 - t0
        ph["forward_s"] += t2 - t1
        ph["loss_s"] += t3 - t2 - (self.t_lrp - lrp0) - (self.t_refs - refs0)
        ph["backward_s"] += t4 - t3
        ph["update_s"] += time.perf_counter() - t4
        if self._compiled_now:
            self.t_compile += time.perf_counter() - t0
        ended = False
        for sl in slots:  # stage changes prepare references (LRP): outside no_grad
            ended |= self._advance(sl)
        return ended

    # --- fixed batches and results -------------------------------------------------------------

    def run(self, targets: Sequence[Target], progress: Optional[ProgressFn] = None) -> List[Slot]:
        """Optimize ``targets`` as one fixed batch to the end of the schedule; :meth:`close` at the end
        (also on error)."""
        try:
            slots = [self.new_slot(t) for t in targets]
            for step in range(self.total_steps):
                if self.tick(slots) and progress is not None:  # at each read of the losses
                    progress(step + 1, self.total_steps, torch.tensor([sl.losses[-1] for sl in slots]))
            self.flush()
            return slots
        finally:
            self.close()

    def image(self, slot: Slot) -> torch.Tensor:
        """The slot's image ``(3, H, W)`` in [0, 1], on the CPU."""
        with torch.no_grad():
            img = slot.param.render(slot.p.detach(), slot.buffers, self.loaded)
            return slot.param.to_unit(img, self.loaded).clamp(0, 1).cpu()[0]

    def transparency(self, slot: Slot) -> torch.Tensor:
        """The slot's accumulated |∂L/∂image| ``(1, H, W)`` scaled to [0, 1], on the CPU."""
        a = slot.alpha.detach().float().cpu()
        return (a / a.flatten(1).amax(1).clamp_min(1e-12).view(1, 1, 1, 1))[0]

    def timings(self, t_start: float) -> Dict[str, float]:
        """Where the run's time went; with a compiled network also ``compile_s``, the time of the steps
        that compiled (the first step of each set of tapped layers, and a step with a new shape), which
        ``optimize_s`` includes."""
        steps = self.total_steps
        out = {"total_s": time.perf_counter() - t_start, "references_s": self.t_refs, "optimize_s": self.t_opt,
               "loss_reads": self.reads,
               "relevance_s": self.t_lrp, "steps": steps, "s_per_step": self.t_opt / max(1, self.ticks),
               "s_per_target_step": self.t_opt / max(1, self.slot_steps), **self.phases}
        if self.compile_backend is not None:
            out["compile_s"] = self.t_compile
        return out


def stack_rows(t: torch.Tensor, n: int) -> List[torch.Tensor]:
    """The ``n`` one-element rows of a stacked ``(n, ...)`` tensor, as views (one op)."""
    return list(t.split(1)) if n > 1 else [t]

