"""Top-k reference mining for channel targets: one streaming pass over a pool of images for all channels.

Each image is scored per channel by the channel's spatial maximum at the layer; each channel keeps
the k best distinct images. The pool (:class:`~vital_fast.references.pool.ImagePool`: a folder, a
list of files, a dataset or an in-memory :class:`ImageSet`) is read in batches by DataLoader
workers and never held whole in memory: per channel only the running top-k (score, image index,
location) is kept, and only the winners are read again to make references. References are either
those full images (what the paper's code uses) or patches cropped around the most active location,
with a box sized to the unit's receptive field and resized to the model's input size (what the
paper describes).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Union

import torch
import torch.nn.functional as F

from vital_fast.references.cache import DiskCache, check_tensor
from vital_fast.references.images import ImageSet
from vital_fast.references.pool import ImagePool, as_pool

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

    def select(self, channels: Sequence[int]) -> "TopK":
        """The rows of ``channels`` (each one of :attr:`channels`), as :func:`mine_topk` would give them."""
        row = {c: i for i, c in enumerate(self.channels)}
        missing = [int(c) for c in channels if int(c) not in row]
        if missing:
            raise ValueError(f"channel(s) {missing[:5]} were not mined for layer {self.layer!r}")
        rows = torch.tensor([row[int(c)] for c in channels], dtype=torch.long)
        s = self.score[rows].contiguous()
        return TopK(self.layer, [int(c) for c in channels], self.index[rows].contiguous(), s,
                    self.loc[rows].contiguous(), self.grid, s.t().contiguous().mean(0))


def receptive_field(loaded, layer: str, size: int) -> int:
    """Side in input pixels of the region that influences the center unit of ``layer`` (measured by a gradient; the
    probe's noise comes from a generator of its own, so the caller's random stream is left as it was)."""
    from vital_fast.models import FeatureTaps

    dev = next(iter(loaded.model.parameters())).device
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev).requires_grad_()
    with FeatureTaps(loaded.model, [layer], stop_after=True) as taps:
        a = taps.run(x.to(loaded.dtype))[layer]
    if a.dim() != 4:
        return size
    h, w = a.shape[-2:]
    a[0, :, h // 2, w // 2].sum().backward()
    nz = x.grad[0].abs().sum(0) > 0
    ys, xs = torch.nonzero(nz, as_tuple=True)
    if ys.numel() == 0:
        return size
    return int(min(size, max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))


@dataclass
class Units:
    """What a mining pass scores besides a layer's channels: ``weights`` (N, C) projections (a channel is a
    one-hot row), ``bias`` (N,), and ``locs`` (N, 2) fixed positions for spatial neurons (``-1``: the map's
    maximum). Its ``digest`` keys the cache."""

    weights: torch.Tensor
    bias: torch.Tensor
    locs: Optional[torch.Tensor] = None

    @property
    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(self.weights.float().contiguous().numpy().tobytes())
        h.update(self.bias.float().contiguous().numpy().tobytes())
        if self.locs is not None:
            h.update(self.locs.long().contiguous().numpy().tobytes())
        return h.hexdigest()[:24]

    def score(self, a: torch.Tensor):
        """``(B, C, H, W)`` features -> per unit ``(B, N)`` scores and flat argmax positions."""
        w = self.weights.to(a.device, a.dtype)
        u = torch.einsum("bchw,nc->bnhw", a, w) + self.bias.to(a.device, a.dtype)[None, :, None, None]
        s, arg = u.flatten(2).max(dim=2)
        if self.locs is not None:
            fixed = self.locs[:, 0] >= 0
            if bool(fixed.any()):
                W = a.shape[3]
                pos = (self.locs[:, 0] * W + self.locs[:, 1]).to(a.device)
                at = u.flatten(2).gather(2, pos.clamp(min=0)[None, :, None].expand(a.shape[0], -1, 1))[..., 0]
                f = fixed.to(a.device)[None, :]
                s = torch.where(f, at, s)
                arg = torch.where(f, pos[None, :].expand_as(arg), arg)
        return s, arg


def _validate_entry(loaded, layer: str, pool: ImagePool, k: int, rows: Optional[int] = None):
    """A validator for a cached top-k entry of ``layer`` over ``pool`` (``rows``: its units, default the
    layer's channels)."""

    def validate(val):
        from vital_fast.references.prototypes import layer_channels

        if not isinstance(val, dict) or not {"score", "index", "loc", "grid", "n"} <= set(val):
            raise ValueError("not a top-k mining entry")
        check_tensor(val["grid"], "grid", ndim=1, floating=False)
        grid = [int(g) for g in val["grid"]]
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"bad grid {grid}")
        n = int(val["n"])
        if not 1 <= n <= len(pool):
            raise ValueError(f"{n} images scored, for a pool of {len(pool)}")
        c = rows if rows is not None else layer_channels(loaded, layer, None)  # (B, N, C) read as (B, C, N, 1)
        kk = min(k, n)
        check_tensor(val["score"], "scores", shape=(c, kk))
        c = val["score"].shape[0]
        check_tensor(val["index"], "image indices", shape=(c, kk), floating=False)
        check_tensor(val["loc"], "locations", shape=(c, kk, 2), floating=False)
        idx, loc = val["index"], val["loc"]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(pool)):
            raise ValueError(f"image indices outside the pool of {len(pool)}")
        if kk > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("an image repeated among a channel's top-k")
        if loc.numel() and (bool((loc < 0).any()) or int(loc[..., 0].max()) >= grid[0]
                            or int(loc[..., 1].max()) >= grid[1]):
            raise ValueError(f"locations outside the {grid[0]}x{grid[1]} grid")

    return validate


