"""The public ops: each an autograd Function and a functional."""

from vital_fast.ops.lrp_weight import LRPWeightFunction, lrp_weight
from vital_fast.ops.prototype import channel_importance, sorted_prototype
from vital_fast.ops.sort_match import SortMatchLoss, SortMatchLossFunction, sort_match_loss

__all__ = [
    "LRPWeightFunction",
    "SortMatchLoss",
    "SortMatchLossFunction",
    "channel_importance",
    "lrp_weight",
    "sort_match_loss",
    "sorted_prototype",
]
