"""Planning a sweep: validate the model, layer, targets, sizes and images (every rank, before anything
is written), fix the sweep's identity, and provide each target's reference images."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.models import LoadedModel, class_logit_layer, default_layers, load_model, resolve_layer
from vital_fast.models.facts import check_resolution, check_size, check_targets, layer_table
from vital_fast.optim.directions import Directions, load_directions
from vital_fast.optim.presets import Settings, get_preset
from vital_fast.optim.targets import Target
from vital_fast.references.cache import DiskCache
from vital_fast.references.gather import class_reference_set
from vital_fast.references.images import (
    ImageSet,
    class_image_folder,
    find_wnid_file,
    list_image_files,
    missing_class_message,
)
from vital_fast.references.mining import channel_reference_images, mine_topk, print_progress
from vital_fast.references.pool import ImagePool, as_pool
from vital_fast.references.prototypes import layer_channels
from vital_fast.references.units import layer_units
from vital_fast.sweep.dist import _Dist
from vital_fast.sweep.journal import ENGINE_VERSION, _identity_id
from vital_fast.sweep.spec import _compact, parse_index_spec


def _listing_digest(root: str, files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            size = os.path.getsize(f)
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(f, root)}|{size}\n".encode())
    return h.hexdigest()[:16]


def _layer_channels(loaded, layer: str) -> int:
    resolve_layer(loaded.model, layer)  # unknown name: ValueError with the closest names
    shapes = {d["name"]: d["shape"] for d in layer_table(loaded)}
    shape = shapes.get(layer)
    if shape is None:
        raise ValueError(f"layer {layer!r} produces no tensor output")
    if len(shape) < 2:
        raise ValueError(f"layer {layer!r} has no spatial channels (output shape {tuple(shape)}); choose a "
                         f"convolutional or token layer")
    return int(shape[-1] if loaded.channel_dim_of(layer) == -1 else shape[0])


@dataclass
class _Plan:
    loaded: Any
    settings: Settings
    targets: List[Target]
    keys: List[str]
    layer: Optional[str]
    class_list: List[int]
    final: int
    class_layers: List[Tuple[str, float]]
    pool: Optional[ImagePool]  # read lazily: only the mining pass and each channel's winners decode images
    class_src: Dict[int, Any]
    ident: Dict[str, Any]
    sweep_id: str
    exact: bool


def _make_plan(model, images, *, layer, channels, classes, preset, settings, seed, size, batch, early_stop,
               early_stop_window, exact, device, class_layers, class_images, dist: _Dist,
               directions=None) -> _Plan:
    """Validate everything (every rank, before anything is written) and fix the sweep's identity."""
    if batch < 1:
        raise ValueError(f"sweep: batch must be >= 1, got {batch}")
    if early_stop is not None and not (early_stop >= 0 and math.isfinite(early_stop)):
        raise ValueError(f"sweep: early_stop must be a fraction >= 0, got {early_stop}")
    if early_stop_window is not None and early_stop_window < 1:
        raise ValueError(f"sweep: early_stop_window must be >= 1, got {early_stop_window}")
    if layer is None and channels is not None:
        raise ValueError("sweep: channels given without a layer")
    if layer is None and directions is not None:
        raise ValueError("sweep: directions given without the layer they live in")
    if layer is None and classes is None:
        raise ValueError("sweep: nothing to do: give a layer (its channels) and/or classes")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and dist.active:
            dev = torch.device("cuda", dist.local_rank)  # one device per rank
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        loaded = loaded.to(dev)
    settings = settings if settings is not None else get_preset(preset)
    targets: List[Target] = []
    chan_list: List[int] = []
    dirs = None
    if layer is not None and directions is not None:  # the rows of a direction matrix instead of channels
        dirs = _directions(directions)
        n_ch = _layer_channels(loaded, layer)
        if dirs.matrix.shape[1] != n_ch:
            raise ValueError(f"sweep: the directions of {dirs.source} have {dirs.matrix.shape[1]} values but layer "
                             f"{layer!r} has {n_ch} channels")
        try:
            chan_list = parse_index_spec(channels, len(dirs), "rows")
        except ValueError as exc:
            raise ValueError(f"{dirs.source} holds {len(dirs)} directions (rows 0-{len(dirs) - 1}); {exc}") from None
        targets += [Target("direction", r, layer, direction=dirs.row(r)) for r in chan_list]
    elif layer is not None:
        n_ch = _layer_channels(loaded, layer)
        try:
            chan_list = parse_index_spec(channels, n_ch, "channels")
        except ValueError as exc:
            raise ValueError(f"layer {layer!r} has {n_ch} channels (0-{n_ch - 1}); {exc}") from None
        targets += [Target("channel", c, layer) for c in chan_list]
    class_list: List[int] = []
    if classes is not None:
        class_list = parse_index_spec(classes, loaded.num_classes, "classes")
        targets += [Target("class", c) for c in class_list]
        if settings.class_relevance:
            class_logit_layer(loaded)  # a model without class logits fails here, before any work
    check_targets(loaded, targets)
    final = check_size(size, loaded.input_size)
    for S in sorted({max(16, int(round(sc * final))) for sc, _ in settings.stages}):
        check_resolution(loaded, S)
    cls_layers = [(l, float(w)) for l, w in (class_layers if class_layers is not None else default_layers(loaded))]
    # images: the mining pool (listed and checked now, read lazily) and the class folders (checked now,
    # loaded per target)
    class_src: Dict[int, Any] = {}
    pool: Optional[ImagePool] = None
    if not isinstance(images, (str, os.PathLike)):  # an ImageSet, an ImagePool or a dataset of images
        pool = as_pool(images, what="sweep: candidate images")
        if chan_list:
            pool.check()
        listing = pool.identity()
        if listing is None:
            raise ValueError("sweep: a dataset of candidate images needs a fingerprint, a string that changes when its "
                             "images do (ImagePool.from_dataset(dataset, fingerprint=...), or a 'fingerprint' "
                             "attribute on a dataset given as --images py:MODULE:NAME): it names the sweep")
        missing = [c for c in class_list if class_images is None or c not in class_images]
        if missing:
            raise ValueError(f"sweep: no reference images for class {missing[0]}: with a dataset or in-memory images "
                             f"as the pool, class targets need class_images (on the command line: a folder of "
                             f"class subfolders as --images)")
        class_src = {c: class_images[c] for c in class_list}
    else:
        images = os.fspath(images)
        if not os.path.isdir(images):
            raise ValueError(f"--images: no such folder: {images}")
        files = list_image_files(images)
        listing = _listing_digest(images, files)
        if class_list:
            wn = find_wnid_file(images)  # this folder's own mapping (never put in os.environ)
            for c in class_list:
                src = (class_images or {}).get(c) or class_image_folder(images, c, wn)
                if src is None:
                    raise ValueError(missing_class_message(images, c, wn))
                class_src[c] = src
        if chan_list:
            if not files:
                raise ValueError(f"--images: no image files under {images} to mine channel references from")
            pool = ImagePool.from_files(files, root=images, what=f"candidate images under {images}")
            pool.check()  # no readable image: fail now, before anything is written
    ident = {
        "engine": ENGINE_VERSION, "model": loaded.name, "fingerprint": loaded.fingerprint, "layer": layer,
        "channels": _compact(chan_list), "classes": _compact(class_list), "settings": settings.to_dict(),
        "seed": int(seed), "size": final, "images": listing if pool is None else f"{listing}:{pool.identity()}",
        "class_layers": cls_layers, "exact": bool(exact), "early_stop": early_stop,
        "early_stop_window": early_stop_window if early_stop is not None else None,
        "directions": None if dirs is None else hashlib.sha256(
            dirs.matrix.numpy().tobytes() + dirs.bias.numpy().tobytes()).hexdigest()[:24],
    }
    return _Plan(loaded, settings, targets, [t.key for t in targets], layer, class_list, final, cls_layers, pool,
                 class_src, ident, _identity_id(ident), bool(exact))


