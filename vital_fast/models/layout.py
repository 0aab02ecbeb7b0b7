"""The network's memory layout during a run (``Settings.channels_last``).

Convolutions on CPUs (oneDNN) and on NVIDIA GPUs run faster on channels-last (NHWC) tensors. On this
project's CPU (Intel Xeon with AMX, 2 threads, 224 px, B = 8), a forward + backward to the last matched
layer measured 1.14x (ResNet-50) and 1.16x (efficientnet-lite0) faster in float32, and 1.37x and 1.26x in
bfloat16 (README, "Mixed precision and memory layout"). The values are the same up to rounding.

``"auto"`` takes channels-last for the convolutional families vital_fast knows (``resnet``,
``efficientnet_lite``, ``efficientnet``, ``densenet``, ``convnext``) on CPU and CUDA devices; a ``generic``
model keeps its layout, since its code may ``.view()`` an activation, which channels-last strides refuse
(``"on"`` converts it anyway); ViTs have no 4-D activations to speak of. :class:`ChannelsLast` converts
the 4-D parameters and buffers of the model for the run and gives every original tensor back when the
run ends.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

__all__ = ["CHANNELS_LAST_CHOICES", "ChannelsLast", "resolve_channels_last"]

CHANNELS_LAST_CHOICES = ("auto", "on", "off")
_CONV_FAMILIES = ("resnet", "efficientnet_lite", "efficientnet", "densenet", "convnext")


def resolve_channels_last(value: Optional[str], family: str, device) -> bool:
    """Whether a run with ``Settings.channels_last = value`` uses channels-last on ``device``.

    Raises
    ------
    ValueError
        An unknown value (the valid ones listed).
    """
    value = "auto" if value is None else value
    if value not in CHANNELS_LAST_CHOICES:
        raise ValueError(f"unknown channels_last {value!r}; valid: {', '.join(CHANNELS_LAST_CHOICES)}")
    if value == "off":
        return False
    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    return value == "on" or family in _CONV_FAMILIES


class ChannelsLast:
    """The model's 4-D parameters and buffers in channels-last layout until :meth:`restore`.

    Only tensors not already channels-last are converted (through ``.data``: the same parameters, the same
    values); :meth:`restore` puts the original tensors back (what the user holds is as it was).
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                    self._saved.append((t, t.data))
                    t.data = t.data.contiguous(memory_format=torch.channels_last)

    def restore(self) -> None:
        saved, self._saved = self._saved, []
        with torch.no_grad():
            for t, data in saved:
                t.data = data

    @staticmethod
    def input(x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels-last layout when it is a 4-D batch (else as it is)."""
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
