"""VITAL's objective: sort matching of each target's features against its reference prototypes,
relevance-weighted for channel targets (:class:`SortMatch`), and the grouped loss it evaluates."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.models import class_logit_layer, default_layers
from vital_fast.models.facts import check_matched_layers, plan_layers_before
from vital_fast.ops import lrp_weight, sort_match_loss
from vital_fast.optim.objectives import Objective
from vital_fast.optim.targets import Target
from vital_fast.oracle import math_dtype, resample_quantiles
from vital_fast.references.cache import DiskCache

# The relevance modules are imported where used: they load zennit (about 1 s at start-up), which only relevance
# needs.

__all__ = ["SortMatch", "build_groups", "matching_loss"]


class SortMatch(Objective):
    """VITAL's loss: per element, the weighted sum over its matched layers of the sort-matching loss
    against its target's prototypes (class targets), or of the relevance-weighted loss (channel
    targets, and class targets with ``settings.class_relevance``), with prototypes recomputed at each
    stage's resolution (:mod:`vital_fast.references.prototypes`, cached on disk).

    ``class_layers``: the matched layers of class targets (default: the family's preset);
    ``settings``: the run's :class:`~vital_fast.optim.Settings` (references, relevance).
    """

    name = "sort_match"
    needs_references = True

    def __init__(self, settings, class_layers: Optional[Sequence[Tuple[str, float]]] = None, cache=None) -> None:
        self.settings = settings
        self.class_layers = list(class_layers) if class_layers is not None else None
        self.cache = cache
        self._logit: Optional[str] = None
        self._groups: Dict[int, Tuple[tuple, Dict[tuple, list]]] = {}
        self._shared = None  # the SharedRelevance of the step now running (its starts name their slots)
        self._unshared: set = set()  # layers whose module runs more than once: their starts never share

    def setup(self, engine, targets):
        if self.cache is None:
            self.cache = DiskCache()
        if self.class_layers is None:
            self.class_layers = list(default_layers(engine.loaded))

        check_matched_layers(engine.loaded, self.class_layers)
        if self.settings.class_relevance and any(not t.is_unit for t in targets):
            self._logit_layer(engine)  # a model without class logits fails here, before any work

    def _logit_layer(self, engine) -> str:
        if self._logit is None:
            self._logit = class_logit_layer(engine.loaded)
        return self._logit

    def plan(self, engine, target, stage: Optional[int] = None):
        """The (layer, weight) pairs a target is matched at; ``stage``: at that stage of the schedule (a unit's
        later layers only in its first ``channel_later_stages`` stages), ``None``: at any of them."""
        head, later = self._plan_parts(engine, target, stage)
        return head + later

    def _plan_parts(self, engine, target, stage: Optional[int]):
        """A target's plan in two parts: the layers up to a unit's own, and those after it
        (``channel_later_weight``)."""
        if not target.is_unit:
            return list(self.class_layers), []
        plan = plan_layers_before(engine.loaded, target.layer, self.class_layers, self.settings.channel_stem_weight)
        w = float(getattr(self.settings, "channel_target_weight", 0.0) or 0.0)
        if w > 0 and all(l != target.layer for l, _ in plan):
            plan.append((target.layer, w))
        later = float(self.settings.channel_later_weight)
        stages = int(self.settings.channel_later_stages)
        if not (later > 0 and (stage is None or stages == 0 or stage < stages)):
            return plan, []
        have = {l for l, _ in plan} | {target.layer}
        after = [(l, later) for l, _ in self.class_layers if l not in have]
        n = int(self.settings.channel_later_layers)
        return plan, (after[:n] if n > 0 else after)

    def enter_stage(self, engine, slot):
        from vital_fast.references.prototypes import channel_references, class_references

        t0 = time.perf_counter()
        t, S, s = slot.target, engine.sizes[slot.stage], self.settings
        head, after = self._plan_parts(engine, t, slot.stage)
        plan = head + after
        if not t.is_unit:
            r = class_references(engine.loaded, t.key, slot.refset, plan, S, s, slot.seed, self.cache)
        else:
            rs = slot.refset.subset(range(min(len(slot.refset), s.n_refs)))
            unit = t.unit_at(S, engine.loaded.input_size)
            r = channel_references(engine.loaded, t.key, t.layer, unit, rs, record_layers=plan, size=S, settings=s,
                                   cache=self.cache)
        slot.state["refs"] = r
        slot.state["rel"] = {}
        slot.state["every"] = None
        every = int(self.settings.channel_later_every)
        later = {l for l, _ in after} if every > 1 else set()
        if later and len(later) < len(r.layers):  # the later layers at every N-th step, at N times their weight
            on = dataclasses.replace(r, layers=[(l, w * every if l in later else w) for l, w in r.layers])
            off = dataclasses.replace(r, layers=[(l, w) for l, w in r.layers if l not in later])
            slot.state["every"] = (every, on, off)
        engine.t_refs += time.perf_counter() - t0

    @staticmethod
    def _step_refs(slot):
        """What the slot is matched against at this step: its references, without the later layers at the steps
        ``channel_later_every`` skips."""
        e = slot.state.get("every")
        if e is None:
            return slot.state["refs"]
        return e[1] if slot.step % e[0] == 0 else e[2]

    def layers(self, slots):
        return sorted({l for sl in slots for l, _ in self._step_refs(sl).layers})

    def _groups_for(self, ctx) -> list:
        refs = [self._step_refs(sl) for sl in ctx.slots]
        key = tuple((sl.uid, sl.stage) for sl in ctx.slots)
        entry = self._groups.get(ctx.size)
        if entry is None or entry[0] != key:  # one entry per side, for the slots now on it
            entry = self._groups[ctx.size] = (key, {})
        # per pattern of steps with and without the later layers (channel_later_every): at most N of them
        pattern = tuple(id(r) for r in refs)
        groups = entry[1].get(pattern)
        if groups is None:
            groups = entry[1][pattern] = build_groups(ctx.targets, refs, ctx.view.device,
                                                      keep_bytes=self.settings.resample_cache_mb * 2 ** 20)
        return groups

    def _due(self, slots) -> List[int]:
        every = max(1, self.settings.lrp_every)
        return [i for i, sl in enumerate(slots) if sl.state["refs"].importance and sl.step % every == 0]

    def _by_start(self, engine, slots, idx: Sequence[int]) -> Dict[str, List[int]]:
        """The slots ``idx`` grouped by the layer their relevance starts from (a unit's layer, or the logits)."""
        out: Dict[str, List[int]] = {}
        for i in idx:
            t = slots[i].target
            out.setdefault(t.layer or self._logit_layer(engine), []).append(i)  # a class: the logits
        return out

    @staticmethod
    def _keep(slots, members: Sequence[int], maps: Dict[str, torch.Tensor]) -> None:
        """Row j of each map is the relevance of slot ``members[j]``."""
        for j, i in enumerate(members):
            slots[i].state["rel"] = {l: m[j:j + 1] for l, m in maps.items()}

    def forward_pass(self, engine, slots):
        """The step's relevance from its own forward pass (:class:`~vital_fast.references.shared_relevance.SharedRelevance`):
        for each start layer whose due slots are at least half the batch (a sweep over the whole batch
        costs the same however many rows it explains). None when nothing is due, the composite or family
        cannot share (ViTs, stock composites), the network runs compiled, or views repeat elements."""
        from vital_fast.references.shared_relevance import SharedRelevance, shares_forward

        self._shared = None
        need = self._due(slots)
        model = engine.loaded.model
        if (not need or not self.settings.share_forward or engine.compile_backend is not None or engine.recipe.views.repeat != 1
                or not shares_forward(model, engine.loaded.family, self.settings.lrp_composite)):
            return None
        S = engine.sizes[slots[0].stage]  # the step's side (the engine stacks slots of one side)
        starts = []
        for layer, idx in self._by_start(engine, slots, need).items():
            rec = [l for l, _ in slots[idx[0]].state["refs"].layers]
            if 2 * len(idx) < len(slots) or self._unshared.intersection([layer, *rec]):
                continue
            chans, locs = unit_starts([slots[i].target for i in idx], S, engine.loaded.input_size, "cpu")
            starts.append((layer, idx, chans, rec, locs))
        if not starts:
            return None
        low = torch.bfloat16 if self.settings.rules_dtype == "auto" and engine.amp is torch.bfloat16 else None
        self._shared = SharedRelevance(model, engine.loaded.family, self.settings.lrp_composite, starts, rule_dtype=low)
        return self._shared

    def __call__(self, ctx):
        slots, engine = ctx.slots, ctx.engine
        groups = self._groups_for(ctx)
        need = self._due(slots)
        shared, self._shared = self._shared, None
        if shared is not None and shared.repeated:
            self._unshared.update(shared.repeated)  # later steps go straight to the second forward
        if shared is not None and shared.ran:
            tl = time.perf_counter()
            done = set()
            for maps, (_, idx, *_rest) in zip(shared.maps(len(slots)), shared.starts):
                self._keep(slots, idx, maps)
                done.update(idx)
            need = [i for i in need if i not in done]
            engine.t_lrp += time.perf_counter() - tl
        if need:
            tl = time.perf_counter()
            self._relevance(engine, ctx.view, slots, need)
            engine.t_lrp += time.perf_counter() - tl

        def relevance(gi, g):
            members = g["rows"]  # host-side indices: no device read
            return {l: torch.cat([slots[i].state["rel"][l] for i in members]) for l, _ in g["layers"]}

        if engine.compile_backend is not None:  # --compile: the loss compiled too (no graph break: vital_fast.ops.library)
            return compiled_matching_loss(engine, groups, ctx.features, relevance, len(slots), ctx.view.device)
        return matching_loss(engine.loaded, groups, ctx.features, relevance, len(slots), ctx.view.device)

    def _relevance(self, engine, xt: torch.Tensor, slots, need: Sequence[int]) -> None:
        """Relevance of the transformed synthetic images for the slots due a refresh, per start layer."""
        from vital_fast.references.relevance import relevance_maps

        for layer, members in self._by_start(engine, slots, need).items():
            idx = torch.tensor(members, device=xt.device)
            xs = xt.detach().index_select(0, idx)
            ts = [slots[i].target for i in members]
            chans, locs = unit_starts(ts, xt.shape[-1], engine.loaded.input_size, xt.device)
            rec = [l for l, _ in slots[members[0]].state["refs"].layers]
            self._keep(slots, members, relevance_maps(engine.loaded.model, xs, layer, chans, rec,
                                                      family=engine.loaded.family,
                                                      composite=self.settings.lrp_composite, locations=locs))


def unit_starts(targets: Sequence[Target], size: int, final: int, dev):
    """Where relevance starts for each target (class logits, channels, directions, neurons) as
    :func:`~vital_fast.references.relevance.relevance_maps` takes it: channel indices ``(B,)``, or directions
    ``(B, C)`` when any target is a direction; and ``(B, 2)`` locations when any is a neuron (else None)."""
    if any(t.direction is not None for t in targets):
        c = next(t.direction.channels for t in targets if t.direction is not None)
        chans = torch.stack([t.unit_vector(c) for t in targets]).to(dev)
    else:
        chans = torch.tensor([t.index for t in targets], device=dev)
    locs = None
    if any(t.loc is not None for t in targets):
        locs = torch.tensor([list(t.at_size(size, final).loc) if t.loc is not None else [-1, -1]
                             for t in targets])
    return chans, locs


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
            protos = full_length_prototypes(g, l, f, cd)
            if rel is None:
                lv = sort_match_loss(f, protos, channel_dim=cd, reduction="none", check_values=False)
            else:
                lv = lrp_weight(f, rel[l], protos, g["importance"][l],
                                channel_dim=cd, reduction="none", check_values=False)
            per_elem = per_elem.index_add(0, idx, w * lv)
    return per_elem


def _plain_losses(fs: List[torch.Tensor], protos: List[torch.Tensor], idxs: List[Optional[torch.Tensor]],
                  cds: Tuple[int, ...], ws: Tuple[float, ...], B: int) -> torch.Tensor:
    """The sort-matching part of :func:`matching_loss` (groups without relevance) as one pure function of
    tensors, the one ``--compile`` compiles (``fullgraph=True``: the op is a library operator)."""
    per_elem = torch.zeros(B, device=fs[0].device)
    for f, p, idx, cd, w in zip(fs, protos, idxs, cds, ws):
        lv = sort_match_loss(f if idx is None else f.index_select(0, idx), p, channel_dim=cd, reduction="none",
                             check_values=False)
        per_elem = per_elem + (w * lv if idx is None else torch.zeros_like(per_elem).index_add(0, idx, w * lv))
    return per_elem


def compiled_matching_loss(engine, groups: Sequence[dict], feats: Dict[str, torch.Tensor],
                           relevance: Callable[[int, dict], Dict[str, torch.Tensor]], B: int, dev) -> torch.Tensor:
    """:func:`matching_loss` with its plain sort-matching terms through ``torch.compile`` (the engine's
    backend, cached on the engine); relevance-weighted groups stay eager."""
    loaded = engine.loaded
    fs, protos, idxs, cds, ws = [], [], [], [], []
    rest = []
    for g in groups:
        if g["importance"]:
            rest.append(g)
            continue
        idx = g["index"] if len(g["rows"]) < B else None
        for l, w in g["layers"]:
            f = feats[l]
            cd = loaded.channel_dim_of(l)
            fs.append(f)
            protos.append(full_length_prototypes(g, l, f, cd))
            idxs.append(idx)
            cds.append(cd)
            ws.append(float(w))
    out = torch.zeros(B, device=dev)
    if fs:
        fn = engine._compiled.get("matching_loss")
        if fn is None:
            # not fullgraph: a run's stages and a sweep's batch sizes recompile it (automatic dynamic shapes), and
            # past dynamo's recompile limit it must fall back to eager rather than fail
            fn = engine._compiled["matching_loss"] = torch.compile(_plain_losses, backend=engine.compile_backend)
        out = fn(fs, protos, idxs, tuple(cds), tuple(ws), B)
    if rest:
        out = out + matching_loss(loaded, rest, feats, relevance, B, dev)
    return out


def full_length_prototypes(g: dict, layer: str, f: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The group's prototypes of ``layer`` resampled to the features' row length D, kept with the group for
    the steps that follow (the ops would otherwise resample the same Q quantiles to D points at every step:
    a sixth of a ResNet-50 class step). The same values the op computes; only kept when the op computes in
    the prototypes' dtype and the result is at most the group's ``keep_bytes`` (``Settings.resample_cache_mb``)."""

    protos = g["protos"][layer]
    n, c = f.shape[0], f.shape[channel_dim]
    D = f.numel() // max(1, n * c)
    if protos.shape[-1] == D or math_dtype(f.dtype) != protos.dtype:
        return protos
    if protos.numel() // max(1, protos.shape[-1]) * D * protos.element_size() > g.get("keep_bytes", 0):
        return protos
    cache = g.setdefault("full_length", {})
    hit = cache.get((layer, D))
    if hit is None:
        hit = cache[(layer, D)] = resample_quantiles(protos.detach(), D).contiguous()
    return hit


def build_groups(targets: Sequence[Target], refs: Sequence[Any], dev, keep_bytes: int = 0) -> List[dict]:
    """Batch elements grouped so each group shares its matched layers: all class targets, and the
    channel targets of each target layer. Prototypes are stacked to ``(B_group, C, Q)``; resampled ones up to
    ``keep_bytes`` are kept with the group (:func:`full_length_prototypes`)."""

    groups: Dict[tuple, dict] = {}
    for i, (t, r) in enumerate(zip(targets, refs)):
        gkey = ("unit", t.layer, tuple(r.layers)) if t.is_unit else ("class",)  # channel_later_every: on and off
        g = groups.setdefault(gkey, {"kind": t.kind, "layer": t.layer, "members": [], "layers": r.layers,
                                     "keep_bytes": int(keep_bytes)})
        g["members"].append((i, t, r))
    out = []
    for g in groups.values():
        members = g["members"]
        g["rows"] = [i for i, _, _ in members]
        g["index"] = torch.tensor(g["rows"], device=dev)
        g["channels"] = torch.tensor([t.index for _, t, _ in members], device=dev)
        g["protos"] = {}
        g["importance"] = {}
        for l, _ in g["layers"]:
            ps = [r.prototypes[l] for _, _, r in members]
            q = min(p.shape[-1] for p in ps)
            g["protos"][l] = torch.stack([p if p.shape[-1] == q else resample_quantiles(p, q) for p in ps]).to(dev)
            if all(l in r.importance for _, _, r in members):
                g["importance"][l] = torch.stack([r.importance[l] for _, _, r in members]).to(dev)
        del g["members"]
        out.append(g)
    return out
