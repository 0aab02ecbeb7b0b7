"""On-chip stable row sort: packed 64-bit keys through a bitonic min/max network (DESIGN.md §6).

A key is ``order_preserving_bits(value) << 32 | column``: signed int64 order of the keys is the
float order of the values, ties broken by column, so the sort is exact and stable. The network
uses only reshape, min/max reductions over a size-2 axis and ``tl.where``: it compiles for the GPU
like ``tl.sort`` and, unlike ``tl.sort`` (whose swap is a Python-level xor reduction there), runs
at numpy speed in the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Key of a padding lane: sorts after every real key (whose column is < 2**31).
PAD_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def pack_keys(v, col):
    """fp32 values and int32 columns (broadcastable) -> int64 keys, ascending in (value, column).

    -0.0 becomes +0.0 (they compare equal, as in torch.sort) and every NaN the canonical
    positive NaN (sorted last, as in torch.sort).
    """
    v = v + 0.0
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v != v, 0x7FC00000, bits)
    # Negative floats order backwards as integers: flip their magnitude bits.
    s = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (s.to(tl.int64) << 32) | col.to(tl.int64)


@triton.jit
def unpack_keys(keys):
    """int64 keys -> (fp32 values, int32 columns); the inverse of :func:`pack_keys`."""
    s = (keys >> 32).to(tl.int32)
    bits = tl.where(s < 0, s ^ 0x7FFFFFFF, s)
    return bits.to(tl.float32, bitcast=True), keys.to(tl.int32)


@triton.jit
def _compare_swap(x, N: tl.constexpr, STAGE: tl.constexpr, I: tl.constexpr, ALTERNATE: tl.constexpr):
    # Pairs (i, i ^ 2**I) of the flattened tensor: the left one takes the min when its block of
    # 2**STAGE runs ascending, the max when it runs descending (block parity, ALTERNATE stages).
    OUTER: tl.constexpr = N >> (I + 1)
    INNER: tl.constexpr = 1 << I
    y = tl.reshape(x, [OUTER, 2, INNER])
    lo = tl.min(y, axis=1, keep_dims=True)
    hi = tl.max(y, axis=1, keep_dims=True)
    take_hi = tl.arange(0, 2)[None, :, None]
    if ALTERNATE:
        take_hi = take_hi ^ ((tl.arange(0, OUTER)[:, None, None] >> (STAGE - I - 1)) & 1)
    y = tl.where(take_hi != 0, hi, lo)
    return tl.reshape(y, x.shape)


@triton.jit
def bitonic_sort_rows(x, LOG_N: tl.constexpr):
    """Sort ``x`` ``[ROWS, 2**LOG_N]`` ascending along its last axis (no payload needed: pack it)."""
    N: tl.constexpr = x.numel
    for stage in tl.static_range(1, LOG_N + 1):
        for k in tl.static_range(stage):
            # The last stage merges each whole row ascending; earlier ones alternate direction.
            x = _compare_swap(x, N, stage, stage - 1 - k, stage < LOG_N)
    return x
