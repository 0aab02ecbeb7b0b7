"""The sweep's optimization engine: slots with their own step counters, Adam state, generators and
schedule stages, stepped together per resolution (see **Engine.** in :mod:`vital_fast.sweep`)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vital_fast.optim.presets import Settings
from vital_fast.optim.regularizers import image_priors, lr_factor
from vital_fast.optim.targets import Target
from vital_fast.models.facts import plan_layers_before
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet


class _Slot:
    __slots__ = ("uid", "target", "seed", "gen", "stage", "step", "adam_t", "x", "m", "v", "alpha", "rel", "refs",
                 "refset", "losses", "t0", "stopped_early", "done", "extra")

    _serial = 0

    def __init__(self, target: Target, seed: int) -> None:
        _Slot._serial += 1
        self.uid = _Slot._serial
        self.target = target
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.stage = 0
        self.step = 0
        self.adam_t = 0
        self.x = self.m = self.v = self.alpha = None
        self.rel: Dict[str, torch.Tensor] = {}
        self.refs = None
        self.refset: Optional[ImageSet] = None
        self.losses: List[float] = []
        self.t0 = time.perf_counter()
        self.stopped_early = False
        self.done = False
        self.extra: Dict[str, Any] = {}


class _Engine:
    """Slots with their own step counters and Adam state; finished slots are refilled."""

    def __init__(self, loaded, settings: Settings, seed: int, final_size: int, class_layers, cache: DiskCache,
                 refs_for: Callable[[Target], Tuple[ImageSet, Dict[str, Any]]], early_stop: Optional[float],
                 early_stop_window: Optional[int]) -> None:
        self.loaded = loaded
        self.s = settings
        self.seed = seed
        self.cache = cache
        self.refs_for = refs_for
        self.dev = next(iter(loaded.model.parameters())).device
        self.sizes = [max(16, int(round(sc * final_size))) for sc, _ in settings.stages]
        self.stage_steps = [int(n) for _, n in settings.stages]
        self.class_layers = list(class_layers)
        self._layers_before = plan_layers_before
        self.early_stop = early_stop
        total = settings.steps
        self.window = int(early_stop_window or max(5, total // 10))
        ms = list(zip(loaded.mean, loaded.std))
        self.lo = torch.tensor([(0 - a) / b for a, b in ms], device=self.dev).view(1, 3, 1, 1)
        self.hi = torch.tensor([(1 - a) / b for a, b in ms], device=self.dev).view(1, 3, 1, 1)
        self._groups: Dict[int, Tuple[tuple, list]] = {}
        self._logit: Optional[str] = None
        self.t_refs = self.t_lrp = self.t_opt = 0.0
        self.ticks = 0
        self.slot_steps = 0

    # --- slots -------------------------------------------------------------------------------

    def plan(self, t: Target) -> List[Tuple[str, float]]:
        if t.kind == "class":
            return self.class_layers
        return self._layers_before(self.loaded, t.layer, self.class_layers, self.s.channel_stem_weight)

    def _stage_refs(self, slot: _Slot):
        from vital_fast.references.prototypes import channel_references, class_references

        t0 = time.perf_counter()
        t, S, plan = slot.target, self.sizes[slot.stage], self.plan(slot.target)
        if t.kind == "class":
            r = class_references(self.loaded, t.key, slot.refset, plan, S, self.s, slot.seed, self.cache)
        else:
            rs = slot.refset.subset(range(min(len(slot.refset), self.s.n_refs)))
            r = channel_references(self.loaded, t.key, t.layer, t.index, rs, plan, S, self.s, self.cache)
        self.t_refs += time.perf_counter() - t0
        return r

    def new_slot(self, t: Target) -> _Slot:
        slot = _Slot(t, t.seed(self.seed))
        t0 = time.perf_counter()
        slot.refset, slot.extra = self.refs_for(t)
        self.t_refs += time.perf_counter() - t0
        if len(slot.refset) == 0:
            raise ValueError(f"sweep: the reference set of {t.key} is empty")
        slot.refs = self._stage_refs(slot)
        S = self.sizes[0]
        x0 = torch.randn(3, S, S, generator=slot.gen)[None] * self.s.init_std
        self._enter_stage(slot, x0.to(self.dev), torch.zeros(1, 1, S, S, device=self.dev))
        return slot

    def _enter_stage(self, slot: _Slot, x: torch.Tensor, alpha: torch.Tensor) -> None:
        slot.x = torch.max(torch.min(x, self.hi), self.lo)
        slot.alpha = alpha
        slot.m = torch.zeros_like(slot.x, memory_format=torch.preserve_format)
        slot.v = torch.zeros_like(slot.x, memory_format=torch.preserve_format)
        slot.adam_t = 0
        slot.step = 0
        slot.rel = {}

    def _advance(self, slot: _Slot) -> None:
        slot.step += 1
        last = slot.stage == len(self.sizes) - 1
        if slot.step >= self.stage_steps[slot.stage]:
            if last:
                slot.done = True
                return
            slot.stage += 1
            S = self.sizes[slot.stage]
            x = F.interpolate(slot.x.detach(), size=(S, S), mode="bilinear", align_corners=False)
            a = F.interpolate(slot.alpha, size=(S, S), mode="bilinear", align_corners=False)
            slot.refs = self._stage_refs(slot)
            self._enter_stage(slot, x, a)
            return
        w = self.window
        if self.early_stop is not None and last and len(slot.losses) >= 2 * w and slot.step >= 2 * w:
            prev = sum(slot.losses[-2 * w:-w]) / w
            cur = sum(slot.losses[-w:]) / w
            if prev - cur <= self.early_stop * abs(prev):
                slot.done = True
                slot.stopped_early = True

    # --- one optimization step of every occupied slot ------------------------------------------

    def tick(self, slots: Sequence[_Slot]) -> None:
        by_size: Dict[int, List[_Slot]] = {}
        for sl in slots:
            by_size.setdefault(self.sizes[sl.stage], []).append(sl)
        t0 = time.perf_counter()
        for S in sorted(by_size):
            self._step_group(S, by_size[S])
        self.t_opt += time.perf_counter() - t0
        self.ticks += 1
        self.slot_steps += len(slots)

    def _groups_for(self, S: int, slots: Sequence[_Slot]):
        from vital_fast.optim.visualize import _build_groups

        key = tuple((sl.uid, sl.stage) for sl in slots)
        hit = self._groups.get(S)
        if hit is None or hit[0] != key:
            hit = (key, _build_groups([sl.target for sl in slots], [sl.refs for sl in slots], self.dev))
            self._groups[S] = hit
        return hit[1]

    def _step_group(self, S: int, slots: Sequence[_Slot]) -> None:
        from vital_fast.optim.transforms import draw_jitter, roll_flip
        from vital_fast.optim.visualize import _forward_taps, matching_loss

        s, loaded, B = self.s, self.loaded, len(slots)
        groups = self._groups_for(S, slots)
        layer_names = sorted({l for g in groups for l, _ in g["layers"]})
        x = torch.cat([sl.x for sl in slots]).requires_grad_(True)
        gens = [sl.gen for sl in slots]
        dy, dx, fl = draw_jitter(gens, int(round(s.jitter * S)), s.flip)
        xt = roll_flip(x, dy, dx, fl)
        if getattr(s, "scale", 0.0) or getattr(s, "rotate", 0.0):  # same draws, same order as visualize
            from vital_fast.optim.transforms import draw_affine, scale_rotate

            xt = scale_rotate(xt, *draw_affine(gens, s.scale, s.rotate))
        every = max(1, s.lrp_every)
        need = [i for i, sl in enumerate(slots) if sl.refs.importance and sl.step % every == 0]
        if need:
            tl = time.perf_counter()
            self._relevance(xt, slots, need)
            self.t_lrp += time.perf_counter() - tl
        feats = _forward_taps(loaded, xt, layer_names)

        def relevance(gi, g):
            members = g["index"].tolist()
            return {l: torch.cat([slots[i].rel[l] for i in members]) for l, _ in g["layers"]}

        per_elem = matching_loss(loaded, groups, feats, relevance, B, self.dev)
        total = per_elem + image_priors(x, s)
        total.sum().backward()
        grad = x.grad.detach()
        tot = total.detach().float().cpu()
        beta1, beta2 = (float(b) for b in s.betas)
        eps = 1e-8
        with torch.no_grad():
            for i, sl in enumerate(slots):
                g = grad[i:i + 1]
                sl.alpha += g.abs().sum(1, keepdim=True)
                # torch.optim.Adam's single-tensor update, with this slot's own step count
                lr = s.lr * lr_factor(sl.step, self.stage_steps[sl.stage], s.warmup)
                sl.adam_t += 1
                step = float(sl.adam_t)
                sl.m.lerp_(g, 1 - beta1)
                sl.v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (sl.v.sqrt() / (bias_correction2 ** 0.5)).add_(eps)
                sl.x.addcdiv_(sl.m, denom, value=-step_size)
                sl.x.copy_(torch.max(torch.min(sl.x, self.hi), self.lo))
                sl.losses.append(float(tot[i]))
        for sl in slots:  # stage changes prepare references (LRP): outside no_grad
            self._advance(sl)

    def _logit_layer(self) -> str:
        """Where class relevance starts (resolved once, on the first class slot that needs it)."""
        if self._logit is None:
            from vital_fast.models import class_logit_layer

            self._logit = class_logit_layer(self.loaded)
        return self._logit

    def _relevance(self, xt: torch.Tensor, slots: Sequence[_Slot], need: Sequence[int]) -> None:
        """Relevance of the jittered synthetic image for the slots due a refresh, per target layer."""
        from vital_fast.references.relevance import relevance_maps

        by_layer: Dict[str, List[int]] = {}
        for i in need:
            t = slots[i].target
            by_layer.setdefault(t.layer if t.kind == "channel" else self._logit_layer(), []).append(i)
        for layer, members in by_layer.items():
            idx = torch.tensor(members, device=self.dev)
            xs = xt.detach().index_select(0, idx)
            chans = torch.tensor([slots[i].target.index for i in members], device=self.dev)
            rec = [l for l, _ in slots[members[0]].refs.layers]
            maps = relevance_maps(self.loaded.model, xs, layer, chans, rec, family=self.loaded.family,
                                  composite=self.s.lrp_composite)
            for j, i in enumerate(members):
                slots[i].rel = {l: maps[l][j:j + 1] for l in rec}

    # --- results -------------------------------------------------------------------------------

    def result_files(self, slot: _Slot) -> Dict[str, np.ndarray]:
        from vital_fast.report.images import alpha_map, reference_strip, to_uint8

        with torch.no_grad():
            img = self.loaded.denormalize(slot.x.detach()).clamp(0, 1).cpu()[0]
            a = slot.alpha.cpu()
            amax = a.flatten(1).amax(1).clamp_min(1e-12).view(1, 1, 1, 1)
            tr = (a / amax)[0]
        rgb = to_uint8(img)
        return {"image": rgb, "image_rgba": np.concatenate([rgb, to_uint8(alpha_map(tr))], axis=-1),
                "references": to_uint8(reference_strip(slot.refset.images))}
