"""Top-k reference mining for channel targets: one pass over a pool of images for all channels.

Each image is scored per channel by the channel's spatial maximum at the layer; each channel keeps
the k best distinct images. References are either those full images (what the paper's code uses)
or patches cropped around the most active location, with a box sized to the unit's receptive
field and resized to the model's input size (what the paper describes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from vital_fast.references.cache import DiskCache, check_tensor
from vital_fast.references.images import ImageSet, resize_center_crop

CHANNEL_REF_MODES = ("image", "patch")


@dataclass
class TopK:
    """For one layer: per requested channel, the indices of its top-k images, scores and locations."""

    layer: str
    channels: List[int]
    index: torch.Tensor      # (n_channels, k) image indices into the pool
    score: torch.Tensor      # (n_channels, k) spatial max of the channel on that image
    loc: torch.Tensor        # (n_channels, k, 2) (y, x) of the max, in the layer's grid
    grid: tuple              # (H, W) of the layer at the mining resolution
    mean_score: torch.Tensor  # (n_channels,) mean of the top-k scores (evaluation: relative activation)


def receptive_field(loaded, layer: str, size: int) -> int:
    """Side in input pixels of the region that influences the center unit of ``layer`` (measured by a gradient)."""
    from vital_fast.models import FeatureTaps

    dev = next(iter(loaded.model.parameters())).device
    x = torch.randn(1, 3, size, size, device=dev, requires_grad=True)
    with FeatureTaps(loaded.model, [layer], stop_after=True) as taps:
        a = taps.run(x)[layer]
    if a.dim() != 4:
        return size
    h, w = a.shape[-2:]
    a[0, :, h // 2, w // 2].sum().backward()
    nz = x.grad[0].abs().sum(0) > 0
    ys, xs = torch.nonzero(nz, as_tuple=True)
    if ys.numel() == 0:
        return size
    return int(min(size, max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))


def mine_topk(
    loaded,
    layer: str,
    pool: ImageSet,
    channels: Optional[Sequence[int]],
    k: int,
    size: int,
    cache: Optional[DiskCache] = None,
    batch: int = 8,
) -> TopK:
    """Score every image of ``pool`` for every channel of ``layer`` in one pass; keep the top ``k``.

    Raises
    ------
    ValueError
        A channel out of range for the layer, or ``k`` larger than the pool.
    """
    from vital_fast.models import FeatureTaps

    if k > len(pool):
        raise ValueError(f"top-k mining: k = {k} references asked for, but the image pool holds only {len(pool)} images")
    cache = cache or DiskCache(enabled=False)
    parts = {"model": loaded.fingerprint, "layer": layer, "images": pool.hashes, "size": size,
             "resize": loaded.resize_size / loaded.input_size}

    def compute():
        dev = next(iter(loaded.model.parameters())).device
        resize = int(round(size * loaded.resize_size / loaded.input_size))
        scores, locs, grid = [], [], None
        with torch.no_grad(), FeatureTaps(loaded.model, [layer], detach=True, stop_after=True) as taps:
            for i in range(0, len(pool), batch):
                x = torch.stack([resize_center_crop(im, size, resize) for im in pool.images[i:i + batch]])
                a = taps.run(loaded.normalize(x).to(dev))[layer].float().cpu()
                if a.dim() == 3:  # tokens (B, N, C) -> (B, C, N, 1)
                    a = a.transpose(1, 2)[..., None]
                grid = tuple(a.shape[2:])
                flat = a.flatten(2)
                s, arg = flat.max(dim=2)
                scores.append(s)
                locs.append(torch.stack([arg // grid[-1], arg % grid[-1]], dim=-1))
        return {"score": torch.cat(scores), "loc": torch.cat(locs), "grid": torch.tensor(grid)}

    def validate(val):
        from vital_fast.references.prototypes import layer_channels

        if not isinstance(val, dict) or not {"score", "loc", "grid"} <= set(val):
            raise ValueError("not a top-k mining entry")
        check_tensor(val["grid"], "grid", ndim=1, floating=False)
        grid = [int(g) for g in val["grid"]]
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"bad grid {grid}")
        c = layer_channels(loaded, layer, None)  # (B, N, C) outputs are read as (B, C, N, 1)
        check_tensor(val["score"], "scores", shape=(len(pool), c))
        check_tensor(val["loc"], "locations", shape=(len(pool), val["score"].shape[1], 2), floating=False)
        loc = val["loc"]
        if loc.numel() and (bool((loc < 0).any()) or int(loc[..., 0].max()) >= grid[0]
                            or int(loc[..., 1].max()) >= grid[1]):
            raise ValueError(f"locations outside the {grid[0]}x{grid[1]} grid")

    val = cache.get_or_compute("mine", parts, compute, validate)
    score_all, loc_all = val["score"], val["loc"]  # (N, C), (N, C, 2)
    n_ch = score_all.shape[1]
    chans = list(range(n_ch)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chans if not 0 <= c < n_ch]
    if bad:
        raise ValueError(f"layer {layer!r} has {n_ch} channels (0-{n_ch - 1}); got channel(s) {bad[:5]}")
    sel = score_all[:, chans]  # (N, n)
    top_s, top_i = sel.topk(k, dim=0)  # distinct images per channel
    ch_idx = torch.tensor(chans)
    loc = loc_all[top_i, ch_idx[None, :]]  # (k, n, 2)
    return TopK(layer, chans, top_i.T.contiguous(), top_s.T.contiguous(), loc.permute(1, 0, 2).contiguous(),
                tuple(int(g) for g in val["grid"]), top_s.mean(0))


def crop_patch(loaded, img: torch.Tensor, loc, grid, rf: int, size: int) -> torch.Tensor:
    """A square patch of the original image around a unit, sized to its receptive field, resized to ``size``."""
    _, h0, w0 = img.shape
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    scale = resize / min(h0, w0)
    nh, nw = round(h0 * scale), round(w0 * scale)
    top, left = (nh - size) // 2, (nw - size) // 2
    cy = (float(loc[0]) + 0.5) * size / grid[0]
    cx = (float(loc[1]) + 0.5) * size / grid[1]
    # to original-image coordinates
    oy, ox, side = (cy + top) / scale, (cx + left) / scale, max(8.0, rf / scale)
    side = min(side, float(min(h0, w0)))
    y0 = int(round(min(max(oy - side / 2, 0), h0 - side)))
    x0 = int(round(min(max(ox - side / 2, 0), w0 - side)))
    s = int(round(side))
    patch = img[:, y0:y0 + s, x0:x0 + s]
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def channel_reference_images(loaded, topk: TopK, pool: ImageSet, mode: str, size: int) -> Dict[int, ImageSet]:
    """Per channel, its reference images: the top-k full images, or patches around the unit."""
    if mode not in CHANNEL_REF_MODES:
        raise ValueError(f"channel reference mode must be one of {CHANNEL_REF_MODES}, got {mode!r}")
    out: Dict[int, ImageSet] = {}
    rf = receptive_field(loaded, topk.layer, size) if mode == "patch" else 0
    for row, c in enumerate(topk.channels):
        idx = [int(i) for i in topk.index[row]]
        if mode == "image":
            out[c] = pool.subset(idx)
        else:
            imgs = [crop_patch(loaded, pool.images[i], topk.loc[row, j], topk.grid, rf, size) for j, i in enumerate(idx)]
            names = [f"{pool.names[i]}#patch{tuple(int(v) for v in topk.loc[row, j])}" for j, i in enumerate(idx)]
            hashes = [f"{pool.hashes[i]}-{int(topk.loc[row, j, 0])}-{int(topk.loc[row, j, 1])}-{rf}" for j, i in enumerate(idx)]
            out[c] = ImageSet(imgs, names, hashes)
    return out
