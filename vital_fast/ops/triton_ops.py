"""The Triton kernels as ``torch.library.triton_op`` operators: ``torch.ops.vital_fast.*_triton``.

Imported by ``vital_fast._backend`` once triton imported (defining a triton_op imports triton and
``torch._dynamo``, which ``import vital_fast`` must not). Their autograd and vmap rules are those of the C++
operators (:mod:`vital_fast.ops.library`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensor

from vital_fast import _ext
from vital_fast.kernels.triton.lrp_weight import lrp_weight_bwd, lrp_weight_fwd
from vital_fast.kernels.triton.sort_match import sort_match_bwd, sort_match_fwd
from vital_fast.ops.library import LIB, bwd_fake, fwd_fake, register

# --- Triton: triton_op around the launchers ------------------------------------------------------
#
# ``torch.library.triton_op``: the launchers call their kernels through ``wrap_triton``, so under
# ``torch.compile`` the operator is decomposed into its kernels (AOTDispatcher traces the launcher) and
# inductor sees them and fuses around them; eagerly and under ``torch.export`` it is one operator.
#
# Under ``TRITON_INTERPRET=1`` (CPU tensors) ``wrap_triton`` hands back the interpreted kernel, which cannot
# be traced: there the operator stays one opaque node under compile (``_opaque``), and its fake kernel is
# the shape-only one below (triton_op's own would run the interpreted kernel on fake tensors).


def _traced_under_interpreter(t: Tensor) -> bool:
    return isinstance(t, FunctionalTensor) and _ext.triton_interpret()


def _opaque(name: str, *args):
    """Call ``vital_fast::name`` as one functional node, not decomposed into its (untraceable) kernels."""
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return getattr(torch.ops.vital_fast, name).default(*args)


@torch.library.triton_op(f"{LIB}::sort_match_fwd_triton", mutates_args=())
def sort_match_fwd_triton(x: Tensor, ref: Tensor) -> Tuple[Tensor, Tensor]:
    if _traced_under_interpreter(x):
        return _opaque("sort_match_fwd_triton", x, ref)
    return sort_match_fwd(x, ref)


@torch.library.triton_op(f"{LIB}::sort_match_bwd_triton", mutates_args=())
def sort_match_bwd_triton(grad_loss: Tensor, diff: Tensor, dtype: torch.dtype) -> Tensor:
    if _traced_under_interpreter(diff):
        return _opaque("sort_match_bwd_triton", grad_loss, diff, dtype)
    return sort_match_bwd(grad_loss, diff, dtype)


@torch.library.triton_op(f"{LIB}::lrp_weight_fwd_triton", mutates_args=())
def lrp_weight_fwd_triton(x: Tensor, rel: Tensor, ref: Tensor) -> Tuple[Tensor, Tensor]:
    if _traced_under_interpreter(x):
        return _opaque("lrp_weight_fwd_triton", x, rel, ref)
    return lrp_weight_fwd(x, rel, ref)


@torch.library.triton_op(f"{LIB}::lrp_weight_bwd_triton", mutates_args=())
def lrp_weight_bwd_triton(grad_loss: Tensor, saved: Tensor, dtype: torch.dtype) -> Tensor:
    if _traced_under_interpreter(saved):
        return _opaque("lrp_weight_bwd_triton", grad_loss, saved, dtype)
    return lrp_weight_bwd(grad_loss, saved, dtype)


for _op in (sort_match_fwd_triton, lrp_weight_fwd_triton):
    _op.register_fake(fwd_fake)
for _op in (sort_match_bwd_triton, lrp_weight_bwd_triton):
    _op.register_fake(bwd_fake)

register("sort_match_fwd_triton", "sort_match_bwd_triton")
register("lrp_weight_fwd_triton", "lrp_weight_bwd_triton")
