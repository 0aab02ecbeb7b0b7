"""The per-channel sort-matching loss (DESIGN.md §1) as an autograd Function and a functional."""

from __future__ import annotations

from typing import Optional

import torch
from vital_fast import _backend
from vital_fast.ops._common import FixedReferenceLoss, RowLossFunction, launchers, prepare
from vital_fast.ops.library import row_losses
from vital_fast.oracle import reduce_row_losses, sort_match_rows_reference

OP = "sort_match_loss"


class SortMatchLossFunction(RowLossFunction):
    """Row losses ``(B, C)`` of rows ``x`` ``(B, C, D)`` against sorted rows ``ref`` ``(Bref, C, D)``.

    The forward sorts each row once and saves one tensor, ``x − t`` (t: each element's matched
    reference value), in the math dtype; the backward is elementwise:
    ∂loss[b, c]/∂x[b, c, i] = (2/D)(x[i] − t[i]). The reference gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ref: torch.Tensor, backend: str) -> torch.Tensor:
        fwd, bwd = launchers("sort_match", backend)
        loss, diff = fwd(x, ref)
        RowLossFunction.stash(ctx, diff, bwd, x, n_inputs=3)
        return loss


def sort_match_loss(
    features: torch.Tensor,
    reference: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    channel_dim: int = 1,
    reduction: str = "mean",
    backend: Optional[str] = None,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Per-channel sort-matching loss: the squared 1-D Wasserstein-2 distance per channel.

    For each batch element b and channel c, the row x = features[b, c] (its D spatial values or
    tokens) is sorted and compared with the sorted reference row r::

        loss[b, c] = (1/D) · Σ_j (sort(x)[j] − r[j])²

    Parameters
    ----------
    features : Tensor
        ``(B, C, *spatial)`` (CNN layout, ``channel_dim=1``) or tokens ``(B, N, C)``
        (``channel_dim=-1``); float16, bfloat16, float32 or float64 (math in float32, or float64);
        any strides (channels-last and token layouts are read in place).
    reference : Tensor
        Sorted quantiles per channel: shared ``(C, Q)`` or per batch element ``(B, C, Q)``.
        When Q ≠ D it is resampled to D points by linear interpolation. Constant: no gradient.
    weight : Tensor, optional
        Per-channel weights ``(C,)`` or ``(B, C)`` multiplying each row's loss.
    channel_dim : int
        The channel dimension of ``features`` (not 0, the batch).
    reduction : {"mean", "none", "sum"}
        ``"mean"``: the mean over all B·C rows (the paper's scalar). ``"none"``: one loss per batch
        element, the mean over its channels, shape ``(B,)``. ``"sum"``: the sum of those.
    backend : {"reference", "cpp", "triton"}, optional
        Force a backend; by default chosen from the device (``VITAL_FAST_BACKEND`` overrides).
    check_values : bool, optional
        Check that inputs are finite and the reference sorted. ``None`` (default): on eager CPU tensors
        (a ValueError), and elsewhere (CUDA, ``torch.compile``, ``torch.func``) only with the debug flag
        (``vital_fast.set_debug()`` or ``VITAL_FAST_DEBUG=1``), as device-side asserts that read nothing
        back to the host; ``True``: always; ``False``: never.

    Returns
    -------
    Tensor
        A scalar, or ``(B,)`` for ``reduction="none"``; float32 (float64 for float64 input).

    Raises
    ------
    TypeError
        Non-tensor or non-float arguments.
    ValueError
        Shapes that do not match, tensors on different devices, NaN or Inf, an unsorted reference (the
        same messages at trace time under ``torch.compile``; value checks as described above).

    Example
    -------
    >>> import torch, vital_fast
    >>> feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    >>> ref = vital_fast.sorted_prototype(torch.randn(5, 3, 4, 4), q=8)
    >>> loss = vital_fast.sort_match_loss(feats, ref)
    >>> loss.backward()
    >>> feats.grad.shape
    torch.Size([2, 3, 4, 4])
    """
    x, _, ref = prepare(OP, features, reference, weight, channel_dim, reduction, check_values)
    backend = _backend.resolve(OP, x.device, backend)
    if backend == "reference":
        loss = sort_match_rows_reference(x.to(ref.dtype), ref)
    else:  # torch.ops.vital_fast.sort_match_fwd[_triton], its autograd registered (vital_fast.ops.library)
        loss = row_losses("sort_match", backend, x, ref)
    return reduce_row_losses(loss, weight, reduction)


class SortMatchLoss(FixedReferenceLoss):
    """:func:`sort_match_loss` against a fixed reference, as a module (a drop-in loss).

    Example
    -------
    >>> import torch, vital_fast
    >>> crit = vital_fast.SortMatchLoss(torch.sort(torch.randn(3, 16)).values)
    >>> crit(torch.randn(2, 3, 4, 4)).shape
    torch.Size([])
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return sort_match_loss(
            features,
            self.reference,
            self.weight,
            channel_dim=self.channel_dim,
            reduction=self.reduction,
            backend=self.backend,
        )
