"""The public surface: a snapshot of __all__, and the docstring examples run."""

from __future__ import annotations

import doctest
import importlib

import pytest

import vital_fast


def test_all_snapshot():
    assert sorted(vital_fast.__all__) == sorted([
        "LRPWeight", "LRPWeightFunction", "SortMatchLoss", "SortMatchLossFunction", "__version__",
        "available_backends", "channel_importance", "lrp_weight", "set_debug", "sort_match_loss",
        "sorted_prototype",
        # the newcomer's entry points (loaded on first use)
        "visualize", "load_model", "save_result", "Settings", "Target", "Objective", "Parametrization",
        "get_preset", "VisualizationResult",
    ])
    for name in vital_fast.__all__:
        assert getattr(vital_fast, name) is not None


@pytest.mark.parametrize("module", [
    "vital_fast._backend", "vital_fast.ops.sort_match", "vital_fast.ops.lrp_weight",
    "vital_fast.ops.prototype", "vital_fast.optim.objectives",
])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
