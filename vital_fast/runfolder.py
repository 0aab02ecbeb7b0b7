"""Run folders that refuse what would corrupt them: a lock, an identity, checks before any work.

Every writer of a run folder (``visualize``, ``demo``, sweeps, :func:`vital_fast.results.save_result`)
holds ``OUT/.lock`` (a :mod:`filelock` lock: ``flock`` on POSIX, ``msvcrt`` locking on Windows, never
blocking) while it writes, so two runs never write into one folder at once. The holder describes
itself (pid, host, since when) in ``OUT/.lock.holder``, a side file it writes atomically and removes
on release: the lock file itself is the lock library's (some versions truncate it on every attempt).
A run records its *identity* (model and weights fingerprint, method, seed, settings, size, preset) in
its manifest; ``--resume`` continues only a folder whose identity is the same, and names what differs
otherwise. ``--force`` replaces a whole run, and never touches a folder that is not a vital_fast run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Set

import filelock

LOCK = ".lock"
LOCK_HOLDER = ".lock.holder"  # who holds LOCK: written by the holder, removed on release
LOCK_FILES = (LOCK, LOCK_HOLDER)  # the lock's files: neither a run's output nor the user's
MANIFEST = "manifest.json"

# The files and folders a run writes (what --force removes); anything else in a folder is the user's
# (the lock's files aside, LOCK_FILES, which are never removed while the lock may be held).
RUN_ARTEFACTS = ("manifest.json", "grid.png", "index.html", "targets", "pages", "compare.json", "comparisons.json")
_RUN_PREFIXES = (".tmp-", ".old-", "index-rank")

_HELD: Set[str] = set()  # folders whose lock this process holds (real paths)


def lock_holder(out: str) -> str:
    """Who holds the lock of ``out`` as its holder wrote it (``""`` when unknown)."""
    try:
        with open(os.path.join(out, LOCK_HOLDER), encoding="utf-8") as fh:
            return fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


class FolderLock:
    """The lock ``OUT/.lock`` for the life of a run; never blocks: a folder in use is refused."""

    def __init__(self) -> None:
        self._lock: Optional[filelock.BaseFileLock] = None
        self._described = False  # this lock wrote OUT/.lock.holder (and removes it on release)
        self.path: Optional[str] = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def try_existing(self, out: str) -> None:
        """If OUT/.lock exists, take it now (writes nothing into the folder: no holder description)."""
        path = os.path.join(out, LOCK)
        if os.path.isfile(path):
            self._take(out)

    def take(self, out: str) -> None:
        """Hold the lock of ``out`` (made if needed) and describe this holder in ``OUT/.lock.holder``."""
        if self._lock is None:
            os.makedirs(out, exist_ok=True)
            self._take(out)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._describe(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")

    def _take(self, out: str) -> None:
        path = os.path.join(out, LOCK)
        lock = filelock.FileLock(path, thread_local=False)  # an instance of its own: never reentrant
        try:
            lock.acquire(timeout=0)  # one attempt
        except filelock.Timeout:
            folder = os.path.dirname(path)
            holder = lock_holder(folder)
            raise ValueError(f"{folder} is in use by another run{f' ({holder})' if holder else ''}; wait for it "
                             f"to finish or use another --out") from None
        self._lock = lock
        self.path = os.path.realpath(out)
        _HELD.add(self.path)

    def _describe(self, text: str) -> None:
        """Write ``OUT/.lock.holder`` whole or not at all (a reader never sees half of it)."""
        assert self.path is not None
        from vital_fast.files import atomic_write_bytes

        atomic_write_bytes(os.path.join(self.path, LOCK_HOLDER), text.encode("utf-8"))
        self._described = True

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            if self._described:  # still ours: nobody else can write it while we hold the lock
                try:
                    os.unlink(os.path.join(self.path or "", LOCK_HOLDER))
                except OSError:
                    pass
        finally:
            lock, self._lock, self._described = self._lock, None, False
            _HELD.discard(self.path or "")
            self.path = None
            lock.release()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.release()
        return False


def held_here(out: str) -> bool:
    """Whether this process already holds the lock of ``out``."""
    return os.path.realpath(out) in _HELD


class locked:
    """Hold the lock of ``out`` for a block, unless this process already holds it."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.lock: Optional[FolderLock] = None

    def __enter__(self) -> "locked":
        if not held_here(self.out):
            self.lock = FolderLock()
            self.lock.take(self.out)
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.lock is not None:
            self.lock.release()
        return False