def _directions(directions):
    """A sweep's direction matrix: a :class:`Directions`, a file, or an ``(N, C)`` / ``(C,)`` tensor."""
    import os


    if isinstance(directions, Directions):
        return directions
    if isinstance(directions, (str, os.PathLike)):
        return load_directions(directions)
    m = torch.as_tensor(directions).detach().float().cpu()
    m = m[None] if m.dim() == 1 else m
    if m.dim() != 2:
        raise ValueError(f"sweep: directions must be (N, C), got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError("sweep: the directions hold NaN or Inf")
    return Directions(m, torch.zeros(m.shape[0]), "tensor")


def _reference_source(plan: _Plan, pending: Sequence[Target], cache: DiskCache, dist: _Dist):
    """Mine the top-k of every pending channel (or direction) in one pass (rank 0 first, filling a shared
    cache); return ``refs_for(target) -> (reference ImageSet, extra metrics)``, loading lazily per target."""
    loaded, settings = plan.loaded, plan.settings
    topk = None
    units, row_key = None, {}
    pending_u = [t for t in pending if t.is_unit]
    if any(t.whole_channel is None for t in pending_u):
        # every unit of the sweep, not only the pending ones: a resumed sweep then finds the first run's entry
        units, row_key = layer_units([t for t in plan.targets if t.is_unit], layer_channels(loaded, plan.layer, None),
                                     plan.final, loaded.input_size)
    if pending_u:
        rows = [t.index for t in pending_u] if units is None else sorted({row_key[t.key] for t in pending_u})
        k = min(settings.n_refs, len(plan.pool))
        if dist.rank != 0:
            dist.barrier()
        report = print_progress(f"sweep: mining {plan.layer}") if dist.rank == 0 else None
        topk = mine_topk(loaded, plan.layer, plan.pool, rows, k, plan.final, cache, progress=report, units=units)
        if dist.rank == 0:
            dist.barrier()
    row_of = {c: i for i, c in enumerate(topk.channels)} if topk is not None else {}

    def refs_for(t: Target) -> Tuple[ImageSet, Dict[str, Any]]:
        if not t.is_unit:
            src = plan.class_src[t.index]
            return class_reference_set(t, src), {}
        u = t.index if units is None else row_key[t.key]
        r = row_of[u]
        one = type(topk)(topk.layer, [u], topk.index[r:r + 1], topk.score[r:r + 1], topk.loc[r:r + 1],
                         topk.grid, topk.mean_score[r:r + 1])
        rs = channel_reference_images(loaded, one, plan.pool, settings.channel_refs, plan.final)[u]
        # the row's own mean (topk.mean_score reduces over all mined channels: its last bits depend on them)
        return rs, {"ref_activation": float(topk.score[r].double().mean())}

    return refs_for
