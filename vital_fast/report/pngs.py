"""Images of a run folder: tensors to PNG files (written atomically), the transparency alpha map,
the strip of reference thumbnails, and the grid of all targets."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vital_fast.files import atomic_write_bytes

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


def fit_within(img: torch.Tensor, side: int) -> torch.Tensor:
    """``(3, H, W)`` scaled down (never up) so that its longer side is at most ``side``."""
    _, h, w = img.shape
    if max(h, w) <= side:
        return img
    s = side / max(h, w)
    return F.interpolate(img[None].float(), size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def labelled_grid(tiles: Sequence[np.ndarray], labels: Sequence[str], thumb: int, ncol: Optional[int] = None,
                  pad: int = 4, text_h: int = 14) -> np.ndarray:
    """``(thumb, thumb, 3)`` uint8 tiles in rows, each with its label written under it (white background)."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(tiles)
    ncol = ncol or min(n, 8)
    nrow = -(-n // ncol)
    cell_h = thumb + text_h
    canvas = Image.new("RGB", (ncol * (thumb + pad) + pad, nrow * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, ncol)
        x, y = pad + c * (thumb + pad), pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(tile), (x, y))
        text = str(label)
        while text and draw.textlength(text, font=font) > thumb:  # shorten to the tile's width
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text((x + 1, y + thumb + 1), text, fill=(30, 35, 48), font=font)
    return np.asarray(canvas)


def write_grid(out_dir: str, records: Sequence[Dict[str, Any]], thumb: int = 160) -> Optional[str]:
    """Write ``out_dir/grid.png``: every record's ``files["image"]`` as a ``thumb`` square, side by
    side, with the record's label under each tile.

    Returns the grid's path relative to ``out_dir`` (for the manifest's ``"grid"``), or None and
    nothing written when there are no records.
    """
    from PIL import Image

    tiles = []
    for rec in records:
        with Image.open(os.path.join(out_dir, rec["files"]["image"])) as im:
            tiles.append(np.asarray(im.convert("RGB").resize((thumb, thumb)), dtype=np.uint8))
    if not tiles:
        return None
    labels = [rec.get("label") or rec.get("key", "") for rec in records]
    write_png_atomic(labelled_grid(tiles, labels, thumb), os.path.join(out_dir, GRID))
    return GRID
