"""The caller's model comes back as it was given: training flags, ``requires_grad`` flags and device.

Feature visualization needs a frozen network in eval mode on the device it runs on, and
:func:`~vital_fast.models.load_model` makes a module so in place. :func:`preserved` records what a call is
about to change and puts it back when the call ends, also when it raises or is interrupted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


@contextlib.contextmanager
def preserved(module: nn.Module) -> Iterator[nn.Module]:
    """Restore ``module``'s per-module training flags, per-parameter ``requires_grad`` and its device (the
    device of its first parameter or buffer: a module moved by the call is moved back) on exit."""
    training: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in module.modules()]
    grads: List[Tuple[nn.Parameter, bool]] = [(p, p.requires_grad) for p in module.parameters()]
    device = _device_of(module)
    try:
        yield module
    finally:
        if device is not None and _device_of(module) != device:
            module.to(device)
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
