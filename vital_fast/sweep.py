"""Bulk sweeps: every channel of a layer (and/or many classes), batch refill, resumable, sharded.

:func:`run_sweep` visualizes a whole layer into one output folder::

    OUT/manifest.json           the run (as :mod:`vital_fast.results` writes it) plus a ``sweep``
                                section: what the sweep is (model fingerprint, layer, targets,
                                settings, seed, images), how far it got
    OUT/targets/<slug>/...      one folder per finished target, written atomically
    OUT/index-rank<R>.jsonl     append-only index: one fsynced line (the target's full record) per
                                finished target, one file per rank
    OUT/.lock                   an exclusive ``flock`` held by the running sweep (rank 0)

**Engine.** A fixed number of *slots* (``batch``) each hold one target with its own image, its own
step counter, its own Adam moments and bias correction, its own random generator and its own
stage of the schedule. Every tick, the occupied slots are stacked (one stack per resolution when
slots sit in different stages of a multi-resolution schedule), run through the network once,
and each slot takes its own Adam step. A slot whose target finishes (its step budget, or with
``early_stop`` a converged loss) is written out and immediately refilled with the next target,
so the batch stays full. The Adam update is written out per slot with the same operations as
``torch.optim.Adam``; per-slot arithmetic never mixes slots, so a target's result does not depend
on its slot or its neighbours, and equals a single-target :func:`vital_fast.optim.visualize` run
with the same seed (bit for bit with ``exact=True``, which turns oneDNN off: oneDNN convolutions
round differently per batch size). The step mirrors the loop of ``visualize`` (transforms, relevance
refresh, losses, priors) and reuses its helpers; ``tests/test_sweep.py`` checks that the two agree.

**Resume.** A target counts as finished only when its folder is in place *and* its index line is
written (the folder first, fsynced, then the line). On resume the index files are read (a torn last
line is ignored), deduplicated, and checked against the folders; everything else is redone (a
folder written but not yet indexed is replaced atomically, debris of interrupted writes removed). Each
target's seed is ``Target.seed(sweep seed)``, so redoing a target gives the same result; the
results of an interrupted and resumed sweep equal an uninterrupted run's.

**Scale-out.** Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same engine on its own
device (``cuda:LOCAL_RANK`` for ``device="cuda"``). Rank 0 takes the lock, checks the folder and
broadcasts which targets are finished; ranks then *claim* pending targets one at a time from an atomic
counter in the rendezvous store, so fast ranks take more (dynamic balancing, no duplicates). Each
rank appends to its own index file; rank 0 reports progress, rewrites the manifest at intervals
and merges all ranks after the final barrier. The gloo backend is used for the few collectives
(no tensors are exchanged), so this also runs on CPU processes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from vital_fast._version import __version__
from vital_fast.optim.presets import Settings, get_preset
from vital_fast.optim.regularizers import image_priors, lr_factor
from vital_fast.optim.targets import Target
from vital_fast.models.facts import check_resolution, check_size, check_targets, layer_table, plan_layers_before
from vital_fast.references.cache import DiskCache
from vital_fast.runfolder import FolderLock, identity_diff
from vital_fast.references.images import ImageSet, imagenet_labels, list_image_files, load_images

__all__ = ["SweepSummary", "parse_index_spec", "read_index", "run_sweep", "single_stage", "sweep_identity"]

ENGINE_VERSION = 1
LOCK = ".lock"
INDEX_PREFIX = "index-rank"

ProgressFn = Callable[[Dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def parse_index_spec(spec: Union[None, str, int, Sequence[int]], n: Optional[int], what: str) -> List[int]:
    """``"all"``, ``"0-511"``, ``"0,3,8-15"`` or a list of ints -> sorted unique indices.

    ``n`` is the number of valid indices (``None``: unknown, "all" not allowed). Raises
    ValueError for a malformed spec, an empty one or an index outside ``0..n-1``.
    """
    if spec is None:
        spec = "all"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            if n is None:
                raise ValueError(f"{what}: 'all' needs a known count")
            return list(range(n))
        out = set()
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise ValueError(f"{what}: bad range {part!r} in {spec!r}; use e.g. 0-511, 0,3,8-15 or all"
                                 ) from None
        vals = sorted(out)
    else:
        vals = sorted({int(v) for v in spec})
    if not vals:
        raise ValueError(f"{what}: no indices given ({spec!r})")
    if vals[0] < 0 or (n is not None and vals[-1] >= n):
        bad = [v for v in vals if v < 0 or (n is not None and v >= n)]
        rng = f"{bad[0]}" if len(bad) == 1 else f"{bad[0]}..{bad[-1]} ({len(bad)} indices)"
        raise ValueError(f"{what}: {rng} outside the valid range 0-{(n or 0) - 1}")
    return vals


def single_stage(settings: Settings) -> Settings:
    """The schedule collapsed to one resolution: the last stage's scale for the total step budget.

    With several stages, slots in different stages cannot share a stack, so a refilled batch runs
    one (smaller) pass per stage each tick; one resolution keeps every slot in one stack.
    """
    return settings.replace(stages=[(settings.stages[-1][0], settings.steps)])


def _compact(vals: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    out, i = [], 0
    vals = list(vals)
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)


def _canon(obj: Any) -> Any:
    """JSON round trip (tuples -> lists), so identities compare the same before and after a file."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """fsync every file of a freshly written target folder, the folder and its parent."""
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)
    _fsync_dir(os.path.dirname(folder))


def _listing_digest(root: str, files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            size = os.path.getsize(f)
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(f, root)}|{size}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Distributed plumbing (no-ops in a single process)
# --------------------------------------------------------------------------------------------


class _Dist:
    """Rank, world, barrier, rank-0 broadcast and an atomic work counter in the rendezvous store."""

    def __init__(self, timeout_s: float) -> None:
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.owns_group = False
        self.store = None
        self.base_store = None
        self._local = {"next": 0, "done": 0}
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        import torch.distributed as dist

        self.dist = dist
        if dist.is_available() and (dist.is_initialized() or env_world > 1):
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.base_store = _get_default_store()
            except Exception:  # pragma: no cover - private API moved: fall back to static sharding
                self.base_store = None

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def open_queue(self, nonce: str) -> None:
        if self.active and self.base_store is not None:
            from torch.distributed import PrefixStore

            self.store = PrefixStore(f"vital_fast_sweep/{nonce}/", self.base_store)

    def claim(self, n_pending: int, claimed_static: List[int]) -> Optional[int]:
        """The next pending target's position, or None when the queue is empty."""
        if not self.active:
            i = self._local["next"]
            self._local["next"] += 1
        elif self.store is not None:
            i = int(self.store.add("next", 1)) - 1
        else:  # static round-robin
            i = self.rank + self.world * len(claimed_static)
        if i >= n_pending:
            return None
        claimed_static.append(i)
        return i

    def add_done(self, k: int) -> int:
        if self.active and self.store is not None:
            return int(self.store.add("done", k))
        self._local["done"] += k
        return self._local["done"]

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Folder: lock, identity, index, manifest
# --------------------------------------------------------------------------------------------


