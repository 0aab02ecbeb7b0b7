"""Writing files so that a crash, an interrupt or a second process never leaves half a file: every result,
cache entry, manifest and page of vital_fast is written through :func:`atomic_write_bytes`."""

from __future__ import annotations

import errno
import os
import secrets
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_torch_save"]


def _create_temp(folder: str) -> "tuple[int, str]":
    """A new file ``.tmp-<random>`` in ``folder``, opened for writing with mode ``0o666``: the kernel
    applies the umask (and a default ACL) as for a plain ``open()``; ``tempfile.mkstemp`` would
    force ``0o600``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)  # pragma: no cover


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets the permissions of a plain ``open(path, "wb")`` of a new file: ``0o666`` less the
    process umask (``0o644`` under the usual umask ``022``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder)
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
    """``torch.save(obj)`` to ``path`` atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
