"""An on-disk cache of computed references (prototypes, relevance weights, top-k lists).

Entries are keyed by a hash of everything that determines them (model fingerprint, layer, target,
image hashes, settings). A write goes to a temporary file in the same folder, is flushed and
fsynced, and is renamed into place: an interrupted write never leaves an entry that a later run
trusts. A corrupt or unreadable entry is treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, Optional

import torch

_ENV = "VITAL_FAST_CACHE"
_FORMAT = 1


def default_cache_dir() -> str:
    """``$VITAL_FAST_CACHE``, else ``$XDG_CACHE_HOME/vital_fast``, else ``~/.cache/vital_fast``."""
    if os.environ.get(_ENV):
        return os.environ[_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vital_fast")


def cache_key(parts: Dict[str, Any]) -> str:
    """A stable hash of a JSON-able description of what an entry depends on."""
    blob = json.dumps({"format": _FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class DiskCache:
    """A folder of ``<key>.pt`` entries; ``cache_dir=None`` gives a cache that stores nothing."""

    def __init__(self, cache_dir: Optional[str] = None, enabled: bool = True) -> None:
        self.dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.dir, kind, f"{key}.pt")

    def get(self, kind: str, key: str) -> Optional[Any]:
        if not self.enabled:
            return None
        p = self.path(kind, key)
        if not os.path.isfile(p):
            return None
        try:
            entry = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise ValueError("key mismatch")
            return entry["value"]
        except Exception as exc:  # a truncated or foreign file: recompute, never trust it
            warnings.warn(f"vital_fast cache: ignoring unreadable entry {p} ({type(exc).__name__})", stacklevel=2)
            return None

    def put(self, kind: str, key: str, value: Any) -> None:
        if not self.enabled:
            return
        try:
            atomic_torch_save({"key": key, "value": value}, self.path(kind, key))
        except OSError as exc:
            warnings.warn(f"vital_fast cache: could not write {self.path(kind, key)} ({exc})", stacklevel=2)

    def get_or_compute(self, kind: str, parts: Dict[str, Any], compute: Callable[[], Any]) -> Any:
        key = cache_key({"kind": kind, **parts})
        value = self.get(kind, key)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = compute()
        self.put(kind, key, value)
        return value
