"""Triton kernels and launchers of the sort-matching loss (DESIGN.md §1-2).

* ``sort_match_fwd(x, ref) -> (loss (B, C), diff (B, C, D))``: loss[b, c] = (1/D) Σ_j
  (sort(x[b, c])[j] − ref[b', c, j])² and diff[b, c, i] = x[b, c, i] − ref[b', c, rank(i)],
  rank the position of element i in the stable ascending sort; b' = 0 for a shared reference.
* ``sort_match_bwd(grad_loss, diff, dtype) -> grad_x``: grad_loss[b, c] · (2/D) · diff[b, c, i].

Rows with D <= ``_heuristics.MAX_FUSED_D`` are sorted on chip (``_sort_match_fwd_kernel``); longer
rows and float64 go through ``torch.sort(stable=True)`` and ``_sort_match_epilogue_kernel``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from vital_fast.kernels.triton import _heuristics
from vital_fast.kernels.triton._bitonic import PAD_KEY, bitonic_sort_rows, pack_keys, unpack_keys
from vital_fast.kernels.triton._rows import (
    check_shapes,
    launch_scaled_rows_bwd,
    ref_strides,
    scaled_rows_grad,
)
from vital_fast.oracle import math_dtype


# ROWS rows per program (row = b * C + c), each whole in registers as BLOCK_D = 2**LOG_D int64 keys
# (fp32 value bits << 32 | column), padded with PAD_KEY; one bitonic network sorts all ROWS rows.
# fp32 math and accumulation (fp16/bf16 upcast on load); -0.0 is folded into +0.0 so that ties
# follow torch.sort(stable=True). diff is scattered to the source columns of the sorted keys.
@triton.jit
def _sort_match_fwd_kernel(
    x_ptr,  # [B, C, D] input rows, any float dtype, any strides
    ref_ptr,  # [Bref, C, D] sorted reference rows, fp32
    loss_ptr,  # [B, C] out: row losses, fp32, contiguous
    diff_ptr,  # [B, C, D] out: x - matched reference, fp32, contiguous
    stride_xb, stride_xc, stride_xd,  # [B, C, D] strides of x
    stride_rb, stride_rc, stride_rd,  # [Bref, C, D] strides of ref (stride_rb = 0 when shared)
    n_rows, C, D,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    b = row // C
    c = row - b * C
    row_ok = row < n_rows
    mask = row_ok[:, None] & (col[None, :] < D)
    col64 = col[None, :].to(tl.int64)

    x = tl.load(
        x_ptr + b[:, None] * stride_xb + c[:, None] * stride_xc + col64 * stride_xd, mask=mask, other=0.0
    ).to(tl.float32)
    keys = tl.where(mask, pack_keys(x, col[None, :]), PAD_KEY)
    keys = bitonic_sort_rows(keys, LOG_D)
    xs, src = unpack_keys(keys)

    ref = tl.load(
        ref_ptr + b[:, None] * stride_rb + c[:, None] * stride_rc + col64 * stride_rd, mask=mask, other=0.0
    ).to(tl.float32)
    d = tl.where(mask, xs - ref, 0.0)
    tl.store(loss_ptr + row, tl.sum(d * d, axis=1) / D, mask=row_ok)
    tl.store(diff_ptr + row[:, None] * D + src, d, mask=mask)


# One program per row, looping over it in BLOCK chunks: the rows were sorted by torch.sort, so this
# reads the sorted values, their source positions and the reference, accumulates the squared
# differences in the math dtype (fp32, or fp64 for float64 rows) in a BLOCK-wide vector reduced
# once at the end (deterministic, no atomics), and scatters diff to the source positions.
@triton.jit
def _sort_match_epilogue_kernel(
    xs_ptr,  # [B, C, D] sorted values (any float dtype), any strides
    src_ptr,  # [B, C, D] int64 source position of each sorted value, any strides
    ref_ptr,  # [Bref, C, D] sorted reference rows, math dtype
    loss_ptr,  # [B, C] out: row losses, math dtype, contiguous
    diff_ptr,  # [B, C, D] out: x - matched reference, math dtype, contiguous
    stride_sb, stride_sc, stride_sd,  # [B, C, D] strides of the sorted values
    stride_ib, stride_ic, stride_id,  # [B, C, D] strides of the source positions
    stride_rb, stride_rc, stride_rd,  # [Bref, C, D] strides of ref (stride_rb = 0 when shared)
    C, D,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row - b * C
    acc_ty = diff_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(0, D, BLOCK):
        col = start + tl.arange(0, BLOCK).to(tl.int64)
        m = col < D
        xs = tl.load(xs_ptr + b * stride_sb + c * stride_sc + col * stride_sd, mask=m, other=0.0).to(acc_ty)
        src = tl.load(src_ptr + b * stride_ib + c * stride_ic + col * stride_id, mask=m, other=0)
        ref = tl.load(ref_ptr + b * stride_rb + c * stride_rc + col * stride_rd, mask=m, other=0.0).to(acc_ty)
        d = tl.where(m, xs - ref, 0.0)
        acc += d * d
        tl.store(diff_ptr + row * D + src, d, mask=m)
    tl.store(loss_ptr + row, tl.sum(acc, axis=0) / D)


# Elementwise, BLOCK elements of the flattened contiguous (B, C, D) per program (_rows.py):
# grad_x = grad_loss[b, c] * (2/D) * diff in diff's dtype (fp32 or fp64), cast on store to x's dtype.
@triton.jit
def _sort_match_bwd_kernel(
    grad_loss_ptr,  # [B, C] upstream gradient of the row losses, any strides (0 when expanded)
    diff_ptr,  # [B, C, D] saved diff, math dtype, contiguous
    grad_x_ptr,  # [B, C, D] out: gradient of x, input dtype, contiguous
    stride_gb, stride_gc,  # [B, C] strides of grad_loss
    n_elems, C, D,
    BLOCK: tl.constexpr,
):
    scaled_rows_grad(grad_loss_ptr, diff_ptr, grad_x_ptr, stride_gb, stride_gc, n_elems, C, D, BLOCK)


def sort_match_fwd(x: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(B, C)`` and ``diff = x − t`` ``(B, C, D)`` (math dtype) of rows ``x`` against ``ref``.

    ``x`` is read through its strides (no copy); ``ref`` ``(1 or B, C, D)`` is in the math dtype.
    """
    check_shapes("sort_match_fwd", x, ref)
    B, C, D = x.shape
    n_rows = B * C
    md = math_dtype(x.dtype)
    loss = torch.empty((B, C), dtype=md, device=x.device)
    diff = torch.empty((B, C, D), dtype=md, device=x.device)
    if n_rows == 0:
        return loss, diff
    rsb, rsc, rsd = ref_strides(ref)
    if _heuristics.use_fused(D, x.dtype):
        block_d, log_d, rows, num_warps = _heuristics.fused_config(n_rows, D, x.device)
        torch.library.wrap_triton(_sort_match_fwd_kernel)[(triton.cdiv(n_rows, rows),)](
            x, ref, loss, diff,
            *x.stride(), rsb, rsc, rsd,
            n_rows, C, D,
            ROWS=rows, BLOCK_D=block_d, LOG_D=log_d, num_warps=num_warps,
        )
    else:
        # Long rows (and float64): a segmented sort by torch, then one fused pass over its output.
        xs, order = torch.sort(x, dim=-1, stable=True)
        torch.library.wrap_triton(_sort_match_epilogue_kernel)[(n_rows,)](
            xs, order, ref, loss, diff,
            *xs.stride(), *order.stride(), rsb, rsc, rsd,
            C, D,
            BLOCK=_heuristics.EPILOGUE_BLOCK, num_warps=_heuristics.EPILOGUE_WARPS,
        )
    return loss, diff


def sort_match_bwd(grad_loss: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_x`` ``(B, C, D)`` of ``dtype``: grad_loss[b, c] · (2/D) · diff[b, c, i]."""
    return launch_scaled_rows_bwd(_sort_match_bwd_kernel, grad_loss, diff, dtype)
