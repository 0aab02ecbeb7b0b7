"""vital_fast: fast VITAL feature visualization for PyTorch.

The names a newcomer reaches first::

    import vital_fast as vf
    model = vf.load_model("efficientnet-lite0")
    result = vf.visualize(model, ["class:967"], {"class:967": "photos/espresso/"})
    vf.save_result(result, "runs/espresso")

:func:`visualize` runs a method (``"vital"``, or a baseline) on an image parametrization
(:class:`Parametrization`: ``"pixel"``, ``"fourier"``, ``"maco"``), or the caller's own
:class:`Objective` (objectives compose: ``a + 0.1 * b``); :class:`Settings` and :class:`Target`
describe the run. The fused ops (:func:`sort_match_loss` and :class:`SortMatchLoss`,
:func:`lrp_weight` and :class:`LRPWeight`, :func:`sorted_prototype`) are drop-in losses for other tools,
PyTorch operators (``torch.ops.vital_fast.*``) that work under ``torch.compile``, ``torch.func`` and
``torch.export``, with the backends behind them in :func:`available_backends`. Importing this package loads nothing compiled; the
optimizer, models and results modules load on first use.
"""

from vital_fast._backend import available_backends
from vital_fast._version import __version__
from vital_fast.ops import (
    LRPWeight,
    LRPWeightFunction,
    SortMatchLoss,
    SortMatchLossFunction,
    channel_importance,
    lrp_weight,
    set_debug,
    sort_match_loss,
    sorted_prototype,
)

_LAZY = {
    "visualize": ("vital_fast.optim.visualize", "visualize"),
    "load_model": ("vital_fast.models", "load_model"),
    "save_result": ("vital_fast.results", "save_result"),
    "Settings": ("vital_fast.optim.presets", "Settings"),
    "get_preset": ("vital_fast.optim.presets", "get_preset"),
    "VisualizationResult": ("vital_fast.optim.result", "VisualizationResult"),
    "Target": ("vital_fast.optim.targets", "Target"),
    "Objective": ("vital_fast.optim.objectives", "Objective"),
    "Parametrization": ("vital_fast.optim.parametrizations", "Parametrization"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vital_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LRPWeight",
    "LRPWeightFunction",
    "Objective",
    "Parametrization",
    "Settings",
    "SortMatchLoss",
    "SortMatchLossFunction",
    "Target",
    "VisualizationResult",
    "__version__",
    "available_backends",
    "channel_importance",
    "get_preset",
    "load_model",
    "lrp_weight",
    "save_result",
    "set_debug",
    "sort_match_loss",
    "sorted_prototype",
    "visualize",
]
