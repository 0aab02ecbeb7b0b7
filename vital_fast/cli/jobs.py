"""The jobs behind the CLI, usable from Python too: reference gathering, batched runs into a folder."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

from vital_fast.cli.progress_bar import Progress
from vital_fast.optim import Settings, Target, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.gather import folder_pool, gather_references as _gather
from vital_fast.references.images import ImageSet
from vital_fast.references.pool import ImagePool
from vital_fast.results import read_manifest, save_result


def gather_references(
    loaded, targets: Sequence[Target], images, settings: Settings, cache: DiskCache, size: Optional[int] = None
) -> Dict[str, ImageSet]:
    """Reference images for each target from a folder, or from an :class:`ImagePool` (checked before any
    optimization).

    Class targets read the subfolder named by the class index or WordNet id (a folder is needed for them);
    unit targets (channels, directions, neurons) mine the top-k of every image under the folder (or of the
    pool), in one streaming pass per layer (and one more for a layer's directions and neurons) (the images are read lazily, in DataLoader workers; only each channel's winners are read again).
    """
    if isinstance(images, ImagePool):
        pool, images = images, None
    else:
        pool = None
        if not os.path.isdir(images):
            raise ValueError(f"--images: no such folder: {images}")
    if images is None:
        for t in targets:
            if not t.is_unit:
                raise ValueError(f"no reference images for {t.key}: a dataset given as --images serves channel "
                                 f"targets; class targets need a folder of class subfolders")
    if pool is None and any(t.is_unit for t in targets):
        pool = folder_pool(images)

    def bar_for(label):
        bar = Progress(len(pool), label=label)
        return lambda done, total, rate: bar.update(done, f"{rate:.1f} images/s")

    return _gather(loaded, targets, classes=images, pool=pool, n_refs=settings.n_refs, mode=settings.channel_refs,
                   size=size, cache=cache, progress_for=bar_for)


def labels_for(loaded, targets: Sequence[Target]) -> Dict[str, str]:
    """Each target's label, with the class names of ``loaded``'s own metadata (:mod:`vital_fast.models.labels`)."""
    names = getattr(loaded, "class_names", None)
    return {t.key: t.label(names) for t in targets}


def run_into_folder(
    loaded,
    targets: Sequence[Target],
    refs: Dict[str, ImageSet],
    out_dir: str,
    settings: Settings,
    *,
    seed: int,
    batch: int,
    cache: DiskCache,
    preset: str,
    size: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    extra: Optional[dict] = None,
    method: str = "vital",
    param: Optional[str] = None,
    class_layers=None,
    on_batch: Optional[Callable[[], None]] = None,
) -> dict:
    """Visualize ``targets`` in batches of ``batch``, saving each batch's results as it finishes (then calling
    ``on_batch``)."""
    labels = labels_for(loaded, targets)
    manifest: dict = {}
    done_steps = 0
    for i in range(0, len(targets), batch):
        chunk = list(targets[i:i + batch])

        def progress(step, total, losses, _base=done_steps):
            if on_step:
                on_step(_base + step)

        res = visualize(loaded, chunk, {t.key: refs[t.key] for t in chunk}, settings=settings, seed=seed,
                        size=size, cache=cache, progress=progress, method=method, param=param,
                        class_layers=class_layers)
        done_steps += settings.steps
        manifest = save_result(res, out_dir, labels=labels, seed=seed,
                               extra=dict(extra or {}, preset=preset, method=res.method),
                               annotations=res.annotations)
        if on_batch is not None:
            on_batch()
    return manifest


def finished_keys(out_dir: str) -> List[str]:
    """The targets a run folder holds whole: in its manifest, with every file the manifest lists for them and a
    readable ``result.json`` of the same key. A target whose image was deleted or whose record is corrupt is not
    finished (``--resume`` redoes it, and says so)."""
    import json
    import os

    try:
        recs = read_manifest(out_dir).get("targets", [])
    except ValueError:
        return []
    done, broken = [], []
    for t in recs:
        key, slug = t.get("key"), t.get("slug")
        ok = bool(key and slug) and all(os.path.isfile(os.path.join(out_dir, f)) for f in (t.get("files") or {}).values())
        if ok:
            try:
                with open(os.path.join(out_dir, "targets", slug, "result.json"), encoding="utf-8") as fh:
                    ok = json.load(fh).get("key") == key
            except (OSError, ValueError, AttributeError):
                ok = False
        (done if ok else broken).append(key)
    if broken:
        import sys

        print(f"vital-fast: --resume: {len(broken)} finished target(s) in {out_dir} have missing or unreadable files "
              f"and are redone: {', '.join(map(str, broken[:5]))}{' ...' if len(broken) > 5 else ''}", file=sys.stderr)
    return done