def _stream_topk(loaded, layer: str, pool: ImagePool, k: int, *, size: int, batch: int, workers: Optional[int],
                 progress: Optional[Callable[[int, int, float], None]], units: Optional[Units] = None) -> dict:
    """One pass over ``pool`` for every channel of ``layer`` (or every unit of ``units``): per channel the running
    top ``k`` scores (spatial max, or the value at a neuron's location), with their image index and location;
    ties go to the lower index."""
    from vital_fast.models import FeatureTaps

    dev = next(iter(loaded.model.parameters())).device
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    run_s = run_i = run_a = None
    grid = None
    n = 0
    t0 = time.perf_counter()

    def report(done):
        if progress is not None:
            progress(done, len(pool), done / max(time.perf_counter() - t0, 1e-9))

    with torch.no_grad(), FeatureTaps(loaded.model, [layer], detach=True, stop_after=True) as taps:
        for idx, x in pool.batches(size, resize, batch, workers, on_item=report, mode=loaded.interpolation):
            a = taps.run(loaded.normalize(x).to(dev))[layer].float()
            if a.dim() == 3:  # tokens (B, N, C) -> (B, C, N, 1)
                a = a.transpose(1, 2)[..., None]
            grid = tuple(int(g) for g in a.shape[2:])
            if units is None:
                s, arg = a.flatten(2).max(dim=2)  # (B, C) each
            else:
                s, arg = units.score(a)  # (B, N) each
            s, arg = s.cpu().t(), arg.cpu().t()  # (C, B)
            ii = idx[None, :].expand_as(s)
            if run_s is not None:  # the running top-k first: on ties, the stable sort keeps the lower index
                s, ii, arg = torch.cat([run_s, s], 1), torch.cat([run_i, ii], 1), torch.cat([run_a, arg], 1)
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
            run_s, run_i, run_a = s.gather(1, order), ii.gather(1, order), arg.gather(1, order)
            n += len(idx)
    if n == 0 or run_s is None:
        raise ValueError(f"{pool.what}: no usable image among the {len(pool)} in {pool.source}"
                         + (f" (first: {pool.first_skip})" if pool.first_skip else ""))
    loc = torch.stack([run_a // grid[1], run_a % grid[1]], dim=-1)
    return {"score": run_s.contiguous(), "index": run_i.contiguous(), "loc": loc.contiguous(),
            "grid": torch.tensor(grid), "n": n, "skipped": pool.skipped}


def mine_topk(
    loaded,
    layer: str,
    pool: Union[ImagePool, ImageSet, Any],
    channels: Optional[Sequence[int]],
    k: int,
    size: int,
    cache: Optional[DiskCache] = None,
    batch: int = 8,
    *,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int, float], None]] = None,
    units: Optional[Units] = None,
) -> TopK:
    """Score every image of ``pool`` for every channel of ``layer`` in one streaming pass; keep the top ``k``.

    ``pool``: an :class:`ImagePool` (a folder, files or a dataset, read lazily in ``workers`` DataLoader
    processes), an in-memory :class:`ImageSet`, or anything :func:`as_pool` takes. Memory does not grow with
    the pool: per channel only the running top-k (score, image index, location) is kept. The result for
    all channels of the layer is cached (keyed by the pool's fingerprint, or an :class:`ImageSet`'s content
    hashes; written once at the end, atomically: an interrupted pass leaves no entry). Unreadable images
    are skipped and counted (one warning); when fewer than ``k`` can be read, each channel gets them all
    (the result has fewer columns), as an in-memory set of the readable images would give.
    ``progress(done, total, images_per_second)`` is called as images are read.

    ``units``: score projections of the layer's features instead of its channels (directions, spatial
    neurons; see :class:`Units`); ``channels`` then index its rows, and the cache entry holds all of them.

    Raises
    ------
    ValueError
        Before any work: a channel out of range for the layer, ``k`` < 1 or larger than the pool, a pool
        with no readable image, a dataset whose items are not images.
    """
    pool = as_pool(pool, what="top-k mining pool", workers=workers)
    if k > len(pool):
        raise ValueError(f"top-k mining: k = {k} references asked for, but the image pool holds only "
                         f"{len(pool)} images")
    if k < 1:
        raise ValueError(f"top-k mining: k must be >= 1, got {k}")
    from vital_fast.references.prototypes import layer_channels

    known = layer_channels(loaded, layer, None)
    if units is not None:
        if known is not None and units.weights.shape[1] != known:
            raise ValueError(f"top-k mining: units of {units.weights.shape[1]} values for layer {layer!r} with "
                             f"{known} channels")
        known = int(units.weights.shape[0])
    if known is not None and channels is not None:
        _check_channels(layer, [int(c) for c in channels], known, "units" if units is not None else "channels")
    pool.check()
    cache = cache or DiskCache(enabled=False)
    ident = pool.cache_parts()
    validate = _validate_entry(loaded, layer, pool, k, None if units is None else int(units.weights.shape[0]))

    def compute():
        return _stream_topk(loaded, layer, pool, k, size=size, batch=batch, workers=workers, progress=progress,
                            units=units)

    if ident is None:
        val = compute()
    else:
        # "norm": the same weights under another mean/std (or preprocess) score other images highest.
        parts = {"model": loaded.fingerprint, "layer": layer, **ident, "size": size,
                 "resize": loaded.resize_size / loaded.input_size, "norm": loaded.norm_key, "k": k,
                 "entry": "running-topk"}
        parts["units"] = units.digest if units is not None else None
        parts["interpolation"] = loaded.interpolation
        val = cache.get_or_compute("mine", parts, compute, validate)
    score_all, index_all, loc_all = val["score"], val["index"], val["loc"]  # (C, kk), (C, kk), (C, kk, 2)
    n_ch = score_all.shape[0]
    chans = list(range(n_ch)) if channels is None else [int(c) for c in channels]
    _check_channels(layer, chans, n_ch, "units" if units is not None else "channels")
    rows = torch.tensor(chans, dtype=torch.long)
    top_s = score_all[rows].contiguous()
    return TopK(layer, chans, index_all[rows].contiguous(), top_s, loc_all[rows].contiguous(),
                tuple(int(g) for g in val["grid"]), top_s.t().contiguous().mean(0))


