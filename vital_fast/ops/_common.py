"""Argument handling shared by the matching ops: validation, the row view, the launchers."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from vital_fast import _validate
from vital_fast.oracle import as_rows, math_dtype, resample_quantiles

REDUCTIONS = ("mean", "none", "sum")


class RowLossFunction(torch.autograd.Function):
    """Shared autograd plumbing of the matching ops: the forward launcher returns row losses
    ``(B, C)`` and one saved tensor of the rows' size; the backward is that op's elementwise
    ``<op>_bwd`` launcher. Subclasses define ``forward`` and call :meth:`stash`."""

    @staticmethod
    def stash(ctx, saved: torch.Tensor, bwd: Callable, x: torch.Tensor, n_inputs: int) -> None:
        ctx.save_for_backward(saved)
        ctx.bwd = bwd
        ctx.dtype = x.dtype
        ctx.n_inputs = n_inputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            (saved,) = ctx.saved_tensors
            grad_x = ctx.bwd(grad_loss, saved, ctx.dtype)
        return (grad_x,) + (None,) * (ctx.n_inputs - 1)


class FixedReferenceLoss(torch.nn.Module):
    """The modules' common part: a fixed reference (and optional per-channel weight) kept as buffers, with the
    functional's keyword options."""

    def __init__(
        self,
        reference: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        *,
        channel_dim: int = 1,
        reduction: str = "mean",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.register_buffer("reference", reference.detach())
        self.register_buffer("weight", None if weight is None else weight.detach())
        self.channel_dim = channel_dim
        self.reduction = reduction
        self.backend = backend


def launchers(op: str, backend: str) -> Tuple[Callable, Callable]:
    """The ``(<op>_fwd, <op>_bwd)`` launchers of a compiled backend."""
    if backend == "cpp":
        from vital_fast.kernels import cpu as mod
    else:
        from vital_fast.kernels import triton as _t  # noqa: F401  (import guard)
        import importlib

        mod = importlib.import_module(f"vital_fast.kernels.triton.{op}")
    return getattr(mod, f"{op}_fwd"), getattr(mod, f"{op}_bwd")


def prepare(
    op: str,
    features: torch.Tensor,
    reference: torch.Tensor,
    weight: Optional[torch.Tensor],
    channel_dim: int,
    reduction: str,
    check_values: Optional[bool],
    relevance: Optional[torch.Tensor] = None,
    features_name: str = "features",
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Validate the arguments; return ``(x, rel, ref)`` as ``(B, C, D)`` rows and ``(Bref, C, D)``.

    ``ref`` is resampled to D points when its Q differs, cast to the math dtype and made
    contiguous (it is small for a shared reference: one image's worth).
    """
    _validate.check_tensor(features, features_name, op, min_ndim=3)
    if not isinstance(channel_dim, int) or not (-features.dim() <= channel_dim < features.dim()):
        raise ValueError(
            f"{op}: 'channel_dim' must be an int in [-{features.dim()}, {features.dim() - 1}] "
            f"for {features_name} of shape {tuple(features.shape)}, got {channel_dim!r}"
        )
    if channel_dim % features.dim() == 0:
        raise ValueError(f"{op}: 'channel_dim' must not be the batch dimension 0, got {channel_dim}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    _validate.check_tensor(reference, "reference", op, ndim=(2, 3), like=features, like_name=features_name)
    x = as_rows(features, channel_dim)
    B, C, D = x.shape
    if D == 0:
        raise ValueError(f"{op}: rows of '{features_name}' are empty (D = 0) for shape {tuple(features.shape)}")
    if B == 0 or C == 0:
        raise ValueError(f"{op}: '{features_name}' has no rows (B = {B}, C = {C}), shape {tuple(features.shape)}")
    want = f"(C, Q) = ({C}, Q) or (B, C, Q) = ({B}, {C}, Q)"
    if reference.shape[-2] != C or (reference.dim() == 3 and reference.shape[0] != B):
        raise ValueError(
            f"{op}: 'reference' must have shape {want} for {features_name} of shape "
            f"{tuple(features.shape)} (channel_dim={channel_dim}), got {tuple(reference.shape)}"
        )
    if reference.shape[-1] == 0:
        raise ValueError(f"{op}: 'reference' has Q = 0 quantiles, shape {tuple(reference.shape)}")
    rel = None
    if relevance is not None:
        _validate.check_tensor(relevance, "relevance", op, like=features, like_name=features_name)
        if relevance.shape != features.shape:
            raise ValueError(
                f"{op}: 'relevance' must have the shape of '{features_name}' {tuple(features.shape)}, "
                f"got {tuple(relevance.shape)}"
            )
        rel = as_rows(relevance.detach(), channel_dim)
    if weight is not None:
        _validate.check_tensor(weight, "weight", op, ndim=(1, 2), like=features, like_name=features_name)
        if weight.shape[-1] != C or (weight.dim() == 2 and weight.shape[0] != B):
            raise ValueError(
                f"{op}: 'weight' must have shape (C,) = ({C},) or (B, C) = ({B}, {C}), "
                f"got {tuple(weight.shape)}"
            )
    how = _validate.want_values(check_values, features)
    if how != "off":
        finite, ordered = ((_validate.check_finite, _validate.check_sorted) if how == "read"
                           else (_validate.assert_finite, _validate.assert_sorted))
        finite(features, features_name, op)
        finite(reference, "reference", op)
        ordered(reference, "reference", op)
        if rel is not None:
            finite(relevance, "relevance", op)
        if weight is not None:
            finite(weight, "weight", op)
    ref = reference.detach().to(math_dtype(features.dtype))
    ref = resample_quantiles(ref, D)
    if ref.dim() == 2:
        ref = ref.unsqueeze(0)
    # The kernels read the reference with plain row offsets; it is small (or temporary when
    # per-element and resampled), so a contiguous copy here costs little.
    return x, rel, ref.contiguous()
