"""The public ops: functionals, modules and autograd Functions over the ``torch.ops.vital_fast`` operators
(:mod:`vital_fast.ops.library`)."""

from vital_fast._validate import set_debug
from vital_fast.ops.lrp_weight import LRPWeight, LRPWeightFunction, lrp_weight
from vital_fast.ops.prototype import channel_importance, sorted_prototype
from vital_fast.ops.sort_match import SortMatchLoss, SortMatchLossFunction, sort_match_loss

__all__ = [
    "LRPWeight",
    "LRPWeightFunction",
    "SortMatchLoss",
    "SortMatchLossFunction",
    "channel_importance",
    "lrp_weight",
    "set_debug",
    "sort_match_loss",
    "sorted_prototype",
]
