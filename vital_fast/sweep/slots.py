"""The sweep on the one engine (:mod:`vital_fast.optim.engine`): VITAL's recipe, slots refilled by the
driver, and each finished slot's files."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from vital_fast.optim.engine import Engine, Slot
from vital_fast.optim.methods import build_recipe
from vital_fast.optim.presets import Settings
from vital_fast.optim.targets import Target
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet

__all__ = ["Engine", "Slot", "result_files", "sweep_engine"]


def sweep_engine(loaded, settings: Settings, *, seed: int, final_size: int, class_layers, cache: DiskCache,
                 refs_for: Callable[[Target], Tuple[ImageSet, Dict[str, Any]]], early_stop: Optional[float],
                 early_stop_window: Optional[int], targets=()) -> Engine:
    """An engine running VITAL with ``settings`` over slots that the driver fills and refills."""
    recipe = build_recipe("vital", settings, class_layers=class_layers, cache=cache)
    engine = Engine(loaded, recipe, seed, final_size, refs_for=refs_for, early_stop=early_stop,
                    early_stop_window=early_stop_window)
    engine.setup(list(targets))
    return engine


def result_files(engine: Engine, slot: Slot) -> Dict[str, np.ndarray]:
    """A finished slot's image, image with transparency, and reference strip (uint8 HWC)."""
    from vital_fast.report.pngs import alpha_map, reference_strip, to_uint8

    rgb = to_uint8(engine.image(slot))
    return {"image": rgb, "image_rgba": np.concatenate([rgb, to_uint8(alpha_map(engine.transparency(slot)))], axis=-1),
            "references": to_uint8(reference_strip(slot.refset.images))}
