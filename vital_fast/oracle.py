"""Pure-torch references of every op: the test oracle, the benchmark baseline, the fallback.

Written for clarity and autograd (no in-place tricks); they work in float64 too. The fused
kernels in ``csrc/`` and ``vital_fast/kernels/triton`` must agree with these (DESIGN.md §4).

Notation: a *row* is the D values of one channel of one batch element (for a CNN the H·W
spatial values; for a ViT the N tokens of one embedding dimension). Features are brought to
``(B, C, D)`` by :func:`as_rows`.
"""

from __future__ import annotations

from typing import Optional

import torch

LRP_EPS = 1e-6


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(features: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """View ``features`` as ``(B, C, D)``: batch first, channels at ``channel_dim``, the rest flattened.

    ``(B, C, H, W)`` with ``channel_dim=1`` gives ``(B, C, H*W)``; tokens ``(B, N, C)`` with
    ``channel_dim=-1`` give ``(B, C, N)``. A view whenever the strides allow (channels-last and
    token layouts do), a copy otherwise.
    """
    x = features.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def resample_quantiles(ref: torch.Tensor, n: int) -> torch.Tensor:
    """Resample sorted rows ``(..., Q)`` to ``(..., n)`` points by linear interpolation.

    Output point j sits at position (j + 0.5) / n; input quantile k at (k + 0.5) / Q; values
    beyond the first and last quantile are held constant. Rows stay sorted.
    """
    q = ref.shape[-1]
    if q == n:
        return ref
    if q == 1:
        return ref.expand(*ref.shape[:-1], n)
    pos = (torch.arange(n, device=ref.device, dtype=torch.float64) + 0.5) * (q / n) - 0.5
    pos = pos.clamp(0.0, q - 1.0)
    lo = pos.floor().clamp(max=q - 2).long()
    frac = (pos - lo.to(torch.float64)).to(ref.dtype)
    return ref[..., lo] * (1 - frac) + ref[..., lo + 1] * frac


def reduce_row_losses(
    loss_rows: torch.Tensor, weight: Optional[torch.Tensor], reduction: str
) -> torch.Tensor:
    """Weight ``(B, C)`` row losses per channel and reduce.

    ``"mean"``: mean over all rows (the paper's scalar); ``"none"``: one loss per batch element,
    the mean over its channels, shape ``(B,)``; ``"sum"``: the sum of those per-element losses.
    """
    if weight is not None:
        loss_rows = loss_rows * weight.to(loss_rows.dtype)
    per_elem = loss_rows.mean(dim=1)
    if reduction == "none":
        return per_elem
    if reduction == "sum":
        return per_elem.sum()
    return per_elem.mean()


def sort_match_rows_reference(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Row losses ``(B, C)`` of rows ``x`` ``(B, C, D)`` against sorted rows ``ref`` broadcastable to it.

    loss[b, c] = (1/D) · Σ_j (sort(x[b, c])[j] − ref[b, c, j])², the squared 1-D Wasserstein-2
    distance between the empirical distributions of the two rows. Autograd through ``torch.sort``
    routes the gradient (2/D)(x[i] − t[i]) back to each element, where t[π[j]] = ref[j].
    """
    xs = torch.sort(x, dim=-1, stable=True).values
    return ((xs - ref) ** 2).mean(dim=-1)


def sort_match_reference(
    features: torch.Tensor,
    reference: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    channel_dim: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-channel sort-matching loss, pure torch (see :func:`vital_fast.sort_match_loss`)."""
    x = as_rows(features, channel_dim)
    md = math_dtype(features.dtype)
    x = x.to(md)
    ref = resample_quantiles(reference.to(md), x.shape[-1])
    if ref.dim() == 2:
        ref = ref.unsqueeze(0)
    return reduce_row_losses(sort_match_rows_reference(x, ref), weight, reduction)


def normalize_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each row of ``(B, C, D)`` relevance: (R − min R) / (max R − min R + 1e-6)."""
    lo = relevance.amin(dim=-1, keepdim=True)
    hi = relevance.amax(dim=-1, keepdim=True)
    return (relevance - lo) / (hi - lo + LRP_EPS)


def lrp_weight_reference(
    activations: torch.Tensor,
    relevance: torch.Tensor,
    reference: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    channel_dim: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Relevance-weighted sort-matching loss, pure torch (see :func:`vital_fast.lrp_weight`).

    Each row of the activations is multiplied by its min-max normalized relevance (a constant
    mask: no gradient flows into the relevance) and then sort-matched against ``reference``.
    """
    md = math_dtype(activations.dtype)
    rhat = normalize_relevance(as_rows(relevance, channel_dim).detach().to(md))
    x = as_rows(activations, channel_dim).to(md) * rhat
    ref = resample_quantiles(reference.to(md), x.shape[-1])
    if ref.dim() == 2:
        ref = ref.unsqueeze(0)
    return reduce_row_losses(sort_match_rows_reference(x, ref), weight, reduction)


def sorted_prototype_reference(
    features: torch.Tensor,
    q: Optional[int] = None,
    *,
    relevance: Optional[torch.Tensor] = None,
    channel_dim: int = 1,
) -> torch.Tensor:
    """Prototype ``(C, Q)`` of K reference images ``(K, C, *spatial)``: mean of sorted rows, as quantiles.

    r = (1/K) Σ_k sort(a_k), the Wasserstein-2 barycenter of the K 1-D distributions, then
    resampled to ``q`` quantiles (``q=None`` keeps D). With ``relevance``, rows are A ⊙ R̂.
    """
    x = as_rows(features, channel_dim).to(math_dtype(features.dtype))
    if relevance is not None:
        x = x * normalize_relevance(as_rows(relevance, channel_dim).to(x.dtype))
    proto = torch.sort(x, dim=-1).values.mean(dim=0)
    return resample_quantiles(proto, q if q is not None else proto.shape[-1])


def channel_importance_reference(relevance: torch.Tensor, *, channel_dim: int = 1) -> torch.Tensor:
    """Per-channel importance ``(C,)`` from the relevance of K reference images ``(K, C, *spatial)``.

    The spatial max of R per channel, min-max normalized across channels per image, averaged
    over the K images (DESIGN.md §1).
    """
    m = as_rows(relevance, channel_dim).to(math_dtype(relevance.dtype)).amax(dim=-1)
    lo = m.amin(dim=1, keepdim=True)
    hi = m.amax(dim=1, keepdim=True)
    return ((m - lo) / (hi - lo + LRP_EPS)).mean(dim=0)


def paper_style_sort_match_loss(
    features: torch.Tensor, reference_features: torch.Tensor, *, channel_dim: int = 1
) -> torch.Tensor:
    """The loss as the paper's public code computes it; a benchmark baseline, not for use.

    At every call it sorts the K reference images' features ``(K, C, *spatial)`` and averages
    them, sorts the synthetic rows by argsort, inverts that permutation with a second argsort,
    and takes the mean squared error against the matched targets.
    """
    x = as_rows(features, channel_dim).float()
    refs = as_rows(reference_features, channel_dim).float()
    proto = torch.sort(refs, dim=-1).values.mean(dim=0, keepdim=True)
    order = torch.argsort(x, dim=-1)
    inverse = torch.argsort(order, dim=-1)
    target = torch.gather(proto.expand_as(x), -1, inverse)
    return torch.nn.functional.mse_loss(x, target)
