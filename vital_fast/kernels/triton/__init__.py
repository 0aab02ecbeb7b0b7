"""Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package raises a clear error when triton is missing; ``vital_fast`` itself
never imports it at package import time.
"""

from vital_fast import _ext

_triton, _why = _ext.load_triton()
if _triton is None:
    raise ImportError(f"vital_fast.kernels.triton needs triton: {_why}")
