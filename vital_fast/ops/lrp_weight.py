"""The fused LRP-weighting op: relevance-normalize, weight, then sort-match (DESIGN.md §1)."""

from __future__ import annotations

from typing import Optional

import torch
from vital_fast import _backend
from vital_fast.ops._common import FixedReferenceLoss, RowLossFunction, launchers, prepare
from vital_fast.ops.library import row_losses
from vital_fast.oracle import normalize_relevance, reduce_row_losses, sort_match_rows_reference

OP = "lrp_weight"


class LRPWeightFunction(RowLossFunction):
    """Row losses ``(B, C)`` of relevance-weighted rows against sorted rows ``ref`` ``(Bref, C, D)``.

    Per row: R̂ = (R − min R)/(max R − min R + 1e-6), y = x ⊙ R̂, then the sort-matching loss of y.
    The forward saves one tensor, (y − t) ⊙ R̂; the backward is elementwise,
    ∂loss/∂x[i] = (2/D)(y[i] − t[i]) R̂[i]. Relevance is a constant mask (no gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rel: torch.Tensor, ref: torch.Tensor, backend: str) -> torch.Tensor:
        fwd, bwd = launchers("lrp_weight", backend)
        loss, saved = fwd(x, rel, ref)
        RowLossFunction.stash(ctx, saved, bwd, x, n_inputs=4)
        return loss


def lrp_weight(
    activations: torch.Tensor,
    relevance: torch.Tensor,
    reference: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    channel_dim: int = 1,
    reduction: str = "mean",
    backend: Optional[str] = None,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Relevance-weighted sort-matching loss for channel targets, fused.

    Each row of ``activations`` is multiplied by its relevance, min-max normalized over the row,
    and the product is sort-matched against ``reference`` (a prototype of the reference images'
    relevance-weighted activations, see :func:`sorted_prototype`)::

        R̂ = (R − min R) / (max R − min R + 1e-6)
        loss[b, c] = (1/D) · Σ_j (sort(A ⊙ R̂)[j] − r[j])²

    ``weight`` carries the per-channel importance (:func:`channel_importance`).

    Parameters
    ----------
    activations : Tensor
        ``(B, C, *spatial)`` or tokens ``(B, N, C)`` with ``channel_dim=-1``; any float dtype.
    relevance : Tensor
        LRP relevance of the same shape (detached: a constant mask).
    reference : Tensor
        Sorted quantiles ``(C, Q)`` or ``(B, C, Q)``.
    weight : Tensor, optional
        Per-channel importance ``(C,)`` or ``(B, C)``.
    channel_dim, reduction, backend, check_values
        As in :func:`sort_match_loss`.

    Returns
    -------
    Tensor
        A scalar, or ``(B,)`` for ``reduction="none"``.

    Raises
    ------
    TypeError, ValueError
        As :func:`sort_match_loss`; also when ``relevance`` does not match ``activations``.

    Example
    -------
    >>> import torch, vital_fast
    >>> acts = torch.randn(2, 3, 5, 5, requires_grad=True)
    >>> rel = torch.rand(2, 3, 5, 5)
    >>> ref = torch.sort(torch.rand(3, 25)).values
    >>> vital_fast.lrp_weight(acts, rel, ref).backward()
    >>> acts.grad.shape
    torch.Size([2, 3, 5, 5])
    """
    x, rel, ref = prepare(
        OP, activations, reference, weight, channel_dim, reduction, check_values,
        relevance=relevance, features_name="activations",
    )
    backend = _backend.resolve(OP, x.device, backend)
    if backend == "reference":
        y = x.to(ref.dtype) * normalize_relevance(rel.to(ref.dtype))
        loss = sort_match_rows_reference(y, ref)
    else:
        loss = row_losses("lrp_weight", backend, x, ref, rel)
    return reduce_row_losses(loss, weight, reduction)


class LRPWeight(FixedReferenceLoss):
    """:func:`lrp_weight` against a fixed reference (and channel importance), as a module: called with the
    activations and their relevance.

    Example
    -------
    >>> import torch, vital_fast
    >>> crit = vital_fast.LRPWeight(torch.sort(torch.randn(3, 16)).values)
    >>> crit(torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)).shape
    torch.Size([])
    """

    def forward(self, activations: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        return lrp_weight(activations, relevance, self.reference, self.weight, channel_dim=self.channel_dim,
                          reduction=self.reduction, backend=self.backend)