def check_writable(out: str) -> None:
    """ValueError, before any work, when ``out`` cannot be created or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    probe_dir = out
    while not os.path.exists(probe_dir):  # the nearest existing ancestor must let us create the folder
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if parent == os.path.abspath(probe_dir):
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise ValueError(f"--out {out}: {probe_dir} is not a folder")
    try:
        fd, p = tempfile.mkstemp(prefix=".tmp-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(p)
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be written ({exc.strerror or exc}: {probe_dir})") from None


def read_manifest(out_dir: str) -> Dict[str, Any]:
    """The manifest of a run folder; ValueError when the folder is not a vital_fast run."""
    p = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(p):
        raise ValueError(f"{out_dir} is not a vital_fast run folder (no {MANIFEST})")
    try:
        with open(p, encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: unreadable manifest ({exc})") from None
    if not isinstance(m, dict) or m.get("tool") != "vital_fast":
        raise ValueError(f"{p} is not a vital_fast manifest")
    return m


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------

_FIELD_NAMES = {"model": "model", "fingerprint": "model weights", "method": "method", "seed": "seed",
                "settings": "settings", "size": "size", "preset": "preset", "param": "parametrization"}


def _canon(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# The version of what a run identity holds. A run folder of another version is neither resumed nor added to:
# one number instead of per-field shims (2: every setting recorded, matched layers always, issue 24).
IDENTITY_VERSION = 2


def run_identity(*, model: str, fingerprint: str, method: str, seed: int, settings: Mapping[str, Any],
                 size: Optional[int], preset: Optional[str], layers: Optional[list] = None) -> Dict[str, Any]:
    """What makes two runs the same run: a folder is resumed only with an equal identity (``layers``: matched
    layers given by the user, or None for the family's)."""
    return _canon({"version": IDENTITY_VERSION, "model": model, "fingerprint": fingerprint, "method": method,
                   "seed": int(seed), "settings": dict(settings), "size": size, "preset": preset,
                   "layers": [[str(n), float(w)] for n, w in layers] if layers else None})


def identity_of_manifest(m: Mapping[str, Any]) -> Dict[str, Any]:
    """The identity a manifest records (version 1: written before identities had a version)."""
    if isinstance(m.get("run"), Mapping):
        ident = dict(m["run"])
    else:
        model = m.get("model") or {}
        ident = _canon({"model": model.get("name"), "fingerprint": model.get("fingerprint"),
                        "method": m.get("method", "vital"), "seed": m.get("seed"), "settings": m.get("settings"),
                        "size": m.get("size"), "preset": m.get("preset")})
    ident.setdefault("version", 1)
    return ident


def check_identity_version(old: Mapping[str, Any], out: str, what: str = "--resume") -> None:
    """``ValueError`` naming both versions when ``old`` (a folder's identity) is not of :data:`IDENTITY_VERSION`."""
    v = old.get("version", 1)
    if v != IDENTITY_VERSION:
        how = ("save into another folder" if what == "save" else
               "rerun into a new --out folder, or pass --force to replace it")
        raise ValueError(f"{what}: {out} was written by a vital_fast whose run identity is version {v}; this one "
                         f"writes version {IDENTITY_VERSION} and cannot continue it: {how}")


# Every setting's default, registered by vital_fast.optim.presets when it defines Settings (runfolder imports no
# other part of the package): a setting that an older folder lacks is no difference at its default.
SETTING_DEFAULTS: Dict[str, Any] = {}


def _added_at_default(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """A setting that ``old`` (written before the setting existed) lacks and ``new`` holds at its default: the old
    run ran as the default does, so it is no difference."""
    if name in old or name not in new or name not in SETTING_DEFAULTS:
        return False
    return _canon(SETTING_DEFAULTS[name]) == new[name]


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                  names: Optional[Mapping[str, str]] = None) -> List[str]:
    """What differs between two identities, one short phrase per field (``names``: field -> words)."""
    names = _FIELD_NAMES if names is None else names
    old, new = _canon(old), _canon(new)
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "settings" and isinstance(a, dict) and isinstance(b, dict):
            ks = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s) and not _added_at_default(s, a, b)]
            if not ks:
                continue
            out.append("settings " + ", ".join(f"{s}: {a.get(s)!r} there, {b.get(s)!r} here" for s in ks[:3]))
        elif all(isinstance(v, (str, int, float, bool, type(None))) for v in (a, b)):
            out.append(f"{names.get(k, k)}: {a!r} there, {b!r} here")
        else:
            out.append(f"{names.get(k, k)} differ")
    return out


