"""The Triton kernels compile for a real GPU (sm_90), checked here without one.

The interpreter accepts some code the GPU compiler rejects; compiling for sm_90 catches that.
Skipped under TRITON_INTERPRET=1 (the compiler is not used there).
"""

from __future__ import annotations

import pytest

from conftest import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton, without TRITON_INTERPRET")


def _compile(fn, xdt: str, md: str, constexprs: dict, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def typ(n: str) -> str:
        if n.endswith("_ptr"):
            if n in ("x_ptr", "rel_ptr", "xs_ptr", "grad_x_ptr"):
                return "*" + xdt
            if n == "src_ptr":
                return "*i64"
            return "*" + md
        return "i32"

    sig = {n: ("constexpr" if n in constexprs else typ(n)) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert len(k.asm["cubin"]) > 0


@pytest.mark.parametrize("op", ["sort_match", "lrp_weight"])
def test_fused_row_kernels_compile_for_sm90(op):
    import importlib

    mod = importlib.import_module(f"vital_fast.kernels.triton.{op}")
    _compile(getattr(mod, f"_{op}_fwd_kernel"), "bf16", "fp32", {"ROWS": 16, "BLOCK_D": 64, "LOG_D": 6}, 4)


def test_large_row_and_backward_kernels_compile_for_sm90():
    from vital_fast.kernels.triton import lrp_weight as lw
    from vital_fast.kernels.triton import sort_match as sm

    for fn in (sm._sort_match_epilogue_kernel, sm._sort_match_bwd_kernel, lw._lrp_weight_prologue_kernel,
               lw._lrp_weight_bwd_kernel):
        _compile(fn, "fp32", "fp32", {"BLOCK": 1024})
    _compile(lw._lrp_weight_epilogue_kernel, "fp32", "fp32", {"BLOCK": 1024})
