"""One optimizer step, shared by VITAL and the baselines."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from vital_fast.optim.result import ProgressFn

__all__ = ["descend"]


def descend(opt: torch.optim.Optimizer, x: torch.Tensor, loss: torch.Tensor, alpha: torch.Tensor, losses: torch.Tensor,
            step: int, total_steps: int, progress: Optional[ProgressFn], *, grad_of: Optional[torch.Tensor] = None,
            bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> int:
    """One optimizer step shared by VITAL and the baselines; returns the next global step.

    The per-element ``loss`` (B,) is summed and backpropagated once; the absolute gradient of
    ``grad_of`` (default ``x``), summed over colour, accumulates into the transparency ``alpha``;
    the optimizer steps; ``x`` is clamped to ``bounds = (lo, hi)``; the losses are recorded in
    column ``step`` of ``losses`` and reported to ``progress``.
    """
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    alpha += (x if grad_of is None else grad_of).grad.detach().abs().sum(1, keepdim=True)
    opt.step()
    if bounds is not None:
        with torch.no_grad():
            x.copy_(torch.max(torch.min(x, bounds[1]), bounds[0]))
    losses[:, step] = loss.detach().float().cpu()
    if progress is not None:
        progress(step + 1, total_steps, losses[:, step])
    return step + 1
