"""Backend choice, per call, from the tensor's device.

Three backends sit behind every op:

* ``"reference"``: the pure-torch code in :mod:`vital_fast.oracle` (any device);
* ``"cpp"``: the C++ kernels in ``csrc/`` (CPU tensors), registered as ``torch.ops.vital_fast.*``;
* ``"triton"``: the Triton kernels in :mod:`vital_fast.kernels.triton` (CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` is set in the environment).

``resolve`` is the only place that decides. ``backend=`` on a call, or the ``VITAL_FAST_BACKEND``
environment variable, forces one; a forced backend that is missing raises, it never falls back. Under
``torch.compile`` the choice is made once, when the function is traced (a constant of the graph).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from vital_fast import _ext

BACKENDS = ("reference", "cpp", "triton")
_ENV = "VITAL_FAST_BACKEND"
_warned: set = set()

_HOW_TO_FIX = {
    "cpp": "build it with `pip install --no-build-isolation -e .` (a C++ compiler is needed; "
    "VITAL_FAST_BUILD_EXT=0 skips it)",
    "triton": "install `vital_fast[gpu]` (pip install triton) and pass CUDA tensors, or set "
    "TRITON_INTERPRET=1 in the environment to run the kernels on CPU tensors",
}


def _status(name: str) -> Tuple[bool, Optional[str]]:
    if name == "reference":
        return True, None
    if name == "cpp":
        mod, why = _ext.load_cpp()
        return mod is not None, why
    if name == "triton":
        mod, why = _ext.load_triton()
        if mod is not None:
            try:
                import vital_fast.ops.triton_ops  # noqa: F401  (defines torch.ops.vital_fast.*_triton; imports dynamo)
            except (ImportError, AttributeError) as exc:  # a torch without torch.library.triton_op (before 2.6)
                return False, (f"the Triton operators could not be defined ({type(exc).__name__}: {exc}); they need "
                               f"torch >= 2.6 (this is {torch.__version__})")
        return mod is not None, why
    raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


def available_backends() -> Dict[str, Dict[str, object]]:
    """Which backends loaded, and why the others did not.

    Returns
    -------
    dict
        ``{name: {"available": bool, "reason": str | None, "devices": str}}`` for
        ``"reference"``, ``"cpp"`` and ``"triton"``.

    Example
    -------
    >>> import vital_fast
    >>> vital_fast.available_backends()["reference"]["available"]
    True
    """
    devices = {
        "reference": "any",
        "cpp": "cpu",
        "triton": "cuda" + (" and cpu (TRITON_INTERPRET=1)" if _ext.triton_interpret() else ""),
    }
    out: Dict[str, Dict[str, object]] = {}
    for name in BACKENDS:
        ok, why = _status(name)
        out[name] = {"available": ok, "reason": why, "devices": devices[name]}
    return out


def requested_backend(requested: Optional[str], op: str = "vital_fast") -> str:
    """The backend asked for: the ``backend=`` argument, else ``VITAL_FAST_BACKEND``, else auto."""
    req = requested if requested is not None else os.environ.get(_ENV, "auto")
    req = (req or "auto").strip().lower()
    if req not in BACKENDS + ("auto",):
        source = "backend" if requested is not None else _ENV
        raise ValueError(
            f"{op}: {source} must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {req!r}"
        )
    return req


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (dynamo calls ``fn`` once when it traces and keeps the
    result as a constant: it only marks the function), without importing ``torch._dynamo`` when vital_fast is
    imported: that import imports triton, before a process may set ``TRITON_INTERPRET``
    (tests/test_ops_library.py checks the mark works: no graph break)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def resolve(op: str, device: torch.device, requested: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op`` on tensors living on ``device``.

    Raises
    ------
    RuntimeError
        When a forced backend is not available, or cannot run on ``device``.
    """
    req = requested_backend(requested, op)
    dev = torch.device(device).type
    if req != "auto":
        ok, why = _status(req)
        if not ok:
            raise RuntimeError(
                f"{op}: backend {req!r} was requested but is not available ({why}); "
                f"{_HOW_TO_FIX[req]}"
            )
        if req == "cpp" and dev != "cpu":
            raise RuntimeError(f"{op}: backend 'cpp' runs on CPU tensors only, got a {dev} tensor")
        if req == "triton" and dev != "cuda" and not (dev == "cpu" and _ext.triton_interpret()):
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors with "
                f"TRITON_INTERPRET=1 set in the environment), got a {dev} tensor"
            )
        return req
    want = {"cpu": "cpp", "cuda": "triton"}.get(dev)
    if want is None:
        return "reference"
    ok, why = _status(want)
    if ok:
        return want
    key = (op, want, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{op}: the {want!r} backend for {dev} tensors is not available ({why}); "
            f"falling back to the slower pure-torch reference. To fix: {_HOW_TO_FIX[want]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