_Lock = FolderLock  # one lock for every writer of a run folder (vital_fast.runfolder)


def sweep_identity(manifest: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The identity of the sweep a manifest belongs to (None when it is not a sweep)."""
    sw = manifest.get("sweep") if isinstance(manifest, Mapping) else None
    return sw.get("identity") if isinstance(sw, Mapping) else None


def _identity_id(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_canon(ident), sort_keys=True).encode()).hexdigest()[:16]


_FIELD_NAMES = {"fingerprint": "model weights", "layer": "layer", "channels": "channels", "classes": "classes",
                "settings": "settings", "seed": "seed", "size": "size", "images": "images",
                "class_layers": "class layers", "exact": "--exact", "early_stop": "--early-stop",
                "engine": "engine version", "model": "model"}


def _identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    return identity_diff(old, new, _FIELD_NAMES)


def _index_path(out: str, rank: int) -> str:
    return os.path.join(out, f"{INDEX_PREFIX}{rank}.jsonl")


def read_index(out_dir: str, sweep_id: Optional[str] = None, verify: bool = True) -> Dict[str, Dict[str, Any]]:
    """Finished targets of a sweep folder: key -> record, from every rank's index file.

    A torn last line (a crash mid-write) is ignored; duplicates keep the last line; with
    ``verify`` a record counts only when every file it lists is in place and non-empty.
    """
    recs: Dict[str, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, f"{INDEX_PREFIX}*.jsonl"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().split("\n")
        except OSError:
            continue
        for line in lines[:-1]:  # the last element has no newline: torn or empty
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "key" not in rec:
                continue
            if sweep_id is not None and rec.get("sweep") != sweep_id:
                continue
            recs[rec["key"]] = rec
    if verify:
        ok = {}
        for k, rec in recs.items():
            files = rec.get("files") or {}
            paths = [os.path.join(out_dir, p) for p in files.values()]
            paths.append(os.path.join(out_dir, "targets", rec.get("slug", ""), "result.json"))
            if files and all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in paths):
                ok[k] = rec
        recs = ok
    return recs


class _IndexWriter:
    def __init__(self, out: str, rank: int) -> None:
        path = _index_path(out, rank)
        new = not os.path.exists(path)
        self.fh = open(path, "a+b")
        if not new:  # a torn last line from a crash must not swallow the next record
            self.fh.seek(0, os.SEEK_END)
            if self.fh.tell() > 0:
                self.fh.seek(-1, os.SEEK_END)
                if self.fh.read(1) != b"\n":
                    self.fh.seek(0, os.SEEK_END)
                    self.fh.write(b"\n")
        self.fh.seek(0, os.SEEK_END)
        if new:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            _fsync_dir(out)

    def append(self, rec: Dict[str, Any]) -> None:
        self.fh.write((json.dumps(rec, default=str) + "\n").encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What :func:`run_sweep` did."""

    out_dir: str
    total: int                 # targets in the sweep
    done_before: int           # finished before this run (resume)
    done_now: int              # finished by this run, all ranks
    done_here: int             # finished by this rank
    elapsed_s: float
    rank: int = 0
    world: int = 1
    sweep_id: str = ""
    manifest: Optional[Dict[str, Any]] = None
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def targets_per_hour(self) -> float:
        return 3600.0 * self.done_now / max(1e-9, self.elapsed_s)


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


# --------------------------------------------------------------------------------------------
# run_sweep
# --------------------------------------------------------------------------------------------


def _label(t: Target, names: Sequence[str]) -> str:
    if t.kind == "class":
        return f"{t.index} {names[t.index]}" if t.index < len(names) else t.key
    return f"{t.layer} channel {t.index}"


def _layer_channels(loaded, layer: str) -> int:
    from vital_fast.models import resolve_layer

    resolve_layer(loaded.model, layer)  # unknown name: ValueError with the closest names
    shapes = {d["name"]: d["shape"] for d in layer_table(loaded)}
    shape = shapes.get(layer)
    if shape is None:
        raise ValueError(f"layer {layer!r} produces no tensor output")
    if len(shape) < 2:
        raise ValueError(f"layer {layer!r} has no spatial channels (output shape {tuple(shape)}); choose a "
                         f"convolutional or token layer")
    return int(shape[-1] if loaded.channel_dim_of(layer) == -1 else shape[0])


def run_sweep(
    model,
    images: Union[str, ImageSet],
    out_dir: str,
    *,
    layer: Optional[str] = None,
    channels: Union[None, str, Sequence[int]] = None,
    classes: Union[None, str, Sequence[int]] = None,
    preset: str = "fast",
    settings: Optional[Settings] = None,
    seed: int = 0,
    size: Optional[int] = None,
    batch: int = 8,
    refill: bool = True,
    early_stop: Optional[float] = None,
    early_stop_window: Optional[int] = None,
    exact: bool = False,
    resume: bool = False,
    force: bool = False,
    cache: Optional[DiskCache] = None,
    device: Union[str, torch.device, None] = None,
    class_layers: Optional[Sequence[Tuple[str, float]]] = None,
    class_images: Optional[Mapping[int, Any]] = None,
    progress: Optional[ProgressFn] = None,
    manifest_every: float = 60.0,
    dist_timeout: float = 6 * 3600.0,
    extra: Optional[Dict[str, Any]] = None,
) -> SweepSummary:
    """Visualize every requested channel of ``layer`` (and/or ``classes``) into ``out_dir``.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        The network (:func:`vital_fast.models.load_model`).
    images : str or ImageSet
        A folder: every image under it is a candidate for the channels' top-k mining (one pass for
        all channels, cached), and class ``c`` reads the subfolder ``c/`` (or its WordNet id). Or an
        :class:`ImageSet` (the mining pool; classes then come from ``class_images``).
    out_dir : str
        The sweep folder (see the module docstring).
    layer : str, optional
        The layer whose channels are swept; ``channels`` defaults to all of them.
    channels, classes : "all", "0-511", "0,3,8-15" or a list of ints
        Which channels of ``layer`` and which classes.
    preset, settings : the optimizer settings (``settings`` overrides ``preset`` whole). A
        multi-resolution schedule is followed per slot: slots in different stages run as separate
        stacks in the same tick.
    seed : int
        The sweep seed; target ``t`` uses ``t.seed(seed)``, as :func:`visualize` does.
    batch : int
        Slots optimized together.
    refill : bool
        Refill a slot as soon as its target finishes (default). False: classic fixed batches, the
        next batch starts when the whole batch is done (for comparison).
    early_stop : float, optional
        Finish a target in its last stage once the mean loss of its last ``early_stop_window``
        steps (default: a tenth of the steps, at least 5) improved by less than this fraction on the
        window before.
    exact : bool
        Turn oneDNN off (and cuDNN to deterministic): a target's image is bit-identical whatever its
        batch neighbours, slot, rank or number of ranks (slower convolutions).
    resume : bool
        Continue the sweep in ``out_dir``: finished targets are kept, the rest is done. Refused
        when ``out_dir`` holds a different sweep.
    force : bool
        Start over in a non-empty folder (its index is cleared; target folders are replaced as
        they are redone).
    cache : DiskCache, optional
        Prototype and top-k cache (default: the user cache folder).
    device : optional
        ``"cpu"``, ``"cuda"`` (under torchrun: ``cuda:LOCAL_RANK``) or a device.
    class_layers : optional
        Matched layers of class targets (and candidates for channel targets), default the family's.
    progress : callable, optional
        Called on rank 0 as ``progress(info)`` with ``done``, ``total`` (this run's), ``rate_per_min``,
        ``eta_s``, ``done_before``, ``elapsed_s``.
    manifest_every : float
        Seconds between manifest rewrites on rank 0 while running.

    Returns
    -------
    SweepSummary

    Raises
    ------
    ValueError
        Unknown layer, channels or classes out of range, a layer without channels, missing
        images, a non-empty folder without ``resume``/``force``, a ``resume`` of a folder made by a
        different sweep, a folder in use by another sweep. Nothing in the folder is changed then.
    """
    t_start = time.perf_counter()
    dist = _Dist(dist_timeout)
    try:
        plan = _make_plan(model, images, layer, channels, classes, preset, settings, seed, size, batch, early_stop,
                          early_stop_window, exact, device, class_layers, class_images, dist)
        cache = cache if cache is not None else DiskCache()
        header = {"model_name": plan.loaded.name, "fingerprint": plan.loaded.fingerprint,
                  "settings": plan.settings.to_dict(), "seed": int(seed)}
        meta = {"ident": plan.ident, "id": plan.sweep_id, "keys": plan.keys,
                "preset": (extra or {}).get("preset", preset), "batch": batch, "refill": refill, "world": dist.world,
                "extra": extra or {}}
        # ---- rank 0: lock, check and prepare the folder; every rank learns the outcome ----
        lock = _Lock()
        state: Dict[str, Any] = {}
        if dist.rank == 0:
            try:
                state = _prepare_folder(out_dir, plan.ident, plan.sweep_id, resume, force, lock, plan.keys)
                _write_manifest(out_dir, meta, header, {})  # the folder now says which sweep it holds
            except ValueError as exc:
                state = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the other ranks must not wait on the broadcast
                state = {"error": f"{type(exc).__name__}: {exc}", "fatal": True}
        state = dist.broadcast(state)
        if "error" in state:
            lock.release()
            raise (RuntimeError if state.get("fatal") else ValueError)(state["error"])
        try:
            done_before = set(state["done"])
            pending = [t for t in plan.targets if t.key not in done_before]
            dist.open_queue(state["nonce"])
            refs_for = _reference_source(plan, pending, cache, dist)
            engine = _Engine(plan.loaded, plan.settings, seed, plan.final, plan.class_layers, cache, refs_for,
                             early_stop, early_stop_window)
            run = _Run(engine, plan, pending, len(done_before), out_dir, dist, meta, header, progress, manifest_every,
                       t_start)
            run.loop(batch, refill)
        finally:
            lock.release()
        return SweepSummary(out_dir, len(plan.targets), len(done_before), run.global_done, run.done_here,
                            time.perf_counter() - run.t_loop, dist.rank, dist.world, plan.sweep_id, run.manifest,
                            engine_timings(engine, t_start))
    finally:
        dist.close()


@dataclass
class _Plan:
    loaded: Any
    settings: Settings
    targets: List[Target]
    keys: List[str]
    layer: Optional[str]
    class_list: List[int]
    final: int
    class_layers: List[Tuple[str, float]]
    pool: Optional[ImageSet]
    class_src: Dict[int, Any]
    ident: Dict[str, Any]
    sweep_id: str
    exact: bool


def _make_plan(model, images, layer, channels, classes, preset, settings, seed, size, batch, early_stop,
               early_stop_window, exact, device, class_layers, class_images, dist: _Dist) -> _Plan:
    """Validate everything (every rank, before anything is written) and fix the sweep's identity."""
    from vital_fast.models import LoadedModel, default_layers, load_model

    if batch < 1:
        raise ValueError(f"sweep: batch must be >= 1, got {batch}")
    if early_stop is not None and not (early_stop >= 0 and math.isfinite(early_stop)):
        raise ValueError(f"sweep: early_stop must be a fraction >= 0, got {early_stop}")
    if early_stop_window is not None and early_stop_window < 1:
        raise ValueError(f"sweep: early_stop_window must be >= 1, got {early_stop_window}")
    if layer is None and channels is not None:
        raise ValueError("sweep: channels given without a layer")
    if layer is None and classes is None:
        raise ValueError("sweep: nothing to do: give a layer (its channels) and/or classes")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and dist.active:
            dev = torch.device("cuda", dist.local_rank)  # one device per rank
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        loaded = loaded.to(dev)
    settings = settings if settings is not None else get_preset(preset)
    targets: List[Target] = []
    chan_list: List[int] = []
    if layer is not None:
        n_ch = _layer_channels(loaded, layer)
        try:
            chan_list = parse_index_spec(channels, n_ch, "channels")
        except ValueError as exc:
            raise ValueError(f"layer {layer!r} has {n_ch} channels (0-{n_ch - 1}); {exc}") from None
        targets += [Target("channel", c, layer) for c in chan_list]
    class_list: List[int] = []
    if classes is not None:
        class_list = parse_index_spec(classes, loaded.num_classes, "classes")
        targets += [Target("class", c) for c in class_list]
        if settings.class_relevance:
            from vital_fast.models import class_logit_layer

            class_logit_layer(loaded)  # a model without class logits fails here, before any work
    check_targets(loaded, targets)
    final = check_size(size, loaded.input_size)
    for S in sorted({max(16, int(round(sc * final))) for sc, _ in settings.stages}):
        check_resolution(loaded, S)
    cls_layers = [(l, float(w)) for l, w in (class_layers if class_layers is not None else default_layers(loaded))]
    # images: the mining pool (loaded now) and the class folders (checked now, loaded per target)
    class_src: Dict[int, Any] = {}
    pool: Optional[ImageSet] = None
    if isinstance(images, ImageSet):
        pool, listing = images, images.digest()
        missing = [c for c in class_list if class_images is None or c not in class_images]
        if missing:
            raise ValueError(f"sweep: no reference images for class {missing[0]} (pass class_images)")
        class_src = {c: class_images[c] for c in class_list}
    else:
        images = os.fspath(images)
        if not os.path.isdir(images):
            raise ValueError(f"--images: no such folder: {images}")
        files = list_image_files(images)
        listing = _listing_digest(images, files)
        if class_list:
            from vital_fast.references.images import class_image_folder, find_wnid_file

            wn = find_wnid_file(images)  # this folder's own mapping (never put in os.environ)
            for c in class_list:
                src = (class_images or {}).get(c) or class_image_folder(images, c, wn)
                if src is None:
                    raise ValueError(f"no reference images for class:{c}: expected a subfolder "
                                     f"{os.path.join(images, str(c))} (or named by its WordNet id)")
                class_src[c] = src
        if chan_list:
            if not files:
                raise ValueError(f"--images: no image files under {images} to mine channel references from")
            pool = load_images(files, what=f"candidate images under {images}")
    ident = {
        "engine": ENGINE_VERSION, "model": loaded.name, "fingerprint": loaded.fingerprint, "layer": layer,
        "channels": _compact(chan_list), "classes": _compact(class_list), "settings": settings.to_dict(),
        "seed": int(seed), "size": final, "images": listing if pool is None else f"{listing}:{pool.digest()}",
        "class_layers": cls_layers, "exact": bool(exact), "early_stop": early_stop,
        "early_stop_window": early_stop_window if early_stop is not None else None,
    }
    return _Plan(loaded, settings, targets, [t.key for t in targets], layer, class_list, final, cls_layers, pool,
                 class_src, ident, _identity_id(ident), bool(exact))


def _reference_source(plan: _Plan, pending: Sequence[Target], cache: DiskCache, dist: _Dist):
    """Mine the top-k of every pending channel in one pass (rank 0 first, filling a shared cache);
    return ``refs_for(target) -> (reference ImageSet, extra metrics)``, loading lazily per target."""
    from vital_fast.references.mining import channel_reference_images, mine_topk

    loaded, settings = plan.loaded, plan.settings
    topk = None
    pending_ch = [t.index for t in pending if t.kind == "channel"]
    if pending_ch:
        k = min(settings.n_refs, len(plan.pool))
        if dist.rank != 0:
            dist.barrier()
        topk = mine_topk(loaded, plan.layer, plan.pool, pending_ch, k, plan.final, cache)
        if dist.rank == 0:
            dist.barrier()
    row_of = {c: i for i, c in enumerate(topk.channels)} if topk is not None else {}

    def refs_for(t: Target) -> Tuple[ImageSet, Dict[str, Any]]:
        if t.kind == "class":
            src = plan.class_src[t.index]
            return (src if isinstance(src, ImageSet) else load_images(src, what=f"references of {t.key}")), {}
        r = row_of[t.index]
        one = type(topk)(topk.layer, [t.index], topk.index[r:r + 1], topk.score[r:r + 1], topk.loc[r:r + 1],
                         topk.grid, topk.mean_score[r:r + 1])
        rs = channel_reference_images(loaded, one, plan.pool, settings.channel_refs, plan.final)[t.index]
        # the row's own mean (topk.mean_score reduces over all mined channels: its last bits depend on them)
        return rs, {"ref_activation": float(topk.score[r].double().mean())}

    return refs_for


class _Run:
    """The slot loop of one rank: claim, tick, write, report; rank 0 also keeps the manifest."""

    def __init__(self, engine: _Engine, plan: _Plan, pending: List[Target], done_before: int, out: str, dist: _Dist,
                 meta: Dict[str, Any], header: Dict[str, Any], progress: Optional[ProgressFn], manifest_every: float,
                 t_start: float) -> None:
        self.engine, self.plan, self.pending, self.done_before = engine, plan, pending, done_before
        self.out, self.dist, self.meta, self.header = out, dist, meta, header
        self.progress, self.manifest_every, self.t_start = progress, manifest_every, t_start
        self.done_here = self.global_done = 0
        self.manifest: Optional[Dict[str, Any]] = None
        self.t_loop = self.last_manifest = time.perf_counter()
        n = plan.loaded.num_classes
        labels = imagenet_labels() if plan.class_list else []
        self.names = labels if n is not None and n == len(labels) else []

    def report(self) -> None:
        if self.progress is None or self.dist.rank != 0:
            return
        el = time.perf_counter() - self.t_loop
        rate = self.global_done / el * 60 if el > 0 else 0.0
        left = len(self.pending) - self.global_done
        eta = (left / rate * 60) if rate > 0 else float("nan")
        self.progress({"done": self.global_done, "total": len(self.pending), "done_before": self.done_before,
                       "elapsed_s": el, "rate_per_min": rate, "eta_s": eta})

    def maybe_manifest(self) -> None:
        if self.dist.rank == 0 and time.perf_counter() - self.last_manifest >= self.manifest_every:
            _write_manifest(self.out, self.meta, self.header, engine_timings(self.engine, self.t_start))
            self.last_manifest = time.perf_counter()

    def loop(self, batch: int, refill: bool) -> None:
        dist, engine = self.dist, self.engine
        writer = _IndexWriter(self.out, dist.rank)
        slots: List[Optional[_Slot]] = [None] * batch
        claimed: List[int] = []
        finished_ok = False
        try:
            with _exact_flags(self.plan.exact):
                self.report()
                queue_open = True
                while True:
                    free = [i for i, sl in enumerate(slots) if sl is None]
                    if queue_open and free and (refill or len(free) == batch):
                        for i in free:
                            pos = dist.claim(len(self.pending), claimed)
                            if pos is None:
                                queue_open = False
                                break
                            slots[i] = engine.new_slot(self.pending[pos])
                    active = [sl for sl in slots if sl is not None]
                    if not active:
                        break
                    engine.tick(active)
                    for i, sl in enumerate(slots):
                        if sl is not None and sl.done:
                            _write_result(self.out, engine, sl, self.plan.sweep_id, dist.rank, self.names, writer)
                            slots[i] = None
                            self.done_here += 1
                            self.global_done = dist.add_done(1)
                    if dist.rank == 0:
                        if dist.active and self.progress is not None:
                            self.global_done = dist.add_done(0)
                        self.report()
                        self.maybe_manifest()
            if dist.active and dist.rank == 0 and dist.store is not None:
                # rank 0 keeps reporting (and the manifest fresh) while the other ranks finish
                while True:
                    self.global_done = dist.add_done(0)
                    self.report()
                    if self.global_done >= len(self.pending):
                        break
                    self.maybe_manifest()
                    time.sleep(0.2)
            dist.barrier()
            if dist.active:
                self.global_done = dist.add_done(0) if dist.store is not None else self.global_done
            if dist.rank == 0:
                self.manifest = _write_manifest(self.out, self.meta, self.header,
                                                engine_timings(engine, self.t_start), final=True)
                self.report()
            finished_ok = True
        finally:
            writer.close()
            if dist.rank == 0 and not finished_ok:
                try:  # best effort: the index is the truth, the manifest its readable form
                    _write_manifest(self.out, self.meta, self.header, engine_timings(engine, self.t_start))
                except Exception:  # noqa: BLE001
                    pass


def engine_timings(engine: _Engine, t_start: float) -> Dict[str, float]:
    return {"total_s": time.perf_counter() - t_start, "references_s": engine.t_refs, "optimize_s": engine.t_opt,
            "relevance_s": engine.t_lrp, "ticks": engine.ticks, "slot_steps": engine.slot_steps,
            "s_per_target_step": engine.t_opt / max(1, engine.slot_steps)}


class _exact_flags:
    """oneDNN off and cuDNN deterministic while the engine runs (``exact=True``)."""

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.ctx: List[Any] = []

    def __enter__(self):
        if self.exact:
            self.ctx = [torch.backends.mkldnn.flags(enabled=False),
                        torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                                   deterministic=True)]
            import warnings

            with warnings.catch_warnings():  # torch notes that oneDNN TF32 needs an Intel GPU
                warnings.simplefilter("ignore")
                for c in self.ctx:
                    c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self.ctx):
            c.__exit__(*exc)
        return False