def _check_channels(layer: str, chans: Sequence[int], n_ch: int, what: str = "channels") -> None:
    bad = [c for c in chans if not 0 <= c < n_ch]
    if bad:
        raise ValueError(f"layer {layer!r} has {n_ch} {what} (0-{n_ch - 1}); got {what[:-1]}(s) {bad[:5]}")


def token_grid(grid) -> Optional[tuple]:
    """For a token layer mined as an ``(N, 1)`` grid: ``(side, first)``, the side of its square patch grid and
    the index of its first patch token (1 after a CLS token, else 0); ``None`` for a spatial grid."""
    n = int(grid[0])
    if len(grid) < 2 or int(grid[1]) != 1 or n < 2:
        return None
    for first in (1, 0):
        side = int(round((n - first) ** 0.5))
        if side * side == n - first:
            return side, first
    return None


def crop_patch(loaded, img: torch.Tensor, loc, grid, rf: int, size: int) -> torch.Tensor:
    """A square patch of the original image around a unit, sized to its receptive field, resized to ``size``.
    For tokens (a ViT layer): the image patch of the token (3 patches wide, the token's own in the middle);
    the CLS token's is the whole crop."""
    _, h0, w0 = img.shape
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    scale = resize / min(h0, w0)
    nh, nw = round(h0 * scale), round(w0 * scale)
    top, left = (nh - size) // 2, (nw - size) // 2
    tg = token_grid(grid)
    if tg is not None:  # token t -> patch (row, column) of the side x side grid; CLS -> the whole view
        side, first = tg
        t = int(loc[0]) - first
        if t < 0:
            loc, grid, rf = (0, 0), (1, 1), size
        else:
            loc, grid, rf = divmod(t, side), (side, side), int(round(3 * size / side))
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


