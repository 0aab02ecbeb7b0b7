"""Each target's reference images, one path for the command line, :func:`vital_fast.visualize` and the sweep.

A target says what kind of references it takes (:attr:`vital_fast.optim.targets.Target.is_unit`): a class target
reads photographs of its class (a subfolder of a class folder, or a set given for it); a unit target (channel,
direction, neuron) takes its top-k images mined from a pool by its activation
(:func:`~vital_fast.references.units.mine_unit_references`). References given by the caller are kept as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from vital_fast.references.images import (
    ImageSet,
    class_image_folder,
    list_image_files,
    load_images,
    missing_class_message,
)
from vital_fast.references.pool import ImagePool, as_pool
from vital_fast.references.units import mine_unit_references


def class_reference_set(target, source: Any) -> ImageSet:
    """The references of a class target from ``source``: an :class:`ImageSet` as it is, or a folder, files or
    tensors loaded (:func:`~vital_fast.references.images.load_images`)."""
    return source if isinstance(source, ImageSet) else load_images(source, what=f"references of {target.key}")


def class_folder_references(target, root: str) -> ImageSet:
    """The references of a class target from ``root``, a folder of class subfolders (named by the class index or
    WordNet id); ValueError naming the folder to make when it has none for the class."""
    folder = class_image_folder(root, target.index)
    if folder is None:
        raise ValueError(missing_class_message(root, target.index))
    return class_reference_set(target, folder)


def gather_references(loaded, targets: Sequence, *, given: Optional[Mapping] = None, classes: Optional[str] = None,
                      pool: Any = None, n_refs: int, mode: str, size: Optional[int] = None, cache,
                      progress_for: Optional[Callable[[str], Optional[Callable]]] = None,
                      check_pool: bool = True) -> Dict[Any, Any]:
    """``given`` (keyed by target key or target; kept as given) with every other target's references added: a class
    target's from ``classes`` (a folder of class subfolders; without one it stays missing, for the caller to name),
    a unit target's top-``n_refs`` mined from ``pool`` (anything :func:`~vital_fast.references.pool.as_pool` takes;
    without one they stay missing) at ``size`` px (default: the model's input size), as full images or patches
    (``mode``), in one pass per layer.

    ``check_pool``: fail before any mining when no image of the pool can be read. ``progress_for(label)``: a
    progress callback for each mining pass, or None."""
    refs: Dict[Any, Any] = dict(given or {})

    def missing(t) -> bool:
        return refs.get(t.key, refs.get(t)) is None

    if classes is not None:
        for t in targets:
            if not t.is_unit and missing(t):
                refs[t.key] = class_folder_references(t, classes)
    units = [t for t in targets if t.is_unit and missing(t)]
    if units and pool is not None:
        pool = as_pool(pool, what="candidate images")
        if check_pool:
            pool.check()  # no readable image: fail before any mining
        refs.update(mine_unit_references(loaded, units, pool, min(n_refs, len(pool)), mode=mode,
                                         size=size or loaded.input_size,
                                         cache=cache, progress_for=progress_for))
    return refs


def folder_pool(root: str) -> ImagePool:
    """The candidate images under the folder ``root`` as a pool; ValueError when there are none."""
    files = list_image_files(root)
    if not files:
        raise ValueError(f"--images: no image files under {root} to mine references from")
    return ImagePool.from_files(files, root=root, what=f"candidate images under {root}")


__all__ = ["class_folder_references", "class_reference_set", "folder_pool", "gather_references"]
