"""The offline demo: efficientnet-lite0, photographs that ship in installed packages as references."""

from __future__ import annotations

from typing import Dict, List, Tuple

from vital_fast.optim import Settings, Target
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_images, offline_class_photos, offline_photo_paths
from vital_fast.references.mining import channel_reference_images, mine_topk
from vital_fast.references.pool import ImagePool

DEMO_CLASSES = (967, 282, 657, 665, 985, 698)  # espresso, tiger cat, missile, moped, daisy, palace
DEMO_LAYER = "_blocks.10"
DEMO_CHANNELS = 3
DEMO_K = 3


def demo_plan(loaded, settings: Settings, cache: DiskCache) -> Tuple[List[Target], Dict[str, ImageSet]]:
    """The demo's targets and references: six classes, and the three channels of one layer that
    respond most strongly to the offline photographs (top-3 images each)."""
    photos = offline_class_photos()
    targets: List[Target] = []
    refs: Dict[str, ImageSet] = {}
    for c in DEMO_CLASSES:
        t = Target("class", c)
        targets.append(t)
        refs[t.key] = load_images(photos[c], what=f"demo photographs of class {c}")
    pool = ImagePool.from_files(offline_photo_paths(), what="demo photographs")
    top = mine_topk(loaded, DEMO_LAYER, pool, None, DEMO_K, loaded.input_size, cache)
    best = top.mean_score.topk(DEMO_CHANNELS).indices.tolist()
    chans = sorted(top.channels[i] for i in best)
    top = top.select(chans)  # what mining just these channels gives, without a second pass
    per = channel_reference_images(loaded, top, pool, settings.channel_refs, loaded.input_size)
    for c in chans:
        t = Target("channel", c, DEMO_LAYER)
        targets.append(t)
        refs[t.key] = per[c]
    return targets, refs