def channel_reference_images(loaded, topk: TopK, pool: Union[ImagePool, ImageSet, Any], mode: str,
                             size: int) -> Dict[int, ImageSet]:
    """Per channel, its reference images: the top-k full images, or patches around the unit. Reads only the
    winners from ``pool`` (the pool :func:`mine_topk` mined, or an :class:`ImageSet`)."""
    if mode not in CHANNEL_REF_MODES:
        raise ValueError(f"channel reference mode must be one of {CHANNEL_REF_MODES}, got {mode!r}")
    pool = as_pool(pool)
    out: Dict[int, ImageSet] = {}
    rf = receptive_field(loaded, topk.layer, size) if mode == "patch" else 0
    recent: "OrderedDict[int, tuple]" = OrderedDict()  # images shared by several channels are read once

    def read(i: int):
        if i not in recent:
            img = pool.load(i)
            recent[i] = (img, pool.hash(i, img))
            if len(recent) > 32:
                recent.popitem(last=False)
        recent.move_to_end(i)
        return recent[i]

    for row, c in enumerate(topk.channels):
        idx = [int(i) for i in topk.index[row]]
        got = [read(i) for i in idx]
        if mode == "image":
            out[c] = ImageSet([g[0] for g in got], [pool.names[i] for i in idx], [g[1] for g in got])
        else:
            imgs = [crop_patch(loaded, g[0], topk.loc[row, j], topk.grid, rf, size) for j, g in enumerate(got)]
            names = [f"{pool.names[i]}#patch{tuple(int(v) for v in topk.loc[row, j])}" for j, i in enumerate(idx)]
            hashes = [f"{g[1]}-{int(topk.loc[row, j, 0])}-{int(topk.loc[row, j, 1])}-{rf}"
                      for j, g in enumerate(got)]
            out[c] = ImageSet(imgs, names, hashes)
    return out


def print_progress(label: str, stream: Optional[TextIO] = None, every: float = 15.0
                   ) -> Callable[[int, int, float], None]:
    """A ``progress`` for :func:`mine_topk` that writes ``label: done/total images, N images/s`` every ``every``
    seconds, and a last line at the end when it wrote any (a pass shorter than ``every`` stays silent)."""
    state = {"last": time.perf_counter(), "said": False}

    def report(done: int, total: int, rate: float) -> None:
        now = time.perf_counter()
        if now - state["last"] < every and not (done >= total and state["said"]):
            return
        state["last"], state["said"] = now, True
        print(f"{label}: {done}/{total} images, {rate:.1f} images/s", file=stream or sys.stderr, flush=True)

    return report
