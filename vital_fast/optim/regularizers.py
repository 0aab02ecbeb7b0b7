"""Image priors, per batch element: total variation (L1 and L2 forms) and an L2 penalty."""

from __future__ import annotations

import torch


def _neighbour_diffs(x: torch.Tensor):
    # horizontal, vertical and both diagonals (DESIGN.md §1)
    return (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )


def total_variation(x: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Mean |difference|^p over the four neighbour directions, per element ``(B,)``."""
    out = 0
    for d in _neighbour_diffs(x):
        out = out + (d.abs() if p == 1 else d * d).flatten(1).mean(1)
    return out / 4


def l2_penalty(x: torch.Tensor) -> torch.Tensor:
    """Mean squared value per element ``(B,)``."""
    return (x * x).flatten(1).mean(1)


def image_priors(x: torch.Tensor, settings) -> torch.Tensor:
    """The weighted priors of ``settings`` (``tv_l1``, ``tv_l2``, ``l2``) per element ``(B,)``."""
    reg = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if settings.tv_l1:
        reg = reg + settings.tv_l1 * total_variation(x, 1)
    if settings.tv_l2:
        reg = reg + settings.tv_l2 * total_variation(x, 2)
    if settings.l2:
        reg = reg + settings.l2 * l2_penalty(x)
    return reg


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 over the rest."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
