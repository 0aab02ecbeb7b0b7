"""Per-sample random transforms: circular roll jitter and horizontal flip, batched.

Each batch element draws from its own ``torch.Generator``, so an element's randomness does not
depend on which other targets share its batch (batched equals sequential).
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def draw_jitter(gens: List[torch.Generator], max_shift: int, flip: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element: vertical and horizontal shifts in [-max_shift, max_shift] and a flip bit."""
    dy, dx, fl = [], [], []
    for g in gens:
        s = torch.randint(-max_shift, max_shift + 1, (2,), generator=g) if max_shift > 0 else torch.zeros(2, dtype=torch.long)
        f = torch.randint(0, 2, (1,), generator=g) if flip else torch.zeros(1, dtype=torch.long)
        dy.append(s[0])
        dx.append(s[1])
        fl.append(f[0])
    return torch.stack(dy), torch.stack(dx), torch.stack(fl).bool()


def roll_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Roll each element of ``(B, C, H, W)`` by its own (dy, dx), then flip where asked; differentiable."""
    B, _, H, W = x.shape
    dev = x.device
    rows = (torch.arange(H, device=dev)[None, :] - dy.to(dev)[:, None]) % H  # (B, H)
    cols = (torch.arange(W, device=dev)[None, :] - dx.to(dev)[:, None]) % W  # (B, W)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=dev)[:, None, None]
    out = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)
