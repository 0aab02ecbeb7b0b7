"""Mixed precision for the network's forward and backward (``Settings.amp``).

``"bf16"`` / ``"fp16"`` run the network under ``torch.autocast`` with that dtype; the image, its
parameters, the optimizer, the reference prototypes and the loss record stay float32, and the
features reach the ops in their own dtype (the ops compute in float32). ``"fp16"`` scales the loss
before the backward pass (float16 gradients of small losses underflow otherwise) by a dynamic scale
(:class:`LossScale`, the rule of ``torch.amp.GradScaler``): a step whose gradients overflow is skipped
and halves the scale, a run of good steps doubles it, all on the device. A constant scale (1024, before)
overflowed on every step of efficientnet-lite0 and left flat images. ``"auto"`` (the ``fast`` preset's) picks bfloat16 on GPUs that support it
(float16 on older ones) and float32 on CPUs. ``None`` / ``"off"``: float32.

Why not bfloat16 on CPUs with AMX tiles too: on an AMX Xeon (2 threads) it ran a ResNet-50 class step 1.9x
faster, but the demo's efficientnet-lite0 end to end no faster (7.3 against 7.2 s per target) and with
lite0's own top-1 on its images lower (12 against 15 of 18; judge top-1 11 against 10, Frechet distance
87.4 against 83.5; ``python -m benchmarks.bench_methods --methods vital vital@bf16 --seeds 0 1 2``). Pass
``bf16`` for large convolutional networks on such CPUs.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["AMP_CHOICES", "LossScale", "autocast", "precision_name", "resolve_amp"]

AMP_CHOICES = ("off", "bf16", "fp16", "auto")


class LossScale:
    """float16's dynamic loss scale for one engine, kept on the device (no host read per step).

    :meth:`unscale` divides the gradients by the scale in place and returns ``ok`` (a 0-dim float tensor:
    1 when every gradient is finite, else 0, after zeroing the non-finite values); :meth:`update` then
    halves the scale after an overflow and doubles it after ``growth_interval`` good steps in a row
    (``torch._amp_update_scale_``, GradScaler's rule). The engine reads :attr:`scale` and the count of
    skipped steps with its loss record (every ``Settings.loss_every`` steps) and stops when the scale
    has fallen below :attr:`FLOOR`: every step overflowed, and float16 cannot run this model.
    """

    INIT = 2.0 ** 16
    FLOOR = 2.0 ** -16
    GROWTH_INTERVAL = 200

    def __init__(self, device, init: float = INIT, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.scale = torch.full((1,), float(init), dtype=torch.float32, device=device)
        self._growth = torch.zeros((1,), dtype=torch.int32, device=device)
        self.skipped = torch.zeros((1,), dtype=torch.float32, device=device)
        self.growth_interval = int(growth_interval)

    def unscale(self, grads) -> torch.Tensor:
        """Unscale ``grads`` (a list of tensors) in place; ``ok`` as described above."""
        found = torch.zeros((1,), dtype=torch.float32, device=self.scale.device)
        grads = [g for g in grads if g is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.scale.reciprocal())
        for g in grads:  # the stacked gradients: a constant number of tensors
            torch.nan_to_num_(g, 0.0, 0.0, 0.0)
        self.skipped.add_(found)
        return (1.0 - found).reshape(())

    def update(self, ok: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self._growth, 1.0 - ok.reshape(1), 2.0, 0.5, self.growth_interval)

    def record(self) -> torch.Tensor:
        """``[scale, skipped steps]``, to be read with the loss record."""
        return torch.cat([self.scale, self.skipped])


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
        return None  # CPUs: float32, also with AMX (see the module docstring)
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
