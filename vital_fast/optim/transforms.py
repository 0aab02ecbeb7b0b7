"""Per-sample random transforms: circular roll jitter, horizontal flip, scale and rotation, batched.

Each batch element draws from its own ``torch.Generator``, so an element's randomness does not
depend on which other targets share its batch (batched equals sequential).
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def draw_jitter(gens: List[torch.Generator], max_shift: int, flip: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element: vertical and horizontal shifts in [-max_shift, max_shift] and a flip bit (one draw of each
    kind per generator, then one stack: the ops of a step grow by two per element, not by five)."""
    n = len(gens)
    if max_shift > 0 or flip:
        shifts, flips = [], []
        for g in gens:
            if max_shift > 0:
                shifts.append(torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
            if flip:
                flips.append(torch.randint(0, 2, (1,), generator=g))
    s = torch.stack(shifts) if max_shift > 0 else torch.zeros(n, 2, dtype=torch.long)
    f = torch.cat(flips) if flip else torch.zeros(n, dtype=torch.long)
    return s[:, 0], s[:, 1], f.bool()


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
    u = torch.stack([torch.rand(2, generator=g, dtype=torch.float64) for g in gens])
    return 1.0 + scale * (2 * u[:, 0] - 1), degrees * (2 * u[:, 1] - 1)


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


# --- the random views an engine step takes of each image ----------------------------------------

def affine_warp(img01: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Per-element affine resampling of ``(B, 3, H, W)`` images in [0, 1]; grey outside."""
    grid = torch.nn.functional.affine_grid(theta, [img01.shape[0], 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(img01 - 0.5, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False) + 0.5


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def lucid_theta(gens: List[torch.Generator], size: int, o) -> torch.Tensor:
    """Lucid's standard transforms (pad, jitter, scale, rotate, jitter) as one affine map per element.

    The two jitters (crops of ``jitter_a`` and ``jitter_b`` pixels off a padded image) shift the
    content by up to ``(jitter_a + jitter_b) / 2`` pixels at 224 px, scaled to ``size``.
    """
    import math

    thetas = []
    lo_s, hi_s = o["scale"]
    n_scales = 11
    px = 2.0 / size
    jit = (o["jitter_a"] + o["jitter_b"]) / 2 * size / 224
    for g in gens:
        s = lo_s + (hi_s - lo_s) * int(torch.randint(0, n_scales, (1,), generator=g)) / (n_scales - 1)
        a = math.radians(int(torch.randint(-int(o["rotate"]), int(o["rotate"]) + 1, (1,), generator=g)))
        tx, ty = (round(_uniform(g, -jit, jit)) * px for _ in range(2))
        c, si = math.cos(a) / s, math.sin(a) / s
        thetas.append(torch.tensor([[c, -si, tx], [si, c, ty]]))
    return torch.stack(thetas)


def maco_theta(gens: List[torch.Generator], boxes: List[float], o, crops: int) -> torch.Tensor:
    """MACO's random square crops: ``crops`` per element (box side ``boxes[i]``), element-major rows."""
    thetas = []
    for g, box in zip(gens, boxes):
        for _ in range(crops):
            side = min(1.0, max(0.05, box + o["box_std"] * float(torch.randn(1, generator=g))))
            cx, cy = (0.5 + o["center_std"] * float(torch.randn(1, generator=g)) for _ in range(2))
            thetas.append(torch.tensor([[side, 0.0, 2 * cx - 1], [0.0, side, 2 * cy - 1]]))
    return torch.stack(thetas)


class Views:
    """The random views of a batch that one step optimizes through.

    ``space`` says what images the views take: ``"any"`` (they commute with a per-channel affine
    map, so the model's normalized space or [0, 1] alike) or ``"unit"`` (RGB in [0, 1]).
    ``repeat`` is the number of views per element (element-major rows).
    """

    space = "any"
    repeat = 1

    def __call__(self, img: torch.Tensor, gens: List[torch.Generator], size: int,
                 progress: List[Tuple[int, int]]) -> torch.Tensor:
        """``progress[i]`` is element i's (steps done, total steps)."""
        raise NotImplementedError


class RollViews(Views):
    """VITAL's views: circular roll jitter up to ``jitter`` of the side, flips, zoom and rotation."""

    def __init__(self, jitter: float, flip: bool, scale: float = 0.0, rotate: float = 0.0) -> None:
        self.jitter, self.flip, self.scale, self.rotate = float(jitter), bool(flip), float(scale), float(rotate)

    def __call__(self, img, gens, size, progress):
        dy, dx, fl = draw_jitter(gens, int(round(self.jitter * size)), self.flip)
        out = roll_flip(img, dy, dx, fl)
        if self.scale or self.rotate:
            out = scale_rotate(out, *draw_affine(gens, self.scale, self.rotate))
        return out


class LucidViews(Views):
    """Lucid's pad, jitter, scale, rotate, jitter as one affine warp per element (grey outside)."""

    space = "unit"

    def __init__(self, options) -> None:
        self.o = dict(options)

    def __call__(self, img, gens, size, progress):
        return affine_warp(img, lucid_theta(gens, size, self.o).to(img.device), size)


class MacoViews(Views):
    """MACO's random crops (box side falling from ``box_start`` to ``box_end`` over the run) plus
    Gaussian and uniform noise."""

    space = "unit"

    def __init__(self, options) -> None:
        self.o = dict(options)
        self.repeat = int(self.o.get("crops", 1))

    def __call__(self, img, gens, size, progress):
        o, crops = self.o, self.repeat
        boxes = [o["box_start"] + (o["box_end"] - o["box_start"]) * (done / max(1, total - 1))
                 for done, total in progress]
        src = img.repeat_interleave(crops, dim=0) if crops > 1 else img
        out = affine_warp(src, maco_theta(gens, boxes, o, crops).to(img.device), size)
        nz = o["noise"]
        noise = torch.cat([torch.randn(crops, 3, size, size, generator=g) * (nz / 2)
                           + (torch.rand(crops, 3, size, size, generator=g) - 0.5) * (nz / 2) for g in gens])
        return out + noise.to(img.device)
