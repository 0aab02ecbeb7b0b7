"""vital_fast: fast VITAL feature visualization for PyTorch.

The fused sort-matching loss (:func:`sort_match_loss`), its LRP-weighted form
(:func:`lrp_weight`), reference prototypes (:func:`sorted_prototype`), and the backends behind
them (:func:`available_backends`). Importing this package loads nothing compiled.
"""

from vital_fast._backend import available_backends
from vital_fast._version import __version__
from vital_fast.ops import (
    LRPWeightFunction,
    SortMatchLoss,
    SortMatchLossFunction,
    channel_importance,
    lrp_weight,
    sort_match_loss,
    sorted_prototype,
)

__all__ = [
    "LRPWeightFunction",
    "SortMatchLoss",
    "SortMatchLossFunction",
    "__version__",
    "available_backends",
    "channel_importance",
    "lrp_weight",
    "sort_match_loss",
    "sorted_prototype",
]
