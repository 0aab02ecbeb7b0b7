"""What a sweep folder records: the sweep's identity, the append-only per-rank index files (the
journal of finished targets), the manifest written from them, and the fsync helpers that make a
finished target durable before it is indexed. See :mod:`vital_fast.sweep` for the folder layout."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from vital_fast._version import __version__
from vital_fast.runfolder import identity_diff


ENGINE_VERSION = 2  # the sweep identity's version (2: every setting and key always recorded)
INDEX_PREFIX = "index-rank"


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


def _write_manifest(out: str, meta: Dict[str, Any], header: Dict[str, Any], timings: Dict[str, float],
                    final: bool = False) -> Dict[str, Any]:
    """manifest.json from every rank's index (the index is the truth; this is its readable form)."""
    from vital_fast.report.pngs import labelled_grid, write_png_atomic
    from vital_fast.results import MANIFEST, MANIFEST_FORMAT, write_json_atomic

    done = read_index(out, meta["id"])
    order = {k: i for i, k in enumerate(meta["keys"])}
    recs = sorted((r for k, r in done.items() if k in order), key=lambda r: order[r["key"]])
    ident = meta["ident"]
    created = meta.get("created")
    if created is None:  # when the sweep was first written: kept across rewrites and resumes
        try:
            with open(os.path.join(out, MANIFEST), encoding="utf-8") as fh:
                old = json.load(fh)
            if (old.get("sweep") or {}).get("id") == meta["id"]:
                created = old.get("created")
        except (OSError, ValueError):
            pass
        created = meta["created"] = created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    m: Dict[str, Any] = {
        "tool": "vital_fast", "format": MANIFEST_FORMAT, "version": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "created": created,
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

        tiles = []
        for r in recs:
            with Image.open(os.path.join(out, r["files"]["image"])) as im:
                tiles.append(np.asarray(im.convert("RGB").resize((96, 96)), dtype=np.uint8))
        labels = [r.get("label") or r.get("key", "") for r in recs]
        write_png_atomic(labelled_grid(tiles, labels, 96), os.path.join(out, "grid.png"))
        m["grid"] = "grid.png"
    write_json_atomic(m, os.path.join(out, MANIFEST))
    return m
