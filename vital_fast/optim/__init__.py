"""The batched optimizer: targets, presets, transforms, priors and :func:`visualize`."""

from vital_fast.optim.presets import PRESETS, Settings, get_preset
from vital_fast.optim.targets import Target, parse_target
from vital_fast.optim.result import VisualizationResult
from vital_fast.optim.visualize import visualize

__all__ = ["PRESETS", "Settings", "Target", "VisualizationResult", "get_preset", "parse_target", "visualize"]
