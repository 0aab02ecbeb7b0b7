"""Images of a run folder: tensors to PNG files (written atomically), the transparency alpha map,
the strip of reference thumbnails, and the grid of all targets."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vital_fast.references.cache import atomic_write_bytes

GRID = "grid.png"


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, C)`` uint8."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    mode = {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    Image.fromarray(arr, mode=mode).save(path, format="PNG")


def alpha_map(transparency: torch.Tensor, clip_percentile: float = 98.0) -> torch.Tensor:
    """Transparency ``(1, H, W)`` -> alpha in [0, 1], clipped at a percentile (the paper's 98th)."""
    t = transparency.float().flatten()
    hi = torch.quantile(t, clip_percentile / 100.0).clamp_min(1e-12)
    return (transparency.float() / hi).clamp(0, 1)


def reference_strip(images: Sequence[torch.Tensor], size: int = 96, max_n: int = 8) -> torch.Tensor:
    """Up to ``max_n`` reference thumbnails, center-cropped squares, side by side ``(3, size, n*size)``."""
    thumbs = []
    for img in list(images)[:max_n]:
        _, h, w = img.shape
        s = min(h, w)
        sq = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        thumbs.append(F.interpolate(sq[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=True)[0])
    return torch.cat(thumbs, dim=2) if thumbs else torch.ones(3, size, size)


def make_grid(images: torch.Tensor, ncol: Optional[int] = None, pad: int = 4) -> torch.Tensor:
    B, C, H, W = images.shape
    ncol = ncol or min(B, 8)
    nrow = -(-B // ncol)
    grid = torch.ones(C, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = images[i]
    return grid


def write_png_atomic(arr: np.ndarray, path: str) -> None:
    """Write a PNG atomically under a temporary name unique to this process."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode={3: "RGB", 4: "RGBA"}[arr.shape[-1]]).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_grid(out_dir: str, records: Sequence[Dict[str, Any]], thumb: int = 160) -> Optional[str]:
    """Write ``out_dir/grid.png``: every record's ``files["image"]`` as a ``thumb`` square, side by side.

    Returns the grid's path relative to ``out_dir`` (for the manifest's ``"grid"``), or None and
    nothing written when there are no records.
    """
    from PIL import Image

    imgs = []
    for rec in records:
        with Image.open(os.path.join(out_dir, rec["files"]["image"])) as im:
            arr = np.asarray(im.convert("RGB").resize((thumb, thumb)), dtype=np.float32) / 255.0
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
    if not imgs:
        return None
    write_png_atomic(to_uint8(make_grid(torch.stack(imgs))), os.path.join(out_dir, GRID))
    return GRID
