"""Guarded imports of the compiled parts: the C++ extension and Triton.

Nothing here raises at import time. Each loader records why it failed, so that
``available_backends()`` and forced-backend errors can say what went wrong and how
to fix it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple


@functools.lru_cache(maxsize=None)
def load_cpp() -> Tuple[Optional[Any], Optional[str]]:
    """Import ``vital_fast._C`` (which registers ``torch.ops.vital_fast.*``).

    Returns ``(module, None)`` or ``(None, reason)``.
    """
    try:
        from vital_fast import _C  # noqa: F401  (importing registers the ops)
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        return None, f"vital_fast._C did not import: {type(exc).__name__}: {exc}"
    return _C, None


@functools.lru_cache(maxsize=None)
def load_triton() -> Tuple[Optional[Any], Optional[str]]:
    """Import triton. Returns ``(module, None)`` or ``(None, reason)``."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return None, f"triton did not import: {type(exc).__name__}: {exc}"
    return triton, None


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1`` in the environment)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