def _check_folder(out: str, ident: Dict[str, Any], resume: bool, force: bool) -> None:
    """Read-only: may this sweep write into ``out``? ValueError with the reason if not."""
    from vital_fast.results import MANIFEST, read_manifest

    entries = [e for e in (os.listdir(out) if os.path.isdir(out) else []) if e != LOCK]
    if not entries or force:
        return
    if not resume:
        raise ValueError(f"output folder {out} exists and is not empty; pass --resume to continue the sweep in it, "
                         f"or --force to start it over")
    old = sweep_identity(read_manifest(out)) if os.path.isfile(os.path.join(out, MANIFEST)) else None
    if old is None:
        raise ValueError(f"--resume: {out} is not a sweep folder (no manifest.json with a sweep section); use "
                         f"another --out")
    diff = _identity_diff(old, ident)
    if diff:
        raise ValueError(f"--resume: {out} belongs to a different sweep ({'; '.join(diff[:3])}); use another --out, "
                         f"or --force to start over")


def _prepare_folder(out: str, ident: Dict[str, Any], sweep_id: str, resume: bool, force: bool, lock: _Lock,
                    keys: Sequence[str]) -> Dict[str, Any]:
    """Rank 0: check the folder (read-only), take the lock, check again, clean up, read the finished targets.

    Raises ValueError, before anything is written, for a folder that is not ours to write.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    lock.try_existing(out)  # a running sweep holds it: refuse before looking further
    try:
        _check_folder(out, ident, resume, force)
        lock.take(out)
        _check_folder(out, ident, resume, force)  # again, now that nobody else can change it
    except BaseException:
        lock.release()
        raise
    # --- from here on we own the folder ---
    if force:
        for p in glob.glob(os.path.join(out, f"{INDEX_PREFIX}*.jsonl")):
            os.unlink(p)
    tdir = os.path.join(out, "targets")
    if os.path.isdir(tdir):  # debris of writes interrupted by a crash
        for name in os.listdir(tdir):
            if name.startswith(".tmp-") or name.startswith(".old-"):
                shutil.rmtree(os.path.join(tdir, name), ignore_errors=True)
    done = read_index(out, sweep_id)
    return {"done": [k for k in keys if k in done], "nonce": f"{sweep_id}-{os.getpid()}-{time.time_ns()}"}


def _write_result(out: str, engine: _Engine, sl: _Slot, sweep_id: str, rank: int, names: Sequence[str],
                  writer: _IndexWriter) -> Dict[str, Any]:
    from vital_fast.results import write_target

    t = sl.target
    final = sl.losses[-1] if sl.losses else None
    metrics = {"primary": final, "final_loss": final,
               "initial_loss": sl.losses[0] if sl.losses else None, "steps": len(sl.losses)}
    metrics.update(sl.extra)
    rec = {
        "key": t.key, "kind": t.kind, "index": t.index, "layer": t.layer, "slug": t.slug, "label": _label(t, names),
        "seed": sl.seed, "layers": [[l, w] for l, w in engine.plan(t)],
        "losses": [round(float(v), 6) for v in sl.losses], "final_loss": final,
        "references": list(sl.refset.names), "metrics": metrics, "stopped_early": sl.stopped_early,
        "sweep": sweep_id, "rank": rank, "timings": {"slot_s": round(time.perf_counter() - sl.t0, 3)},
    }
    files = engine.result_files(sl)
    rel = write_target(out, t.slug, files, rec)
    _fsync_tree(os.path.join(out, "targets", t.slug))
    rec["files"] = rel
    writer.append(rec)
    return rec


def _write_manifest(out: str, meta: Dict[str, Any], header: Dict[str, Any], timings: Dict[str, float],
                    final: bool = False) -> Dict[str, Any]:
    """manifest.json from every rank's index (the index is the truth; this is its readable form)."""
    from vital_fast.report.images import make_grid, to_uint8, write_png_atomic
    from vital_fast.results import MANIFEST, MANIFEST_FORMAT, write_json_atomic

    done = read_index(out, meta["id"])
    order = {k: i for i, k in enumerate(meta["keys"])}
    recs = sorted((r for k, r in done.items() if k in order), key=lambda r: order[r["key"]])
    ident = meta["ident"]
    m: Dict[str, Any] = {
        "tool": "vital_fast", "format": MANIFEST_FORMAT, "version": __version__, "torch": torch.__version__,
        "python": platform.python_version(),
        "model": {"name": header["model_name"], "fingerprint": header["fingerprint"]},
        "settings": header["settings"], "seed": header["seed"], "preset": meta.get("preset"), "method": "vital",
        **{k: v for k, v in (meta.get("extra") or {}).items() if k not in ("preset",)},
        "sweep": {
            "id": meta["id"], "identity": ident, "layer": ident["layer"], "channels": ident["channels"],
            "classes": ident["classes"], "total": len(meta["keys"]), "done": len(recs),
            "complete": len(recs) == len(meta["keys"]), "batch": meta.get("batch"), "refill": meta.get("refill"),
            "ranks": meta.get("world"), "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "targets": recs, "timings": timings,
    }
    if final and 0 < len(recs) <= 64:
        from PIL import Image

        thumbs = []
        for r in recs:
            with Image.open(os.path.join(out, r["files"]["image"])) as im:
                arr = np.asarray(im.convert("RGB").resize((96, 96)), dtype=np.float32) / 255.0
            thumbs.append(torch.from_numpy(arr).permute(2, 0, 1))
        write_png_atomic(to_uint8(make_grid(torch.stack(thumbs))), os.path.join(out, "grid.png"))
        m["grid"] = "grid.png"
    write_json_atomic(m, os.path.join(out, MANIFEST))
    return m
