"""Triton kernels and launchers of the fused LRP-weighting op (DESIGN.md §1-2).

* ``lrp_weight_fwd(x, rel, ref) -> (loss (B, C), saved (B, C, D))``: per row
  R̂ = (rel − min rel) / (max rel − min rel + 1e-6), y = x ⊙ R̂, loss the sort-matching loss of y
  against ref, saved[i] = (y[i] − ref[rank_y(i)]) · R̂[i].
* ``lrp_weight_bwd(grad_loss, saved, dtype) -> grad_x``: grad_loss[b, c] · (2/D) · saved[b, c, i].

Rows with D <= ``_heuristics.MAX_FUSED_D`` run in one kernel (``_lrp_weight_fwd_kernel``); longer
rows and float64 run ``_lrp_weight_prologue_kernel`` (y and the row's min / denominator),
``torch.sort(stable=True)`` on y, then ``_lrp_weight_epilogue_kernel``.
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

LRP_EPS = tl.constexpr(1e-6)  # as vital_fast.oracle.LRP_EPS


# ROWS rows per program (row = b * C + c), whole in registers: the row's relevance min and max
# (fp32), R̂ and y = x * R̂ computed as the reference does, then y packed into BLOCK_D = 2**LOG_D
# int64 keys (value bits << 32 | column; -0.0 folded into +0.0) and sorted by one bitonic network.
# fp32 math and accumulation. saved is scattered to the source columns, with R̂ at those columns
# recomputed from a reload of rel (a gather from cache; same formula, so the same bits).
@triton.jit
def _lrp_weight_fwd_kernel(
    x_ptr,  # [B, C, D] activations, any float dtype, any strides
    rel_ptr,  # [B, C, D] relevance, any float dtype, any strides
    ref_ptr,  # [Bref, C, D] sorted reference rows, fp32
    loss_ptr,  # [B, C] out: row losses, fp32, contiguous
    saved_ptr,  # [B, C, D] out: (y - matched reference) * R̂, fp32, contiguous
    stride_xb, stride_xc, stride_xd,  # [B, C, D] strides of x
    stride_lb, stride_lc, stride_ld,  # [B, C, D] strides of rel
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

    rel_row = rel_ptr + b[:, None] * stride_lb + c[:, None] * stride_lc
    rel = tl.load(rel_row + col64 * stride_ld, mask=mask, other=0.0).to(tl.float32)
    # Rows past n_rows (a partial last program) get lo = hi = 0 instead of +-inf: no NaN noise.
    lo = tl.where(row_ok, tl.min(tl.where(mask, rel, float("inf")), axis=1), 0.0)[:, None]
    hi = tl.where(row_ok, tl.max(tl.where(mask, rel, -float("inf")), axis=1), 0.0)[:, None]
    den = hi - lo + LRP_EPS
    x = tl.load(
        x_ptr + b[:, None] * stride_xb + c[:, None] * stride_xc + col64 * stride_xd, mask=mask, other=0.0
    ).to(tl.float32)
    y = x * ((rel - lo) / den)

    keys = tl.where(mask, pack_keys(y, col[None, :]), PAD_KEY)
    keys = bitonic_sort_rows(keys, LOG_D)
    ys, src = unpack_keys(keys)

    ref = tl.load(
        ref_ptr + b[:, None] * stride_rb + c[:, None] * stride_rc + col64 * stride_rd, mask=mask, other=0.0
    ).to(tl.float32)
    d = tl.where(mask, ys - ref, 0.0)
    tl.store(loss_ptr + row, tl.sum(d * d, axis=1) / D, mask=row_ok)
    rel_src = tl.load(rel_row + src.to(tl.int64) * stride_ld, mask=mask, other=0.0).to(tl.float32)
    tl.store(saved_ptr + row[:, None] * D + src, d * ((rel_src - lo) / den), mask=mask)


# One program per row, two loops over it in BLOCK chunks: the relevance min and max, then
# y = x * R̂ stored contiguous in the math dtype (fp32, or fp64 for float64 rows) for torch.sort.
# The row's min and denominator (max - min + eps) go to stats so the epilogue recomputes R̂
# bit for bit instead of storing it.
@triton.jit
def _lrp_weight_prologue_kernel(
    x_ptr,  # [B, C, D] activations, any float dtype, any strides
    rel_ptr,  # [B, C, D] relevance, any float dtype, any strides
    y_ptr,  # [B, C, D] out: x * R̂, math dtype, contiguous
    stats_ptr,  # [B * C, 2] out: (min rel, max rel - min rel + eps) per row, math dtype
    stride_xb, stride_xc, stride_xd,  # [B, C, D] strides of x
    stride_lb, stride_lc, stride_ld,  # [B, C, D] strides of rel
    C, D,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row - b * C
    acc_ty = y_ptr.dtype.element_ty
    rel_row = rel_ptr + b * stride_lb + c * stride_lc
    lo_acc = tl.full([BLOCK], float("inf"), dtype=acc_ty)
    hi_acc = tl.full([BLOCK], -float("inf"), dtype=acc_ty)
    for start in range(0, D, BLOCK):
        col = start + tl.arange(0, BLOCK).to(tl.int64)
        m = col < D
        rel = tl.load(rel_row + col * stride_ld, mask=m, other=0.0).to(acc_ty)
        lo_acc = tl.minimum(lo_acc, tl.where(m, rel, float("inf")))
        hi_acc = tl.maximum(hi_acc, tl.where(m, rel, -float("inf")))
    lo = tl.min(lo_acc, axis=0)
    den = tl.max(hi_acc, axis=0) - lo + LRP_EPS
    tl.store(stats_ptr + row * 2, lo)
    tl.store(stats_ptr + row * 2 + 1, den)
    for start in range(0, D, BLOCK):
        col = start + tl.arange(0, BLOCK).to(tl.int64)
        m = col < D
        rel = tl.load(rel_row + col * stride_ld, mask=m, other=0.0).to(acc_ty)
        x = tl.load(x_ptr + b * stride_xb + c * stride_xc + col * stride_xd, mask=m, other=0.0).to(acc_ty)
        tl.store(y_ptr + row * D + col, x * ((rel - lo) / den), mask=m)


# One program per row, looping over the torch.sort output in BLOCK chunks: squared differences
# of the sorted y against the reference accumulated in the math dtype in a BLOCK-wide vector
# (reduced once: deterministic, no atomics); saved = d * R̂ scattered to the source positions,
# R̂ recomputed from rel at those positions and the prologue's row stats.
@triton.jit
def _lrp_weight_epilogue_kernel(
    ys_ptr,  # [B, C, D] sorted y, math dtype, any strides
    src_ptr,  # [B, C, D] int64 source position of each sorted value, any strides
    rel_ptr,  # [B, C, D] relevance, any float dtype, any strides
    stats_ptr,  # [B * C, 2] (min rel, max rel - min rel + eps) per row, math dtype
    ref_ptr,  # [Bref, C, D] sorted reference rows, math dtype
    loss_ptr,  # [B, C] out: row losses, math dtype, contiguous
    saved_ptr,  # [B, C, D] out: (y - matched reference) * R̂, math dtype, contiguous
    stride_sb, stride_sc, stride_sd,  # [B, C, D] strides of the sorted values
    stride_ib, stride_ic, stride_id,  # [B, C, D] strides of the source positions
    stride_lb, stride_lc, stride_ld,  # [B, C, D] strides of rel
    stride_rb, stride_rc, stride_rd,  # [Bref, C, D] strides of ref (stride_rb = 0 when shared)
    C, D,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row - b * C
    acc_ty = saved_ptr.dtype.element_ty
    lo = tl.load(stats_ptr + row * 2)
    den = tl.load(stats_ptr + row * 2 + 1)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(0, D, BLOCK):
        col = start + tl.arange(0, BLOCK).to(tl.int64)
        m = col < D
        ys = tl.load(ys_ptr + b * stride_sb + c * stride_sc + col * stride_sd, mask=m, other=0.0).to(acc_ty)
        src = tl.load(src_ptr + b * stride_ib + c * stride_ic + col * stride_id, mask=m, other=0)
        ref = tl.load(ref_ptr + b * stride_rb + c * stride_rc + col * stride_rd, mask=m, other=0.0).to(acc_ty)
        d = tl.where(m, ys - ref, 0.0)
        acc += d * d
        rel = tl.load(rel_ptr + b * stride_lb + c * stride_lc + src * stride_ld, mask=m, other=0.0).to(acc_ty)
        tl.store(saved_ptr + row * D + src, d * ((rel - lo) / den), mask=m)
    tl.store(loss_ptr + row, tl.sum(acc, axis=0) / D)


# Elementwise, BLOCK elements of the flattened contiguous (B, C, D) per program (_rows.py):
# grad_x = grad_loss[b, c] * (2/D) * saved in saved's dtype (fp32 or fp64), cast on store to x's dtype.
@triton.jit
def _lrp_weight_bwd_kernel(
    grad_loss_ptr,  # [B, C] upstream gradient of the row losses, any strides (0 when expanded)
    saved_ptr,  # [B, C, D] saved (y - t) * R̂, math dtype, contiguous
    grad_x_ptr,  # [B, C, D] out: gradient of x, input dtype, contiguous
    stride_gb, stride_gc,  # [B, C] strides of grad_loss
    n_elems, C, D,
    BLOCK: tl.constexpr,
):
    scaled_rows_grad(grad_loss_ptr, saved_ptr, grad_x_ptr, stride_gb, stride_gc, n_elems, C, D, BLOCK)


def lrp_weight_fwd(
    x: torch.Tensor, rel: torch.Tensor, ref: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(B, C)`` and ``saved = (y − t) ⊙ R̂`` ``(B, C, D)`` (math dtype), y = x ⊙ R̂.

    ``x`` and ``rel`` are read through their strides (no copy); ``ref`` ``(1 or B, C, D)`` is in
    the math dtype.
    """
    check_shapes("lrp_weight_fwd", x, ref)
    if rel.shape != x.shape:
        raise ValueError(
            f"lrp_weight_fwd: rel must have the shape of x {tuple(x.shape)}, got {tuple(rel.shape)}"
        )
    B, C, D = x.shape
    n_rows = B * C
    md = math_dtype(x.dtype)
    loss = torch.empty((B, C), dtype=md, device=x.device)
    saved = torch.empty((B, C, D), dtype=md, device=x.device)
    if n_rows == 0:
        return loss, saved
    rsb, rsc, rsd = ref_strides(ref)
    if _heuristics.use_fused(D, x.dtype):
        block_d, log_d, rows, num_warps = _heuristics.fused_config(n_rows, D, x.device)
        torch.library.wrap_triton(_lrp_weight_fwd_kernel)[(triton.cdiv(n_rows, rows),)](
            x, rel, ref, loss, saved,
            *x.stride(), *rel.stride(), rsb, rsc, rsd,
            n_rows, C, D,
            ROWS=rows, BLOCK_D=block_d, LOG_D=log_d, num_warps=num_warps,
        )
    else:
        # Long rows (and float64): y by a prologue kernel, a segmented sort by torch, then one
        # fused pass over its output.
        y = torch.empty((B, C, D), dtype=md, device=x.device)
        stats = torch.empty((n_rows, 2), dtype=md, device=x.device)
        torch.library.wrap_triton(_lrp_weight_prologue_kernel)[(n_rows,)](
            x, rel, y, stats,
            *x.stride(), *rel.stride(),
            C, D,
            BLOCK=_heuristics.EPILOGUE_BLOCK, num_warps=_heuristics.EPILOGUE_WARPS,
        )
        ys, order = torch.sort(y, dim=-1, stable=True)
        torch.library.wrap_triton(_lrp_weight_epilogue_kernel)[(n_rows,)](
            ys, order, rel, stats, ref, loss, saved,
            *ys.stride(), *order.stride(), *rel.stride(), rsb, rsc, rsd,
            C, D,
            BLOCK=_heuristics.EPILOGUE_BLOCK, num_warps=_heuristics.EPILOGUE_WARPS,
        )
    return loss, saved


def lrp_weight_bwd(grad_loss: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_x`` ``(B, C, D)`` of ``dtype``: grad_loss[b, c] · (2/D) · saved[b, c, i]."""
    return launch_scaled_rows_bwd(_lrp_weight_bwd_kernel, grad_loss, saved, dtype)
