"""Launchers for the C++ CPU kernels registered as ``torch.ops.vital_fast.*`` (csrc/).

Same signatures as the Triton launchers:

* ``<op>_fwd(x, [rel,] ref) -> (loss (B, C), saved (B, C, D))``
* ``<op>_bwd(grad_loss (B, C), saved (B, C, D), dtype) -> grad_x (B, C, D)``
"""

from __future__ import annotations

import torch

from vital_fast import _ext


def _ops():
    mod, why = _ext.load_cpp()
    if mod is None:
        raise RuntimeError(f"the C++ kernels are not built ({why}); run `pip install --no-build-isolation -e .`")
    return torch.ops.vital_fast


def sort_match_fwd(x: torch.Tensor, ref: torch.Tensor):
    return _ops().sort_match_fwd(x, ref)


def sort_match_bwd(grad_loss: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # grad_loss comes from autograd and may be expanded (stride 0); it is (B, C), tiny.
    return _ops().sort_match_bwd(grad_loss.contiguous(), diff, dtype)


def lrp_weight_fwd(x: torch.Tensor, rel: torch.Tensor, ref: torch.Tensor):
    return _ops().lrp_weight_fwd(x, rel, ref)


def lrp_weight_bwd(grad_loss: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _ops().lrp_weight_bwd(grad_loss.contiguous(), saved, dtype)
