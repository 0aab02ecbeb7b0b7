"""Pieces shared by the row-matching launchers: the elementwise backward, argument helpers."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from vital_fast.kernels.triton import _heuristics


@triton.jit
def scaled_rows_grad(
    grad_loss_ptr,  # [B, C] upstream gradient of the row losses, any strides (0 when expanded)
    saved_ptr,  # [B, C, D] saved tensor of the forward, math dtype, contiguous
    grad_x_ptr,  # [B, C, D] out: gradient of x, input dtype, contiguous
    stride_gb, stride_gc,  # [B, C] strides of grad_loss
    n_elems, C, D,
    BLOCK: tl.constexpr,
):
    """Body of both backward kernels: grad_x = grad_loss[b, c] · (2/D) · saved, one BLOCK per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_elems
    row = offs // D
    b = row // C
    c = row - b * C
    acc_ty = saved_ptr.dtype.element_ty
    g = tl.load(grad_loss_ptr + b * stride_gb + c * stride_gc, mask=m, other=0.0).to(acc_ty)
    saved = tl.load(saved_ptr + offs, mask=m, other=0.0)
    # (grad_loss * (2/D)) * saved, rounded as csrc/row_grad.h does: the same bits as the C++ op.
    two_over_d = tl.full([], 2.0, acc_ty) / D
    grad = (g * two_over_d) * saved
    tl.store(grad_x_ptr + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=m)


def launch_scaled_rows_bwd(
    kernel, grad_loss: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Allocate ``grad_x`` ``(B, C, D)`` of ``dtype``; launch ``kernel``, a ``scaled_rows_grad`` wrapper."""
    if saved.dim() != 3 or grad_loss.shape != saved.shape[:2]:
        raise ValueError(
            f"backward: expected grad_loss (B, C) and saved (B, C, D), "
            f"got {tuple(grad_loss.shape)} and {tuple(saved.shape)}"
        )
    B, C, D = saved.shape
    saved = saved.contiguous()  # the forward allocates it contiguous: a no-op there
    grad_x = torch.empty((B, C, D), dtype=dtype, device=saved.device)
    n_elems = saved.numel()
    if n_elems == 0:
        return grad_x
    torch.library.wrap_triton(kernel)[(triton.cdiv(n_elems, _heuristics.BWD_BLOCK),)](
        grad_loss, saved, grad_x,
        *grad_loss.stride(),
        n_elems, C, D,
        BLOCK=_heuristics.BWD_BLOCK, num_warps=_heuristics.BWD_WARPS,
    )
    return grad_x


def ref_strides(ref: torch.Tensor) -> Tuple[int, int, int]:
    """Strides of the reference rows; a shared reference (Bref = 1) gets batch stride 0."""
    sb, sc, sd = ref.stride()
    return (0 if ref.shape[0] == 1 else sb), sc, sd


def check_shapes(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    """Metadata-only checks (the public API validated already); guards direct launcher calls."""
    if x.dim() != 3 or ref.dim() != 3 or ref.shape[1:] != x.shape[1:] or ref.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{name}: expected x (B, C, D) and ref (1 or B, C, D), "
            f"got {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    if not 1 <= x.shape[2] < 2**31:
        raise ValueError(f"{name}: rows must have 1 to 2**31 - 1 elements, got D = {x.shape[2]}")
    if x.device != ref.device:
        raise ValueError(f"{name}: x is on {x.device} but ref on {ref.device}")
