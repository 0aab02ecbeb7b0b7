"""The fused ops as first-class PyTorch operators: ``torch.ops.vital_fast.*``.

Every compiled backend's forward and backward is one operator in the ``vital_fast`` library:

* C++ (CPU): ``sort_match_fwd``, ``sort_match_bwd``, ``lrp_weight_fwd``, ``lrp_weight_bwd``, defined with
  their schemas, CPU kernels and shape-only Meta kernels in ``csrc/`` (loaded with ``vital_fast._C``);
* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): the same four with a ``_triton`` suffix, defined
  with ``torch.library.triton_op`` (inductor sees the kernels) in :mod:`vital_fast.ops.triton_ops`, which
  the backend choice imports once triton loaded (defining them imports triton and dynamo: not at ``import vital_fast``);
* the prototype builder, ``sorted_prototype(Tensor features, int? q, Tensor? relevance, int channel_dim)``, whose
  CPU path runs the C++ ``sorted_rows_mean(Tensor x, Tensor? rel)`` (the mean of K images' sorted rows).

Each forward operator has its autograd registered through the library (``register_autograd``: the backward
is the backend's ``*_bwd`` operator, elementwise) and a vmap rule (``register_vmap``: a vmapped dimension is
folded into the batch, one call), so the ops work under ``torch.compile`` (``fullgraph=True``, no graph
break), ``torch.func.grad`` / ``vmap`` and ``torch.export``, and ``torch.library.opcheck`` passes on all of
them (tests/test_ops_library.py). :func:`row_losses` is what :func:`~vital_fast.sort_match_loss` and
:func:`~vital_fast.lrp_weight` call.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["row_losses", "register_cpp", "register"]

LIB = "vital_fast"


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fwd_fake(x: Tensor, *rest: Tensor) -> Tuple[Tensor, Tensor]:
    B, C, D = x.shape
    md = _math_dtype(x.dtype)
    return x.new_empty((B, C), dtype=md), x.new_empty((B, C, D), dtype=md)


def bwd_fake(grad_loss: Tensor, saved: Tensor, dtype: torch.dtype) -> Tensor:
    return saved.new_empty(saved.shape, dtype=dtype)


# --- the prototype builder ------------------------------------------------------------------------


@torch.library.custom_op(f"{LIB}::sorted_prototype", mutates_args=())
def sorted_prototype_op(features: Tensor, q: Optional[int], relevance: Optional[Tensor], channel_dim: int,
                        backend: str = "auto") -> Tensor:
    """``backend`` ``"cpp"``: the mean of the sorted rows from the C++ ``sorted_rows_mean``
    (csrc/sorted_prototype_cpu.cpp: rows ranked by radix, no sorted copy), resampled here; ``"reference"``:
    :func:`~vital_fast.oracle.sorted_prototype_reference`; ``"auto"``: the C++ kernel for CPU tensors once the
    extension is loaded, else the reference (on CUDA ``torch.sort`` is fast). :func:`vital_fast.sorted_prototype`
    passes the backend :mod:`vital_fast._backend` chose."""
    from vital_fast.oracle import as_rows, resample_quantiles, sorted_prototype_reference

    if backend == "auto":
        on_cpu = features.device.type == "cpu"
        backend = "cpp" if on_cpu and hasattr(torch.ops.vital_fast, "sorted_rows_mean") else "reference"
    with torch.no_grad():
        if backend == "cpp":
            rows = as_rows(features.detach(), channel_dim)
            rel = None if relevance is None else as_rows(relevance.detach(), channel_dim)
            proto = torch.ops.vital_fast.sorted_rows_mean(rows, rel)
            return resample_quantiles(proto, q if q is not None else proto.shape[-1])
        return sorted_prototype_reference(features.detach(), q, relevance=relevance, channel_dim=channel_dim)


@sorted_prototype_op.register_fake
def _(features, q, relevance, channel_dim, backend="auto"):
    cd = channel_dim % features.dim()
    C = features.shape[cd]
    D = 1
    for i, n in enumerate(features.shape):
        if i not in (0, cd):
            D = D * n
    return features.new_empty((C, D if q is None else q), dtype=_math_dtype(features.dtype))


# --- autograd and vmap of the forward and backward operators --------------------------------------


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)


def _make_backward(bwd):
    def backward(ctx, grad_loss, _grad_saved):
        (saved,) = ctx.saved_tensors
        grad_x = bwd(grad_loss.contiguous(), saved, ctx.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x,) + (None,) * (ctx.n_inputs - 1)

    return backward


def _fold(t: Tensor, d: Optional[int], V: int, B: int, keep_one: bool = False) -> Tensor:
    """``t`` with its vmapped dimension ``d`` folded into the batch: ``(V·B, ...)`` (``(1, ...)`` kept as is
    for an unbatched shared reference when ``keep_one``)."""
    if d is None:
        if keep_one and t.shape[0] == 1:
            return t
        t = t.unsqueeze(0).expand(V, *t.shape)
    else:
        t = t.movedim(d, 0)
    if t.shape[1] != B:  # a shared (1, C, D) reference under a vmapped one
        t = t.expand(V, B, *t.shape[2:])
    return t.reshape(V * B, *t.shape[2:])


def _fwd_vmap(op):
    def rule(info, in_dims: Sequence[Optional[int]], x: Tensor, *rest: Tensor):
        V, xd = info.batch_size, in_dims[0]
        B = x.shape[0] if xd is None else x.movedim(xd, 0).shape[1]
        args = [_fold(x, xd, V, B)]
        for t, d in zip(rest[:-1], in_dims[1:-1]):  # lrp_weight's relevance
            args.append(_fold(t, d, V, B))
        ref, rd = rest[-1], in_dims[-1]
        args.append(_fold(ref, rd, V, B, keep_one=rd is None))
        loss, saved = op(*args)
        return (loss.view(V, B, *loss.shape[1:]), saved.view(V, B, *saved.shape[1:])), (0, 0)

    return rule


def _bwd_vmap(op):
    def rule(info, in_dims, grad_loss: Tensor, saved: Tensor, dtype: torch.dtype):
        V = info.batch_size
        sd = in_dims[1]
        B = saved.shape[0] if sd is None else saved.movedim(sd, 0).shape[1]
        g = _fold(grad_loss, in_dims[0], V, B)
        s = _fold(saved, sd, V, B)
        out = op(g, s, dtype)
        return out.view(V, B, *out.shape[1:]), 0

    return rule


def register(fwd_name: str, bwd_name: str) -> None:
    """Register autograd and vmap of the operator pair ``vital_fast::fwd_name`` / ``bwd_name``."""
    fwd = getattr(torch.ops.vital_fast, fwd_name).default
    bwd = getattr(torch.ops.vital_fast, bwd_name).default
    torch.library.register_autograd(f"{LIB}::{fwd_name}", _make_backward(bwd), setup_context=_setup)
    torch.library.register_vmap(f"{LIB}::{fwd_name}", _fwd_vmap(fwd))
    torch.library.register_vmap(f"{LIB}::{bwd_name}", _bwd_vmap(bwd))


_cpp_registered = False


def register_cpp() -> None:
    """Register autograd and vmap of the C++ operators (once, after ``vital_fast._C`` loaded them)."""
    global _cpp_registered
    if not _cpp_registered:
        _cpp_registered = True
        register("sort_match_fwd", "sort_match_bwd")
        register("lrp_weight_fwd", "lrp_weight_bwd")


class _RowLoss(torch.autograd.Function):
    """The forward operator ``name`` (+ ``_triton``) and its ``*_bwd`` as an autograd Function in the
    ``setup_context`` form, which ``torch.func`` transforms need (the library's own registered autograd does
    not provide it); vmap comes from the operators' vmap rules (``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name: str, x: Tensor, ref: Tensor, rel: Optional[Tensor]):
        fwd = getattr(torch.ops.vital_fast, name)
        return fwd(x, ref) if rel is None else fwd(x, rel, ref)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        name, x, _, _ = inputs
        ctx.bwd_name = name.replace("_fwd", "_bwd")
        ctx.dtype = x.dtype
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_saved):
        (saved,) = ctx.saved_tensors
        grad_x = getattr(torch.ops.vital_fast, ctx.bwd_name)(grad_loss.contiguous(), saved, ctx.dtype)
        return None, grad_x, None, None


def row_losses(op: str, backend: str, x: Tensor, ref: Tensor, rel: Optional[Tensor] = None) -> Tensor:
    """Row losses ``(B, C)`` of ``op`` (``"sort_match"`` or ``"lrp_weight"``) on a compiled ``backend``
    (``"cpp"`` or ``"triton"``): the forward operator, differentiable in ``x`` (also under ``torch.func``)."""
    name = f"{op}_fwd" + ("_triton" if backend == "triton" else "")
    return _RowLoss.apply(name, x, ref, rel)[0]
