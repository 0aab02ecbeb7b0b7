"""Mixed precision for the network's forward and backward (``Settings.amp``).

``"bf16"`` / ``"fp16"`` run the network under ``torch.autocast`` with that dtype; the image, its
parameters, the optimizer, the reference prototypes and the loss record stay float32, and the
features reach the ops in their own dtype (the ops compute in float32). ``"fp16"`` scales the loss by
a constant before the backward pass and unscales the image gradient (float16 gradients of small
losses underflow otherwise). ``"auto"`` picks bfloat16 on GPUs that support it (float16 on older
ones) and on CPUs with AMX tiles, and float32 elsewhere. ``None`` / ``"off"``: float32.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["AMP_CHOICES", "autocast", "precision_name", "resolve_amp"]

AMP_CHOICES = ("off", "bf16", "fp16", "auto")
FP16_LOSS_SCALE = 1024.0


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - an older torch without the query: no claim of fast bfloat16
        return False


def resolve_amp(amp: Optional[str], device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None: float32).

    Raises
    ------
    ValueError
        An unknown value (the valid ones listed), or a dtype the device cannot run.
    """
    dev = torch.device(device)
    if amp is None or amp in ("off", "fp32", "float32"):
        return None
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if dev.type == "cpu" and _cpu_has_fast_bf16() else None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if dev.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16; use fp16 or off")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"amp {amp}: mixed precision runs on cpu and cuda devices, not {dev.type}")
    return dtype


def autocast(dtype: Optional[torch.dtype], device: Union[str, torch.device]):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"``: what the network ran in."""
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
