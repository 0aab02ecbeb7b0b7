"""The image parametrizations and random views of the spectral baselines (Fourier, MACO).

Lucid's decorrelated colour and 1/f spectrum scaling, the affine views each step takes (Lucid's
jitter/scale/rotation, MACO's random crops), and MACO's magnitude spectrum computed from a target's
own reference images. :mod:`vital_fast.evaluate.baselines` documents the methods.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from vital_fast.references.images import ImageSet, random_resized_crops, resize_center_crop


# The square root of ImageNet's color correlation (Lucid), normalized by its largest column norm:
# rgb = C · z for a decorrelated image z.
_COLOR_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SVD_SQRT / _COLOR_SVD_SQRT.norm(dim=0).max()


def _recorrelate(z: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ck,bkhw->bchw", _COLOR.to(z.device, z.dtype), z)


def _decorrelate(x: torch.Tensor) -> torch.Tensor:
    inv = torch.linalg.inv(_COLOR.double()).float()
    return torch.einsum("ck,bkhw->bchw", inv.to(x.device, x.dtype), x)


def _fft_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    """Lucid's 1/f^decay scaling of an rfft2 spectrum ``(h, w // 2 + 1)``."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power


def _affine_warp(img01: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Per-element affine resampling of ``(B, 3, H, W)`` images in [0, 1]; grey outside."""
    grid = F.affine_grid(theta, [img01.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(img01 - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def _lucid_theta(gens: Sequence[torch.Generator], size: int, o: Mapping[str, Any]) -> torch.Tensor:
    """Lucid's standard transforms (pad, jitter, scale, rotate, jitter) as one affine map per element.

    The two jitters (crops of ``jitter_a`` and ``jitter_b`` pixels off a padded image) shift the
    content by up to ``(jitter_a + jitter_b) / 2`` pixels at 224 px, scaled to ``size``.
    """
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


def _maco_theta(gens: Sequence[torch.Generator], box: float, o: Mapping[str, Any], crops: int) -> torch.Tensor:
    """MACO's random square crops: ``crops`` per element, consecutive rows per element."""
    thetas = []
    for g in gens:
        for _ in range(crops):
            side = min(1.0, max(0.05, box + o["box_std"] * float(torch.randn(1, generator=g))))
            cx, cy = (0.5 + o["center_std"] * float(torch.randn(1, generator=g)) for _ in range(2))
            thetas.append(torch.tensor([[side, 0.0, 2 * cx - 1], [0.0, side, 2 * cy - 1]]))
    return torch.stack(thetas)


def _maco_magnitude(refs: ImageSet, size: int, loaded, crops: int, n_refs: int, gen: torch.Generator) -> torch.Tensor:
    """Mean |rfft2| ``(3, size, size // 2 + 1)`` of reference crops in decorrelated color space."""
    imgs = refs.images[:max(1, n_refs)]
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    per_image = -(-crops // max(1, len(imgs))) if crops > 0 else 0
    xs = []
    for img in imgs:
        xs.append(resize_center_crop(img, size, resize)[None])
        if per_image > 1:
            xs.append(random_resized_crops(img, size, per_image - 1, gen))
    z = _decorrelate(torch.cat(xs) - 0.5)
    return torch.fft.rfft2(z, norm="ortho").abs().mean(0)