# --------------------------------------------------------------------------------------------
# Preparing a folder for a run
# --------------------------------------------------------------------------------------------


def _entries(out: str) -> List[str]:
    return [e for e in (os.listdir(out) if os.path.isdir(out) else []) if e not in LOCK_FILES]


def _check(out: str, identity: Optional[Mapping[str, Any]], resume: bool, force: bool) -> None:
    if resume and force:
        raise ValueError("--resume and --force contradict each other: --resume keeps the finished targets, --force "
                         "deletes them; pass one")
    entries = _entries(out)
    if not entries:
        return
    if not (resume or force):
        raise ValueError(f"output folder {out} exists and is not empty; pass --force to replace the run in it "
                         f"or --resume to continue it")
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        raise ValueError(f"{'--force' if force else '--resume'}: {out} is not a vital_fast run folder (no "
                         f"{MANIFEST}); nothing in it was touched; use another --out")
    try:
        m = read_manifest(out)
    except ValueError:
        if force and os.path.isdir(os.path.join(out, "targets")):
            return  # a run whose manifest a crash truncated: --force may replace it
        raise  # --resume never trusts (or overwrites) a manifest it cannot read
    if force:
        return
    if m.get("sweep") is not None:
        raise ValueError(f"--resume: {out} holds a sweep; continue it with `vital-fast sweep --resume`, or use "
                         f"another --out")
    if identity is not None:
        check_identity_version(identity_of_manifest(m), out)
    diff = identity_diff(identity_of_manifest(m), identity) if identity is not None else []
    if diff:
        raise ValueError(f"--resume: {out} was made by a different run ({'; '.join(diff[:3])}); use another "
                         f"--out, or --force to replace it")


def clear_run(out: str) -> None:
    """Remove a run's own files from ``out`` (the user's other files stay); call with the lock held."""
    for name in os.listdir(out):
        if name in LOCK_FILES:  # the lock (held by the caller) and the description of its holder
            continue
        if name in RUN_ARTEFACTS or name.startswith(_RUN_PREFIXES):
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)


def clean_debris(out: str) -> None:
    """Remove temporary files and folders left by writes that a crash interrupted (lock held)."""
    for folder in (out, os.path.join(out, "targets")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith((".tmp-", ".old-")):
                p = os.path.join(folder, name)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass


def precheck_run_folder(out: str, *, resume: bool, force: bool) -> None:
    """The checks of :func:`prepare_run_folder` that need no identity, for before a model is loaded.

    Read-only: writes nothing and leaves no lock behind.
    """
    check_writable(out)
    lock = FolderLock()
    try:
        lock.try_existing(out)
        _check(out, None, resume, force)
    finally:
        lock.release()


def prepare_run_folder(out: str, identity: Mapping[str, Any], *, resume: bool, force: bool) -> FolderLock:
    """Check ``out`` for a run (read-only), take its lock, check again, then clear it for ``force``.

    Returns the lock, held; the caller releases it when the run ends. Raises ValueError, before
    anything is written, for a folder that is in use, not writable, or not this run's to write.
    """
    check_writable(out)
    lock = FolderLock()
    lock.try_existing(out)  # a running visualize or sweep holds it: refuse before looking further
    try:
        _check(out, identity, resume, force)
        lock.take(out)
        _check(out, identity, resume, force)  # again, now that nobody else can change it
        if force:
            clear_run(out)
        clean_debris(out)
    except BaseException:
        lock.release()
        raise
    return lock
