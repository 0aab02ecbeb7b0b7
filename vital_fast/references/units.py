"""References of unit targets (channels, directions, spatial neurons), mined from a pool in one pass per layer.

Channel targets of a layer share the layer's cached channel pass (:func:`~vital_fast.references.mining.mine_topk`);
the direction and neuron targets of a layer are scored together as :class:`~vital_fast.references.mining.Units`
(one projection row each; a neuron is a one-hot row read at its location), in a second pass over the pool that
is cached under the digest of those rows.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vital_fast.references.images import ImageSet
from vital_fast.references.mining import Units, channel_reference_images, mine_topk


def layer_units(targets: Sequence, channels: int, size: Optional[int] = None,
                native: Optional[int] = None) -> Tuple[Units, Dict[str, int]]:
    """The direction and neuron ``targets`` of one layer (of ``channels`` channels) as :class:`Units` (equal units
    share a row) and the row of each target's key; neurons' locations moved from the grid at ``native`` px (the
    model's input size) to the one at ``size``."""
    rows: Dict[tuple, int] = {}
    w: List[torch.Tensor] = []
    b: List[float] = []
    locs: List[List[int]] = []
    of: Dict[str, int] = {}
    for t0 in targets:
        t = t0.at_size(size, native) if size is not None and native is not None else t0  # at the mining size
        ident = t.unit_identity()
        if ident not in rows:
            rows[ident] = len(w)
            w.append(t.unit_vector(channels))
            b.append(t.unit_bias)
            locs.append(list(t.loc) if t.loc is not None else [-1, -1])
        of[t0.key] = rows[ident]
    lt = torch.tensor(locs, dtype=torch.long)
    return Units(torch.stack(w), torch.tensor(b), lt if bool((lt >= 0).any()) else None), of


def mine_unit_references(loaded, targets: Sequence, pool, k: int, *, mode: str, size: int, cache,
                         progress_for: Optional[Callable[[str], Optional[Callable]]] = None,
                         workers: Optional[int] = None) -> Dict[str, ImageSet]:
    """Each unit target's top-``k`` references (full images or patches, ``mode``) mined from ``pool`` at ``size``:
    one pass per layer for its channels (all of them, cached) and one for its other units.
    ``progress_for(label)``: a ``progress`` for each pass, or ``None``."""
    from vital_fast.references.prototypes import layer_channels

    out: Dict[str, ImageSet] = {}
    units = [t for t in targets if t.is_unit]
    for layer in sorted({t.layer for t in units}):
        here = [t for t in units if t.layer == layer]
        chans = [t for t in here if t.whole_channel is not None]
        if chans:
            top = mine_topk(loaded, layer, pool, sorted({t.index for t in chans}), k, size, cache,
                            workers=workers, progress=progress_for(f"mining {layer}") if progress_for else None)
            per = channel_reference_images(loaded, top, pool, mode, size)
            for t in chans:
                out[t.key] = per[t.index]
        other = [t for t in here if t.whole_channel is None]
        if other:
            c = layer_channels(loaded, layer, None)
            if c is None:
                raise ValueError(f"cannot read the channels of layer {layer!r} to project directions on")
            spec, row = layer_units(other, c, size, loaded.input_size)
            top = mine_topk(loaded, layer, pool, sorted(set(row.values())), k, size, cache, workers=workers,
                            progress=progress_for(f"mining {layer} units") if progress_for else None, units=spec)
            per = channel_reference_images(loaded, top, pool, mode, size)
            for t in other:
                out[t.key] = per[row[t.key]]
    return out
