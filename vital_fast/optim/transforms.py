"""Per-sample random transforms: circular roll jitter, horizontal flip, scale and rotation, batched.

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


def draw_affine(gens: List[torch.Generator], scale: float, degrees: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per element: a scale factor in [1 - scale, 1 + scale] and an angle in [-degrees, degrees]."""
    s, a = [], []
    for g in gens:
        u = torch.rand(2, generator=g, dtype=torch.float64)
        s.append(1.0 + scale * (2 * u[0] - 1))
        a.append(degrees * (2 * u[1] - 1))
    return torch.stack(s), torch.stack(a)


def scale_rotate(x: torch.Tensor, scale: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Zoom each element of ``(B, C, H, W)`` by its own factor and rotate it by its own angle
    (bilinear, reflected borders); differentiable."""
    import math

    rad = degrees.to(torch.float64) * (math.pi / 180)
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
