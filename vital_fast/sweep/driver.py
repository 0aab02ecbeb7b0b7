"""The sweep's driver on top of the engine: :func:`run_sweep` prepares and locks the folder, runs the
slot loop of each rank (claim, tick, write, report), writes each finished target and keeps the manifest."""

from __future__ import annotations

import glob
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vital_fast.optim.presets import Settings
from vital_fast.optim.targets import Target
from vital_fast.references.cache import DiskCache
from vital_fast.runfolder import LOCK_FILES, FolderLock
from vital_fast.references.images import ImageSet
from vital_fast.sweep.dist import _Dist
from vital_fast.sweep.slots import Engine as _Engine, Slot as _Slot, result_files, sweep_engine
from vital_fast.sweep.journal import (INDEX_PREFIX, _fsync_tree, _identity_diff, _IndexWriter, _write_manifest,
                                      read_index, sweep_identity)
from vital_fast.sweep.plan import _make_plan, _Plan, _reference_source


LOCK = ".lock"
ProgressFn = Callable[[Dict[str, Any]], None]

_Lock = FolderLock  # one lock for every writer of a run folder (vital_fast.runfolder)


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
    directions: Any = None,
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
        Which channels of ``layer`` (or rows of ``directions``) and which classes.
    directions : path, Directions or Tensor (N, C), optional
        Sweep these directions in ``layer``'s channel space (e.g. a sparse autoencoder's decoder rows, see
        :mod:`vital_fast.optim.directions`) instead of its channels: one ``direction:LAYER:SOURCE:ROW`` target
        per row; their references are mined by projection in one pass.
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
        plan = _make_plan(model, images, layer=layer, channels=channels, classes=classes, preset=preset,
                          settings=settings, seed=seed, size=size, batch=batch, early_stop=early_stop,
                          early_stop_window=early_stop_window, exact=exact, device=device, class_layers=class_layers,
                          class_images=class_images, dist=dist, directions=directions)
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
            engine = sweep_engine(plan.loaded, plan.settings, seed=seed, final_size=plan.final,
                                  class_layers=plan.class_layers, cache=cache, refs_for=refs_for,
                                  early_stop=early_stop, early_stop_window=early_stop_window, targets=plan.targets)
            header["precision"] = engine.precision
            header["threads"] = torch.get_num_threads()  # images round differently at another thread count
            run = _Run(engine, plan, pending, done_before=len(done_before), out=out_dir, dist=dist, meta=meta,
                       header=header, progress=progress, manifest_every=manifest_every, t_start=t_start)
            run.loop(batch, refill)
        finally:
            lock.release()
        return SweepSummary(out_dir, len(plan.targets), len(done_before), run.global_done, run.done_here,
                            time.perf_counter() - run.t_loop, dist.rank, dist.world, plan.sweep_id, run.manifest,
                            engine_timings(engine, t_start))
    finally:
        dist.close()


class _Run:
    """The slot loop of one rank: claim, tick, write, report; rank 0 also keeps the manifest."""

    def __init__(self, engine: _Engine, plan: _Plan, pending: List[Target], *, done_before: int, out: str,
                 dist: _Dist, meta: Dict[str, Any], header: Dict[str, Any], progress: Optional[ProgressFn],
                 manifest_every: float, t_start: float) -> None:
        self.engine, self.plan, self.pending, self.done_before = engine, plan, pending, done_before
        self.out, self.dist, self.meta, self.header = out, dist, meta, header
        self.progress, self.manifest_every, self.t_start = progress, manifest_every, t_start
        self.done_here = self.global_done = 0
        self.manifest: Optional[Dict[str, Any]] = None
        self.t_loop = self.last_manifest = time.perf_counter()
        self.names = list(plan.loaded.class_names or [])  # the model's own names (models.labels), or none

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
            engine.close()  # a compiled network's hooks come off the model
            writer.close()
            if dist.rank == 0 and not finished_ok:
                try:  # best effort: the index is the truth, the manifest its readable form
                    _write_manifest(self.out, self.meta, self.header, engine_timings(engine, self.t_start))
                except Exception:  # noqa: BLE001
                    pass


def engine_timings(engine: _Engine, t_start: float) -> Dict[str, float]:
    return {"total_s": time.perf_counter() - t_start, "references_s": engine.t_refs, "optimize_s": engine.t_opt,
            "relevance_s": engine.t_lrp, "ticks": engine.ticks, "slot_steps": engine.slot_steps,
            "s_per_target_step": engine.t_opt / max(1, engine.slot_steps),
            **({"compile_s": engine.t_compile} if engine.compile_backend is not None else {})}


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

    entries = [e for e in (os.listdir(out) if os.path.isdir(out) else []) if e not in LOCK_FILES]
    if not entries or force:
        return
    if not resume:
        raise ValueError(f"output folder {out} exists and is not empty; pass --resume to continue the sweep in it, "
                         f"or --force to start it over")
    old = sweep_identity(read_manifest(out)) if os.path.isfile(os.path.join(out, MANIFEST)) else None
    if old is None:
        raise ValueError(f"--resume: {out} is not a sweep folder (no manifest.json with a sweep section); use "
                         f"another --out")
    if old.get("engine") != ident.get("engine"):
        raise ValueError(f"--resume: {out} was written by a vital_fast whose sweep identity is version "
                         f"{old.get('engine')}; this one writes version {ident.get('engine')} and cannot continue it: "
                         f"sweep into a new --out folder, or pass --force to replace it")
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


def _annotation(engine: _Engine, sl: _Slot, rgb: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
    """The visualized model's top-5 of a class target's image, or a channel's activation on its image
    relative to its references (one forward pass; see :mod:`vital_fast.models.predict`)."""
    from vital_fast.models.predict import channel_activation_ratio, top_predictions

    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    t = sl.target
    if not t.is_unit:
        p = top_predictions(engine.loaded, [img], names or None)
        return {"predictions": p[0]} if p else {}
    r = channel_activation_ratio(engine.loaded, t.layer, t.unit_at(), img,
                                 list(sl.refset.images))
    return {} if r is None else {"activation_ratio": r}


def _write_result(out: str, engine: _Engine, sl: _Slot, sweep_id: str, rank: int, names: Sequence[str],
                  writer: _IndexWriter) -> Dict[str, Any]:
    from vital_fast.results import write_target

    t = sl.target
    final = sl.losses[-1] if sl.losses else None
    metrics = {"primary": final, "final_loss": final,
               "initial_loss": sl.losses[0] if sl.losses else None, "steps": len(sl.losses)}
    metrics.update(sl.extra)
    if engine.loss_scale:  # float16: the engine's loss scale and skipped steps when this target finished
        metrics["loss_scale"] = dict(engine.loss_scale)
    rec = {
        "key": t.key, "kind": t.kind, "index": t.index, "layer": t.layer, "slug": t.slug, "label": t.label(names),
        **t.record(),
        "seed": sl.seed, "layers": [[l, w] for l, w in engine.plan(t)],
        "losses": [round(float(v), 6) for v in sl.losses], "final_loss": final,
        "references": list(sl.refset.names), "metrics": metrics, "stopped_early": sl.stopped_early,
        "sweep": sweep_id, "rank": rank, "timings": {"slot_s": round(time.perf_counter() - sl.t0, 3)},
    }
    files = result_files(engine, sl)
    rec.update(_annotation(engine, sl, files["image"], names))
    rel = write_target(out, t.slug, files, rec)
    _fsync_tree(os.path.join(out, "targets", t.slug))
    rec["files"] = rel
    writer.append(rec)
    return rec
