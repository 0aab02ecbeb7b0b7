"""Reference prototypes and channel importance: computed once per reference set, then cached."""

from __future__ import annotations

from typing import Optional

import torch

from vital_fast import _backend, _validate
from vital_fast.ops.library import sorted_prototype_op  # torch.ops.vital_fast.sorted_prototype
from vital_fast.oracle import channel_importance_reference


def sorted_prototype(
    features: torch.Tensor,
    q: Optional[int] = None,
    *,
    relevance: Optional[torch.Tensor] = None,
    channel_dim: int = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The reference prototype of K images: the mean of their sorted rows, as Q quantiles.

    r = (1/K) Σ_k sort(a_k) per channel (the Wasserstein-2 barycenter of the K 1-D
    distributions), resampled to ``q`` points by linear interpolation (DESIGN.md §1). On CPU
    tensors the C++ backend ranks the rows by radix and sums them straight into place (2-7x
    ``torch.sort``); ``VITAL_FAST_BACKEND=reference`` runs :func:`vital_fast.oracle.sorted_prototype_reference`.

    Parameters
    ----------
    features : Tensor
        ``(K, C, *spatial)`` features of K reference images (or ``(K, N, C)`` tokens with
        ``channel_dim=-1``).
    q : int, optional
        Number of quantiles to keep; ``None`` keeps D = the number of values per row.
    relevance : Tensor, optional
        LRP relevance of the same shape: rows become A ⊙ R̂ (R̂ min-max normalized per row), the
        prototype that :func:`lrp_weight` matches against.
    channel_dim : int
        The channel dimension.
    backend : str, optional
        ``"cpp"`` or ``"reference"`` forces one (``"triton"`` runs the reference: ``torch.sort`` on the GPU);
        default: from the device, or ``VITAL_FAST_BACKEND``.

    Returns
    -------
    Tensor
        ``(C, q)`` sorted rows, float32 (float64 for float64 input).

    Example
    -------
    >>> import torch, vital_fast
    >>> vital_fast.sorted_prototype(torch.randn(4, 3, 8, 8), q=16).shape
    torch.Size([3, 16])
    """
    op = "sorted_prototype"
    _validate.check_tensor(features, "features", op, min_ndim=3)
    if relevance is not None:
        _validate.check_tensor(relevance, "relevance", op, like=features)
        if relevance.shape != features.shape:
            raise ValueError(
                f"{op}: 'relevance' must have the shape of 'features' {tuple(features.shape)}, "
                f"got {tuple(relevance.shape)}"
            )
    if q is not None and (not isinstance(q, int) or q < 1):
        raise ValueError(f"{op}: 'q' must be a positive int or None, got {q!r}")
    if features.shape[0] == 0:
        raise ValueError(f"{op}: 'features' holds no images (K = 0), shape {tuple(features.shape)}")
    b = "cpp" if _backend.resolve(op, features.device, backend) == "cpp" else "reference"
    return sorted_prototype_op(features.detach(), q, None if relevance is None else relevance.detach(),
                               channel_dim, b)


def channel_importance(relevance: torch.Tensor, *, channel_dim: int = 1) -> torch.Tensor:
    """Per-channel importance ``(C,)`` from the LRP relevance of K reference images.

    The spatial max of the relevance of each channel, min-max normalized across channels for
    each image, averaged over the images; pass it as ``weight`` to :func:`lrp_weight`.

    Example
    -------
    >>> import torch, vital_fast
    >>> w = vital_fast.channel_importance(torch.rand(4, 3, 8, 8))
    >>> w.shape, bool((w >= 0).all() and (w <= 1).all())
    (torch.Size([3]), True)
    """
    _validate.check_tensor(relevance, "relevance", "channel_importance", min_ndim=3)
    with torch.no_grad():
        return channel_importance_reference(relevance.detach(), channel_dim=channel_dim)
