"""Guarded imports of the compiled parts: the C++ extension and Triton.

Nothing here raises at import time. Each loader records why it failed, so that
``available_backends()`` and forced-backend errors can say what went wrong and how
to fix it.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Optional, Tuple


# Left in the package by setup.py's build_ext when the extension could not be compiled (the name
# is setup.py's BUILD_NOTE); read back here so that the reason reaches available_backends().
BUILD_NOTE = "_C_build_error.txt"

_CPP_FIX = (
    "the pure-torch reference backend runs instead; to build the extension, install a C++ compiler "
    "and reinstall with `pip install --no-build-isolation .` (or `-e .` in a checkout)"
)


def _build_note() -> Optional[str]:
    """The note of a failed extension build, if the last install left one."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_NOTE)
    try:
        with open(path, encoding="utf-8") as fh:
            text = " ".join(line.strip() for line in fh if line.strip())
    except OSError:
        return None
    return text or None


@functools.lru_cache(maxsize=None)
def load_cpp() -> Tuple[Optional[Any], Optional[str]]:
    """Import ``vital_fast._C`` (which registers ``torch.ops.vital_fast.*``).

    Returns ``(module, None)`` or ``(None, reason)``. When the extension was never built, the
    reason says why (the build's note, if the install could not compile it) and how to build it.
    """
    try:
        # import_module, not `from vital_fast import _C`: a missing module is then a
        # ModuleNotFoundError, told apart below from one that exists but does not load.
        _C = importlib.import_module("vital_fast._C")  # importing registers the ops
        from vital_fast.ops.library import register_cpp

        register_cpp()  # their autograd and vmap rules
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        why = f"vital_fast._C did not import: {type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError):  # not built (or blocked), as opposed to broken
            note = _build_note()
            built = note if note else (
                "the extension is not installed (skipped with VITAL_FAST_BUILD_EXT=0, or it could "
                "not be compiled at install time)"
            )
            why = f"{why}; {built}; {_CPP_FIX}"
        return None, why
    return _C, None


@functools.lru_cache(maxsize=None)
def load_triton() -> Tuple[Optional[Any], Optional[str]]:
    """Import triton. Returns ``(module, None)`` or ``(None, reason)``."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        why = f"triton did not import: {type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError):
            why += " (it comes with the extra: pip install 'vital_fast[gpu]')"
        return None, why
    return triton, None


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1`` in the environment)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
