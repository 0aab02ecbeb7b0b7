"""An on-disk cache of computed references (prototypes, relevance weights, top-k lists).

Entries are keyed by a hash of everything that determines them (model fingerprint, layer, target,
image hashes, settings). A write goes to a temporary file in the same folder, is flushed and
fsynced, and is renamed into place: an interrupted write never leaves an entry that a later run
trusts. Files are created with the permissions a plain ``open()`` gives (``0o666`` less the umask),
so a shared run folder or gallery is readable by whoever may read the folder.

Entries are validated on read: the stored key and settings (the key's parts) must match, and the
caller's ``validate`` checks the value (shape, dtype, finite values). A corrupt, unreadable or
invalid entry is never trusted and never fatal: it is dropped with a warning naming its path and
the reason, recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch

from vital_fast.files import atomic_torch_save

_ENV = "VITAL_FAST_CACHE"
_FORMAT = 2  # 2: every key part always present (no per-option shims)


def default_cache_dir() -> str:
    """``$VITAL_FAST_CACHE``, else ``$XDG_CACHE_HOME/vital_fast``, else ``~/.cache/vital_fast``."""
    if os.environ.get(_ENV):
        return os.environ[_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vital_fast")


def _canonical(parts: Dict[str, Any]) -> str:
    return json.dumps({"format": _FORMAT, **parts}, sort_keys=True, default=str)


def cache_key(parts: Dict[str, Any]) -> str:
    """A stable hash of a JSON-able description of what an entry depends on."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:32]


class DiskCache:
    """A folder of ``<key>.pt`` entries; ``cache_dir=None`` gives a cache that stores nothing."""

    def __init__(self, cache_dir: Optional[str] = None, enabled: bool = True) -> None:
        self.dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.dir, kind, f"{key}.pt")

    def _drop(self, p: str, reason: str) -> None:
        warnings.warn(f"vital_fast cache: dropping entry {p} ({reason}); recomputing it", UserWarning,
                      stacklevel=3)
        try:
            os.unlink(p)
        except OSError:
            pass

    def get(
        self,
        kind: str,
        key: str,
        parts: Optional[Dict[str, Any]] = None,
        validate: Optional[Callable[[Any], Union[None, bool, str]]] = None,
    ) -> Optional[Any]:
        """The value stored under ``key``, or ``None`` when missing or not to be trusted.

        With ``parts`` (what the key hashes), an entry that stored different parts is dropped; with
        ``validate``, an entry whose value it rejects (see :meth:`get_or_compute`) is dropped.
        """
        if not self.enabled:
            return None
        p = self.path(kind, key)
        if not os.path.isfile(p):
            return None
        try:
            entry = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise ValueError("key mismatch")
        except Exception as exc:  # a truncated or foreign file: recompute, never trust it
            warnings.warn(f"vital_fast cache: ignoring unreadable entry {p} ({type(exc).__name__})", stacklevel=2)
            return None
        if "value" not in entry:
            self._drop(p, "no value stored")
            return None
        if parts is not None and "parts" in entry and entry["parts"] != _canonical({"kind": kind, **parts}):
            # entries written before the parts were stored have none: their key (a hash of the
            # parts) and the value check below still apply
            self._drop(p, "its stored settings differ from the key's")
            return None
        value = entry["value"]
        reason = _check(validate, value)
        if reason is not None:
            self._drop(p, reason)
            return None
        return value

    def put(self, kind: str, key: str, value: Any, parts: Optional[Dict[str, Any]] = None) -> None:
        if not self.enabled:
            return
        entry = {"key": key, "value": value}
        if parts is not None:
            entry["parts"] = _canonical({"kind": kind, **parts})
        try:
            atomic_torch_save(entry, self.path(kind, key))
        except OSError as exc:
            warnings.warn(f"vital_fast cache: could not write {self.path(kind, key)} ({exc})", stacklevel=2)

    def get_or_compute(
        self,
        kind: str,
        parts: Dict[str, Any],
        compute: Callable[[], Any],
        validate: Optional[Callable[[Any], Union[None, bool, str]]] = None,
    ) -> Any:
        """The cached value for ``parts``, else ``compute()`` (stored for next time).

        ``validate(value)`` checks an entry read back (shape, dtype, finite values): it returns
        ``None`` (or ``True``) when the value is usable, or a string saying what is wrong, or raises.
        A rejected entry is deleted with a warning naming its path and the reason, then recomputed
        and rewritten; it is never trusted and never fatal. A freshly computed value that
        ``validate`` rejects is returned but not stored (with a warning).
        """
        key = cache_key({"kind": kind, **parts})
        value = self.get(kind, key, parts, validate)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = compute()
        reason = _check(validate, value)
        if reason is not None:
            if self.enabled:
                warnings.warn(f"vital_fast cache: not storing a computed {kind} entry ({reason})",
                              UserWarning, stacklevel=2)
            return value
        self.put(kind, key, value, parts)
        return value


def _check(validate: Optional[Callable[[Any], Union[None, bool, str]]], value: Any) -> Optional[str]:
    """``None`` when ``validate`` accepts ``value``; else the reason."""
    if validate is None:
        return None
    try:
        out = validate(value)
    except Exception as exc:  # noqa: BLE001 - a validator's complaint, whatever its type
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if out is None or out is True:
        return None
    return "failed validation" if out is False else str(out)


# Checks for validators ---------------------------------------------------------------------------


def check_tensor(value: Any, what: str, *, ndim: Optional[int] = None, shape: Optional[tuple] = None,
                 floating: bool = True, finite: bool = True) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is a tensor of that rank / shape (``None``
    entries in ``shape`` match anything), floating point and finite as asked."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} is a {type(value).__name__}, not a tensor")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {ndim} dimensions")
    if shape is not None:
        fits = value.dim() == len(shape) and all(s is None or int(v) == int(s) for v, s in zip(value.shape, shape))
        if not fits:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {want}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{what} has dtype {value.dtype}, expected floating point")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
