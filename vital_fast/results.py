"""Saving visualization results: images, transparency, references, a grid and a manifest.

The images themselves (PNG encoding, the alpha map, the reference strip, the grid) are made by
:mod:`vital_fast.report.pngs`; this module owns the run folder's layout and its manifest.

A run folder looks like::

    OUT/manifest.json                 package version, model name and fingerprint, settings, seed,
                                      every finished target with the paths of its files, timings
    OUT/grid.png                      all targets side by side, labelled
    OUT/index.html, OUT/pages/*.html  the gallery and a page per target (vital_fast.report.gallery)
    OUT/targets/<slug>/image.png      the visualization
    OUT/targets/<slug>/image_rgba.png the visualization with its transparency map as alpha
    OUT/targets/<slug>/references.png the reference images or patches it was matched against
    OUT/targets/<slug>/ref_00.png ... each of them (up to 16) at a readable size
    OUT/targets/<slug>/result.json    that target's record (the manifest's entry)

Each target folder is written under a temporary name and renamed into place, and the manifest is
replaced atomically after it: an interrupted run leaves complete targets or none.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from vital_fast._version import __version__
from vital_fast.files import atomic_write_bytes
from vital_fast.report.pngs import alpha_map, fit_within, reference_strip, save_png, to_uint8, write_grid
from vital_fast.runfolder import (
    MANIFEST,
    check_identity_version,
    identity_diff,
    identity_of_manifest,
    locked,
    read_manifest,
    run_identity,
)

MANIFEST_FORMAT = 1
MAX_REF_FILES = 16  # reference images written one by one per target (the strip shows up to 8)
REF_SIDE = 224  # their longer side, at most


def write_json_atomic(obj: Any, path: str) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False, default=str).encode("utf-8"))


def _make_dir(parent: str, prefix: str) -> str:
    """A new folder with a unique name, made with the permissions of a plain ``os.mkdir`` (0o777 less
    the umask): ``tempfile.mkdtemp`` would make it 0o700 and a shared gallery unreadable to others."""
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def write_target(out_dir: str, slug: str, files: Dict[str, np.ndarray], record: Dict[str, Any]) -> Dict[str, str]:
    """Write one target's files into ``targets/<slug>/`` atomically; return the relative paths."""
    tdir = os.path.join(out_dir, "targets")
    os.makedirs(tdir, exist_ok=True)
    tmp = _make_dir(tdir, f".tmp-{slug}-")
    rel = {}
    try:
        for name, arr in files.items():
            save_png(arr, os.path.join(tmp, f"{name}.png"))
            rel[name] = f"targets/{slug}/{name}.png"
        record = dict(record, files=rel)
        with open(os.path.join(tmp, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        final = os.path.join(tdir, slug)
        if os.path.exists(final):  # a re-run of this target: swap, then drop the old one
            old = _make_dir(tdir, f".old-{slug}-")
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel


def target_records(result, labels: Optional[Dict[str, str]] = None,
                   annotations: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The manifest entries of a :class:`~vital_fast.optim.VisualizationResult` (without files).

    ``annotations`` maps a target key to extra fields of its record, e.g. ``predictions`` (the
    visualized model's top-5 ``[index, name, probability]``) or ``activation_ratio`` (a channel's
    mean activation on the image over its mean on the references), computed where the model is.
    """
    recs = []
    for i, t in enumerate(result.targets):
        recs.append({**(annotations or {}).get(t.key, {}),
            "key": t.key, "kind": t.kind, "index": t.index, "layer": t.layer, "slug": t.slug,
            "label": (labels or {}).get(t.key, t.key), "seed": result.seeds[i],
            "layers": [[l, w] for l, w in result.layers[i]],
            "losses": [round(float(v), 6) for v in result.losses[i]],
            "final_loss": float(result.losses[i, -1]) if result.losses.shape[1] else None,
            "references": list(result.references[i].names), **t.record(),
        })
    return recs


def run_header(result, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {
        "tool": "vital_fast", "format": MANIFEST_FORMAT, "version": __version__,
        "torch": torch.__version__, "python": platform.python_version(),
        "model": {"name": result.model_name, "fingerprint": result.fingerprint},
        "settings": result.settings.to_dict(), "method": getattr(result, "method", "vital"),
        "precision": getattr(result, "precision", "float32"),
        "threads": torch.get_num_threads(),  # images round differently at another thread count
        **({"loss_scale": result.loss_scale} if getattr(result, "loss_scale", None) else {}),
        **({"param": result.param} if getattr(result, "param", None) else {}), **(extra or {}),
    }


def result_identity(result, seed: Optional[int], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The run identity (:func:`vital_fast.runfolder.run_identity`) of a result saved with ``extra``."""
    extra = extra or {}
    return run_identity(model=result.model_name, fingerprint=result.fingerprint, method=extra.get("method", getattr(result, "method", "vital")),
                        seed=seed if seed is not None else -1, settings=result.settings.to_dict(),
                        size=extra.get("size"), preset=extra.get("preset"))


def save_run(result, out_dir: str, *, seed: Optional[int] = None, labels: Optional[Dict[str, str]] = None) -> str:
    """:func:`save_result`, then the folder's HTML gallery (as ``vital-fast visualize`` writes them); returns the
    gallery's ``index.html``."""
    from vital_fast.report.gallery import build_gallery

    save_result(result, out_dir, seed=seed, labels=labels)
    return build_gallery(out_dir)


def save_result(result, out_dir: str, *, labels: Optional[Dict[str, str]] = None, seed: Optional[int] = None,
                extra: Optional[Dict[str, Any]] = None,
                annotations: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Write a result into ``out_dir`` (targets, grid, manifest); merge with targets already there.

    The folder's lock is held while writing (a folder in use by another run is refused), and a
    folder holding a different run (another model, method, seed or settings) is refused with a
    ValueError naming what differs, before anything is written. Returns the manifest written.
    """
    os.makedirs(out_dir, exist_ok=True)
    with locked(out_dir):
        return _save_result_locked(result, out_dir, labels=labels, seed=seed, extra=extra, annotations=annotations)


def _save_result_locked(result, out_dir, *, labels, seed, extra, annotations=None) -> Dict[str, Any]:
    identity = (extra or {}).get("run") or result_identity(result, seed, extra)
    manifest = None
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        manifest = read_manifest(out_dir)  # a manifest we cannot read is never replaced by a partial one
        if manifest.get("sweep") is not None:
            raise ValueError(f"{out_dir} holds a sweep; save this result into another folder")
        check_identity_version(identity_of_manifest(manifest), out_dir, "save")
        diff = identity_diff(identity_of_manifest(manifest), identity)
        if diff:
            raise ValueError(f"{out_dir} holds a different run ({'; '.join(diff[:3])}); save into another folder")
    header = run_header(result, dict(extra or {}, seed=seed, run=identity))
    if manifest is None:
        manifest = dict(header, targets=[], timings={})
    else:
        manifest.update({k: v for k, v in header.items() if k not in ("targets",)})
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # when the run was first saved
    records = target_records(result, labels, annotations)
    by_key = {r["key"]: r for r in manifest.get("targets", [])}
    for i, rec in enumerate(records):
        files = {
            "image": to_uint8(result.images[i]),
            "image_rgba": np.concatenate([to_uint8(result.images[i]), to_uint8(alpha_map(result.transparency[i]))], axis=-1),
            "references": to_uint8(reference_strip(result.references[i].images)),
        }
        # each reference at a readable size, for the target's own page
        for j, ref in enumerate(list(result.references[i].images)[:MAX_REF_FILES]):
            files[f"ref_{j:02d}"] = to_uint8(fit_within(ref, REF_SIDE))
        rec["timings"] = {"s_per_target_step": result.timings.get("s_per_target_step")}
        rec["files"] = write_target(out_dir, rec["slug"], files, rec)
        by_key[rec["key"]] = rec
    manifest["targets"] = list(by_key.values())
    manifest["timings"] = result.timings
    grid = write_grid(out_dir, manifest["targets"], thumb=160)
    if grid:
        manifest["grid"] = grid
    write_json_atomic(manifest, os.path.join(out_dir, MANIFEST))
    return manifest
