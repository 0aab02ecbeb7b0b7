"""What an optimization returns, and the progress callback's type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from vital_fast.optim.presets import Settings
from vital_fast.optim.targets import Target
from vital_fast.references.images import ImageSet

__all__ = ["ProgressFn", "VisualizationResult"]


@dataclass
class VisualizationResult:
    """What :func:`visualize` returns: one image per target, and how it was made."""

    targets: List[Target]
    images: torch.Tensor          # (B, 3, H, W) in [0, 1]
    transparency: torch.Tensor    # (B, 1, H, W): accumulated |dL/dx|, per element scaled to [0, 1]
    losses: torch.Tensor          # (B, steps): each target's total loss at every step
    settings: Settings
    seeds: List[int]
    references: List[ImageSet]    # the reference images (or patches) each target used
    layers: List[List[Tuple[str, float]]]  # matched layers and weights per target
    timings: Dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    fingerprint: str = ""
    method: str = "vital"         # the recipe that ran ("vital", a baseline, "vital+fourier", "custom:...")
    param: Dict[str, object] = field(default_factory=dict)  # the parametrization and its options
    precision: str = "float32"    # what the network ran in (Settings.amp resolved on the device)
    loss_scale: Dict[str, float] = field(default_factory=dict)  # float16: final loss scale and skipped steps


ProgressFn = Callable[[int, int, torch.Tensor], None]
