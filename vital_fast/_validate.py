"""Argument checks for the public ops: metadata first, values only when asked.

Messages follow one template: ``"<op>: '<arg>' must <expectation>, got <actual>"``.
Dtype problems raise ``TypeError``; rank, shape and device problems raise ``ValueError``. Metadata checks
run at trace time too (``torch.compile``, ``torch.func``, ``torch.export``), with the same messages.

Value checks (NaN/Inf, an unsorted reference) read the values. :func:`want_values` decides whether a call
makes them: ``check_values=True`` always, ``False`` never, ``None`` (the ops' default) only where a read is
free and possible, eager CPU tensors, or everywhere with the debug flag (:func:`set_debug`, or
``VITAL_FAST_DEBUG=1`` in the environment). Where a host read is impossible or would stall a device (a
traced or transformed call, a CUDA tensor), the checks run as device-side asserts
(``torch._assert_async``, no host read; the message still names the op and the input).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_DEBUG = os.environ.get("VITAL_FAST_DEBUG", "0") not in ("", "0")


def set_debug(on: bool = True) -> None:
    """Turn the ops' value checks on everywhere (GPU tensors, compiled and transformed calls), as device-side
    asserts where a host read is not possible; off by default (``VITAL_FAST_DEBUG=1`` turns it on)."""
    global _DEBUG
    _DEBUG = bool(on)


def debug() -> bool:
    return _DEBUG


def tracing(x: torch.Tensor) -> bool:
    """A call being traced or transformed: under ``torch.compile``/export, inside ``torch.func``, or on a fake
    or meta tensor. Values cannot be read on the host there."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(x):
            return True
    except ImportError:  # pragma: no cover
        pass
    return torch._C._functorch.peek_interpreter_stack() is not None


def want_values(check_values, x: torch.Tensor) -> str:
    """``"read"`` (host checks raising ValueError), ``"assert"`` (device-side asserts) or ``"off"``."""
    if check_values is False or (check_values is None and not _DEBUG and (x.device.type != "cpu" or tracing(x))):
        return "off"
    return "assert" if tracing(x) or x.device.type != "cpu" else "read"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    x: object,
    name: str,
    op: str,
    *,
    ndim: Optional[Sequence[int]] = None,
    min_ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    like: Optional[torch.Tensor] = None,
    like_name: str = "features",
) -> torch.Tensor:
    """Check type, dtype, rank and device of one tensor argument; return it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{op}: '{name}' must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if ndim is not None and x.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{op}: '{name}' must be {want}, got {x.dim()}-D with shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{op}: '{name}' must have at least {min_ndim} dimensions, got {x.dim()}-D "
            f"with shape {tuple(x.shape)}"
        )
    if like is not None and x.device != like.device:
        raise ValueError(
            f"{op}: '{name}' must be on the same device as '{like_name}' ({like.device}), got {x.device}"
        )
    return x


def check_finite(x: torch.Tensor, name: str, op: str) -> None:
    """Raise ValueError when ``x`` holds NaN or Inf (reads the values: a device sync on GPU)."""
    # min and max are finite exactly when every value is (NaN propagates through both); this reads
    # x once and allocates nothing of its size, unlike torch.isfinite(x).all().
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{op}: '{name}' must be finite, got {n_nan} NaN and {n_inf} Inf values "
            f"(pass check_values=False to skip this check)"
        )


def assert_finite(x: torch.Tensor, name: str, op: str) -> None:
    """A device-side assert that ``x`` is finite: no host read; it fires when the device runs it."""
    torch._assert_async(torch.isfinite(x.detach()).all(),
                        f"{op}: '{name}' must be finite, got NaN or Inf values (the debug check; VITAL_FAST_DEBUG)")


def assert_sorted(ref: torch.Tensor, name: str, op: str) -> None:
    if ref.shape[-1] > 1:
        torch._assert_async((ref[..., 1:] >= ref[..., :-1]).all(),
                            f"{op}: '{name}' must be sorted ascending along its last dimension (the debug check)")


def check_sorted(ref: torch.Tensor, name: str, op: str) -> None:
    """Raise ValueError when the rows of ``ref`` (last dim) are not sorted ascending."""
    if ref.shape[-1] > 1:
        bad = ref[..., 1:] < ref[..., :-1]
        if bool(bad.any()):
            n_rows = int(bad.reshape(-1, bad.shape[-1]).any(-1).sum())
            raise ValueError(
                f"{op}: '{name}' must be sorted ascending along its last dimension (quantiles), "
                f"got {n_rows} unsorted rows; build it with vital_fast.sorted_prototype()"
            )
