"""The optimizer: one engine (:mod:`~vital_fast.optim.engine`) running methods
(:mod:`~vital_fast.optim.methods`) made of a parametrization (:mod:`~vital_fast.optim.parametrizations`),
composable objectives (:mod:`~vital_fast.optim.objectives`, :mod:`~vital_fast.optim.matching`) and
random views (:mod:`~vital_fast.optim.transforms`); targets, presets and :func:`visualize`."""

from vital_fast.optim.engine import Engine, Recipe
from vital_fast.optim.methods import METHODS, build_recipe, method_options, register_method, settings_with_param
from vital_fast.optim.objectives import ActMax, BNStats, ImagePriors, Objective, StepContext, objective
from vital_fast.optim.parametrizations import (PARAMETRIZATIONS, Fourier, Maco, Parametrization, Pixel,
                                               get_parametrization, register_parametrization)
from vital_fast.optim.presets import PRESETS, Settings, get_preset
from vital_fast.optim.result import VisualizationResult
from vital_fast.optim.matching import SortMatch
from vital_fast.optim.targets import Target, parse_target, register_target_kind
from vital_fast.optim.visualize import visualize

__all__ = ["ActMax", "BNStats", "Engine", "Fourier", "ImagePriors", "METHODS", "Maco", "Objective", "PARAMETRIZATIONS",
           "PRESETS", "Parametrization", "Pixel", "Recipe", "Settings", "SortMatch", "StepContext", "Target",
           "VisualizationResult", "build_recipe", "get_parametrization", "get_preset", "method_options", "objective",
           "parse_target", "register_method", "register_parametrization", "register_target_kind", "settings_with_param",
           "visualize"]
