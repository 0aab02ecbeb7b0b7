"""Whether a one-element CPU batch must run padded (:mod:`vital_fast.models.batching` says why padding exists):
one probe of the step's own pass asks PyTorch which backend each convolution takes at batch 1."""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vital_fast.models.taps import FeatureTaps

__all__ = ["needs_padding"]

_DETERMINISTIC = {"Mkldnn", "MkldnnEmpty", "Empty"}  # oneDNN, and convolutions with nothing to compute
# Matrix products round differently at another batch size (a ViT's channel target alone and in a batch of two
# differed by 0.019 after a few steps): a pass with one pads.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[tuple, bool]]" = weakref.WeakKeyDictionary()


class _ConvBackends(TorchDispatchMode):
    """Records the backend PyTorch selects for every convolution that runs while active (and ``"matmul"`` for a
    matrix product)."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            self.backends.append("matmul")
        elif func is torch.ops.aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, out_pad, groups = args[:9]
            be = torch._C._select_conv_backend(x, w, b, stride, padding, dilation, transposed, out_pad, groups, None)
            self.backends.append(str(be).split(".")[-1])
        return func(*args, **(kwargs or {}))


def needs_padding(model: torch.nn.Module, x: torch.Tensor, layers: Optional[Sequence[str]] = None) -> bool:
    """Whether a one-element CPU batch ``x`` must run padded through ``model``: one probe forward (no grad, once
    per model, shape, dtype, layout, autocast state, single/multi-threading and ``layers``) finds a convolution
    whose backend at batch 1 is not oneDNN, or a matrix product. ``layers``: the pass stops after them (the
    step's own partial forward); None: the whole model. False for anything but a one-element CPU batch."""
    if x.device.type != "cpu" or x.dim() == 0 or x.shape[0] != 1:
        return False
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ac = torch.is_autocast_enabled("cpu")
    key = (tuple(x.shape), x.dtype, cl, ac, torch.get_autocast_dtype("cpu") if ac else None,
           torch.get_num_threads() > 1, tuple(layers) if layers is not None else None)
    per_model = _PROBED.setdefault(model, {})
    hit = per_model.get(key)
    if hit is None:
        probe = _ConvBackends()
        with torch.no_grad(), probe:
            if layers:
                FeatureTaps(model, list(layers), stop_after=True).run(x.detach(), pad=False)
            else:
                model(x.detach())
        hit = per_model[key] = any(b not in _DETERMINISTIC for b in probe.backends)
    return hit
