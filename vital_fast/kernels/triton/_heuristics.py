"""Block, rows-per-program and warp choices for every Triton launcher, in one place.

Two paths per matching op (DESIGN.md §2):

* rows with ``D <= MAX_FUSED_D`` (and a 32-bit math dtype) are sorted on chip, whole, by a
  bitonic network over packed 64-bit keys (:mod:`._bitonic`); small rows are packed several per
  program so that each program holds about ``FUSED_ELEMS_PER_PROGRAM`` keys;
* longer rows (and float64) are sorted by ``torch.sort(stable=True)`` and finished by a fused
  Triton epilogue that loops over the row in ``EPILOGUE_BLOCK`` chunks.

``MAX_FUSED_D`` is read at call time (``use_fused``), so a test can lower it with monkeypatch to
force the large-row path on small inputs.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton

# Longest row sorted on chip. 4096 int64 keys are 32 KiB of registers per row (8 per thread at
# 16 warps, the most a program has); the unrolled network is 78 compare-swap stages and a 1.3 MB
# cubin. It covers every feature map up to 64x64 (56x56 ResNet stages, 197-token ViTs);
# 112x112 stems (12544) take the torch.sort path, since a 16384-key row would need 64 KiB of
# registers per program (32 per thread at 16 warps) and 105 stages.
MAX_FUSED_D = 4096
# Keys held by one program of the fused kernel: rows shorter than this are packed together
# (DESIGN.md §6 measured 64 rows of 64 per program as the fast case in the interpreter).
FUSED_ELEMS_PER_PROGRAM = 4096
MAX_ROWS_PER_PROGRAM = 64
# Under TRITON_INTERPRET=1 (CPU tensors) a program's cost is mostly per-operation Python overhead,
# so a program takes many more rows there: (64, 4096) runs in about 0.6 s instead of 7 s.
INTERPRET_ELEMS_PER_PROGRAM = 1 << 18
# Keys per thread that set num_warps of the fused kernels (see fused_config).
KEYS_PER_THREAD = 8
# Programs wanted per streaming multiprocessor before packing rows stops paying (CUDA only).
MIN_PROGRAMS_PER_SM = 2
# Chunk of the large-row prologue/epilogue loops and of the elementwise backward.
EPILOGUE_BLOCK = 1024
EPILOGUE_WARPS = 4
BWD_BLOCK = 1024
BWD_WARPS = 4


def use_fused(d: int, dtype: torch.dtype) -> bool:
    """Whether rows of length ``d`` in ``dtype`` take the on-chip bitonic path."""
    return dtype != torch.float64 and d <= MAX_FUSED_D


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fused_config(n_rows: int, d: int, device: torch.device) -> Tuple[int, int, int, int]:
    """``(BLOCK_D, LOG_D, ROWS, num_warps)`` for the fused kernels.

    BLOCK_D is the next power of two >= d (the bitonic network needs one). On CUDA, ROWS rows
    (a power of two) share a program while it stays near FUSED_ELEMS_PER_PROGRAM keys, halved
    while there would be fewer than MIN_PROGRAMS_PER_SM programs per SM. CPU tensors mean the
    interpreter, where fewer, larger programs are faster.
    """
    # int(): under torch.compile with dynamic shapes these are SymInts; the block sizes are constexprs of the
    # kernel, so the launch specializes on them (a recompile per row length, as inductor's own kernels).
    n_rows, d = int(n_rows), int(d)
    block_d = triton.next_power_of_2(d)
    log_d = block_d.bit_length() - 1
    if device.type == "cuda":
        rows = max(1, min(MAX_ROWS_PER_PROGRAM, FUSED_ELEMS_PER_PROGRAM // block_d))
    else:
        rows = max(1, INTERPRET_ELEMS_PER_PROGRAM // block_d)
    rows = min(rows, triton.next_power_of_2(n_rows))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        want = MIN_PROGRAMS_PER_SM * _sm_count(index)
        while rows > 1 and triton.cdiv(n_rows, rows) < want:
            rows //= 2
    # About 8 keys per thread: ptxas (sm_90) gives the 4096-key program 64-122 registers and no
    # spills at 16 warps, against 128-255 registers with spills at 8 (not yet timed on a GPU).
    num_warps = max(1, min(16, (rows * block_d) // (KEYS_PER_THREAD * 32)))
    return block_d, log_d, rows, num_warps
