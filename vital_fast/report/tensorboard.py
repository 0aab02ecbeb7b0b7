"""Run logging to TensorBoard: ``--log tensorboard DIR`` (the ``tensorboard`` extra).

After each run (``visualize``, ``demo``, ``sweep``, also ``--resume``d ones) the targets that the run folder
holds whole and that were not logged before are written to an event file in ``DIR``: each target's loss at
every step (``loss/<target>``), its image (``image/<target>``) and its references (``references/<target>``).
What was logged is recorded in ``DIR/.vital_fast_logged.json`` (by run folder, the run's creation time and target;
read and rewritten under a lock, ``DIR/.vital_fast_logged.lock``), so a resumed run or a second call adds only
what is new, a run replaced with ``--force`` is logged again, and several runs may share ``DIR`` (the tags carry
the run folder's name).

    tensorboard --logdir DIR
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from filelock import FileLock

from vital_fast.files import atomic_write_bytes
from vital_fast.runfolder import read_manifest

__all__ = ["LOGGERS", "check_log", "log_run_folder"]

LOGGERS = ("tensorboard",)
RECORD = ".vital_fast_logged.json"
LOCK = ".vital_fast_logged.lock"
_EXTRA = "pip install tensorboard (or the extra: pip install 'vital_fast[tensorboard]')"


def check_log(kind: str, folder: str) -> None:
    """Before any work: ``kind`` is a known logger, its package is installed and ``folder`` can be made.

    Raises
    ------
    ValueError
        One line naming the problem (and the extra that installs a missing package).
    """
    if kind not in LOGGERS:
        raise ValueError(f"--log: unknown logger {kind!r}; valid: {', '.join(LOGGERS)}")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(f"--log tensorboard needs the tensorboard package: {_EXTRA}") from None
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--log tensorboard {folder}: exists and is not a folder")


def _read_record(log_dir: str) -> List[str]:
    try:
        with open(os.path.join(log_dir, RECORD), encoding="utf-8") as fh:
            data = json.load(fh)
        return [str(x) for x in data.get("logged", [])] if isinstance(data, dict) else []
    except (OSError, ValueError):
        return []  # none yet, or unreadable: log again rather than lose the run's curves


def _image(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def log_run_folder(run_dir: str, log_dir: str, keys: Optional[Sequence[str]] = None) -> int:
    """Write the finished targets of ``run_dir`` not logged before (only ``keys`` when given) to TensorBoard
    event files in ``log_dir``; returns how many were written."""
    os.makedirs(log_dir, exist_ok=True)
    with FileLock(os.path.join(log_dir, LOCK)):  # another run sharing DIR waits: no record entry is lost
        return _log_locked(run_dir, log_dir, keys)


def _log_locked(run_dir: str, log_dir: str, keys: Optional[Sequence[str]]) -> int:
    from torch.utils.tensorboard import SummaryWriter

    manifest = read_manifest(run_dir)
    run_name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    # the folder and when its run was made: a run replaced with --force in the same folder is another run
    run_id = f"{os.path.abspath(run_dir)}@{manifest.get('created', '')}"
    logged = _read_record(log_dir)
    seen = set(logged)
    wanted = set(keys) if keys is not None else None
    todo = []
    for t in manifest.get("targets", []):
        key, slug = t.get("key"), t.get("slug")
        if not key or not slug or f"{run_id}::{key}" in seen or (wanted is not None and key not in wanted):
            continue
        try:
            with open(os.path.join(run_dir, "targets", slug, "result.json"), encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            continue  # not whole (a crash mid-write): --resume redoes it, and the next call logs it
        todo.append((key, t, rec))
    if not todo:
        return 0
    writer = SummaryWriter(log_dir)
    try:
        for key, t, rec in todo:
            tag = f"{run_name}/{key}"
            for step, value in enumerate(rec.get("losses") or []):
                writer.add_scalar(f"loss/{tag}", float(value), step)
            files = t.get("files") or rec.get("files") or {}
            for name, kind in (("image", "image"), ("references", "references")):
                if files.get(name) and os.path.isfile(os.path.join(run_dir, files[name])):
                    writer.add_image(f"{kind}/{tag}", _image(os.path.join(run_dir, files[name])),
                                     dataformats="HWC")
            logged.append(f"{run_id}::{key}")
        writer.flush()
    finally:
        writer.close()
    atomic_write_bytes(os.path.join(log_dir, RECORD), json.dumps({"logged": logged}, indent=1).encode())
    return len(todo)
