"""Canonizers per model family for LRP (see :mod:`vital_fast.references.relevance`).

A canonizer rewrites a model for the duration of a relevance call so that the rules can act on it,
and undoes that on removal:

- batch-norm merging for the stock zennit composites: :class:`MergeBatchNormExact` /
  :class:`SequentialMergeBatchNormExact` (the BN epsilon zeroed while merged) and
  :class:`EfficientNetMergeBatchNorm` (conv/BN pairs of EfficientNet-Lite found by name);
- residual sums made explicit as a module (zennit's ``Sum`` or the two-input
  :class:`ResidualAdd`): :class:`ResNetResidualCanonizer` (torchvision ResNets),
  :class:`MBConvSumCanonizer` (EfficientNet MBConv blocks), :class:`CNBlockCanonizer`
  (torchvision ConvNeXt, with the layer scale as a module of its own).

``_family_canonizers`` picks the canonizers of a family.
"""

from __future__ import annotations

import weakref
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock as ResNetBasicBlock
from torchvision.models.resnet import Bottleneck as ResNetBottleneck
from zennit.canonizers import AttributeCanonizer, Canonizer, MergeBatchNorm, SequentialMergeBatchNorm
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm, Convolution

__all__ = [
    "CNBlockCanonizer",
    "EfficientNetMergeBatchNorm",
    "MBConvSumCanonizer",
    "MergeBatchNormExact",
    "ResNetResidualCanonizer",
    "ResidualAdd",
    "SequentialMergeBatchNormExact",
    "TimmResNetCanonizer",
    "uncanonized_blocks",
]


class MergeBatchNormExact(MergeBatchNorm):
    """zennit's batch-norm merge with the BN epsilon zeroed while merged (then restored).

    zennit 0.5.1 folds ``(var + eps)`` into the linear layer but leaves ``eps`` in the now-identity
    BN, which then divides by ``sqrt(1 + eps)`` and shifts every later activation.
    """

    def register(self, linears, batch_norm):
        super().register(linears, batch_norm)
        self._saved_eps = batch_norm.eps
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self._saved_eps


class SequentialMergeBatchNormExact(MergeBatchNormExact, SequentialMergeBatchNorm):
    """``SequentialMergeBatchNorm`` with the epsilon fix of :class:`MergeBatchNormExact`."""


def _is_mbconv(module: nn.Module) -> bool:
    return all(hasattr(module, key) for key in ("_depthwise_conv", "_bn1", "_project_conv", "_bn2", "_block_args"))


def _is_efficientnet(module: nn.Module) -> bool:
    return all(hasattr(module, key) for key in ("_conv_stem", "_bn0", "_blocks"))


class EfficientNetMergeBatchNorm(MergeBatchNormExact):
    """Merge the batch norms of ``efficientnet_lite_pytorch`` (and lukemelas') EfficientNets.

    zennit's sequential merger finds nothing there: each convolution holds a padding submodule, so
    the conv is no leaf. The pairs are known by name instead: per MBConvBlock ``_expand_conv/_bn0``,
    ``_depthwise_conv/_bn1``, ``_project_conv/_bn2``; on the model ``_conv_stem/_bn0`` and
    ``_conv_head/_bn1``.
    """

    BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
    MODEL_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))

    def apply(self, root_module):
        instances = []
        for module in root_module.modules():
            if _is_mbconv(module):
                pairs = self.BLOCK_PAIRS
            elif _is_efficientnet(module):
                pairs = self.MODEL_PAIRS
            else:
                continue
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
                if isinstance(conv, Convolution) and isinstance(bn, BatchNorm):
                    instance = self.copy()
                    instance.register((conv,), bn)
                    instances.append(instance)
        return instances


class ResidualAdd(nn.Module):
    """``a + b`` as a module of its own, so that a rule can split relevance between the summands.

    The two-input alternative to zennit's ``Sum`` over ``stack([a, b], -1)``: no stacked copy, and
    the forward is one addition. Only the single-sweep ("paper") rules handle it; zennit's stock
    hooks see a module's first input only, so the stock composites keep ``Sum``.
    """

    def forward(self, a, b):
        return a + b


def _residual_sum(block: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    adder = block.canonizer_sum
    if isinstance(adder, ResidualAdd):
        return adder(a, b)
    return adder(torch.stack([a, b], dim=-1))


class _ResidualCanonizer(AttributeCanonizer):
    """Swap a block's forward for one whose skip sum is a module (``Sum`` or ``ResidualAdd``)."""

    def __init__(self, two_input: bool = False):
        self.two_input = two_input
        super().__init__(self._attribute_map)

    def copy(self):
        return self.__class__(two_input=self.two_input)

    def _applies(self, module: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra(self, module: nn.Module) -> dict:
        return {}

    def _attribute_map(self, name, module):
        if not self._applies(module):
            return None
        return {
            "forward": type(self).forward.__get__(module),
            "canonizer_sum": ResidualAdd() if self.two_input else Sum(),
            **self._extra(module),
        }


class ResNetResidualCanonizer(_ResidualCanonizer):
    """torchvision ResNet Bottleneck/BasicBlock with the skip sum as a module.

    Same forward as zennit's ``ResNetBottleneckCanonizer``/``ResNetBasicBlockCanonizer`` (which
    the stock composites use); with ``two_input=True`` the sum is a :class:`ResidualAdd`.
    """

    def _applies(self, module):
        return isinstance(module, (ResNetBottleneck, ResNetBasicBlock))

    @staticmethod
    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "conv3"):  # Bottleneck
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(_residual_sum(self, identity, out))


class MBConvSumCanonizer(_ResidualCanonizer):
    """Route the skip connection of EfficientNet MBConv blocks through a module.

    The stock ``x = x + inputs`` is invisible to module hooks; the replacement forward is the
    original one (efficientnet_lite_pytorch 0.1.0) with ``canonizer_sum(stack([x, inputs], -1))``
    (a zennit ``Sum``; or a :class:`ResidualAdd` with ``two_input=True``) in its place, so a rule
    (zennit's Norm or the paper's absolute split) acts on it. Undone on removal.
    """

    def _applies(self, module):
        return _is_mbconv(module)

    @staticmethod
    def forward(self, inputs, drop_connect_rate=None):
        x = inputs
        if self._block_args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            x_squeezed = F.adaptive_avg_pool2d(x, 1)
            x_squeezed = self._se_expand(self._swish(self._se_reduce(x_squeezed)))
            x = torch.sigmoid(x_squeezed) * x
        x = self._bn2(self._project_conv(x))
        args = self._block_args
        if args.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            if drop_connect_rate and self.training:
                keep = 1.0 - drop_connect_rate
                mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = _residual_sum(self, x, inputs)
        return x


def _is_timm_resnet_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.models.resnet") and cls.__name__ in ("BasicBlock", "Bottleneck")


class TimmResNetCanonizer(_ResidualCanonizer):
    """timm's ResNet BasicBlock/Bottleneck (``timm.models.resnet``) with the skip sum as a module; the block's
    own forward otherwise (drop-block, anti-aliasing, squeeze-excitation and drop-path as timm runs them)."""

    def _applies(self, module):
        return _is_timm_resnet_block(module)

    @staticmethod
    def forward(self, x):
        shortcut = x
        if hasattr(self, "conv3"):  # Bottleneck
            out = self.act1(self.bn1(self.conv1(x)))
            out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
            out = self.bn3(self.conv3(out))
            last = self.act3
        else:  # BasicBlock
            out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            out = self.bn2(self.conv2(out))
            last = self.act2
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return last(_residual_sum(self, shortcut, out))


# residual block classes (torchvision's, timm's, others') whose skip sum a canonizer must make explicit
_RESIDUAL_CLASSES = ("Bottleneck", "BasicBlock", "ConvNeXtBlock", "CNBlock", "InvertedResidual", "MBConv",
                     "FusedMBConv", "DepthwiseSeparableConv", "EdgeResidual", "ResBottleneckBlock",
                     "BottleneckBlock", "ResidualBlock")


def _canonized(family: str, m: nn.Module) -> bool:
    if family == "resnet":
        return isinstance(m, (ResNetBottleneck, ResNetBasicBlock)) or _is_timm_resnet_block(m)
    if family == "convnext":
        return _is_cnblock(m)
    if family == "efficientnet_lite":
        return _is_mbconv(m)
    return False


def uncanonized_blocks(model: nn.Module, family: str) -> List[str]:
    """Names of the residual blocks (with a skip sum) that the family's canonizers do not rewrite: timm's
    ConvNeXt and EfficientNet blocks, torchvision's MBConv, ...; their skip sums reach LRP as plain additions
    (the gradient passes through them)."""
    out = []
    for name, m in model.named_modules():
        if type(m).__name__ not in _RESIDUAL_CLASSES or _canonized(family, m):
            continue
        if getattr(m, "has_skip", True) is False or getattr(m, "use_res_connect", True) is False:
            continue  # a block without a skip connection needs no canonizer
        out.append(name)
    return out


class _LayerScale(nn.Module):
    """``x * owner.layer_scale`` as a module (so a rule can pass relevance through it)."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self._owner = weakref.ref(owner)  # not a submodule: no parameter is registered twice

    def forward(self, x):
        return x * self._owner().layer_scale


def _is_cnblock(module: nn.Module) -> bool:
    return hasattr(module, "layer_scale") and hasattr(module, "stochastic_depth") and hasattr(module, "block")


class CNBlockCanonizer(_ResidualCanonizer):
    """torchvision ConvNeXt blocks: the residual ``result += input`` through a module, and the
    layer scale as a module of its own (relevance passes through a per-channel scaling)."""

    def _applies(self, module):
        return _is_cnblock(module)

    def _extra(self, module):
        return {"canonizer_scale": _LayerScale(module)}

    @staticmethod
    def forward(self, input):
        result = self.stochastic_depth(self.canonizer_scale(self.block(input)))
        return _residual_sum(self, input, result)


def _family_canonizers(family: str, merge_bn: bool, two_input: bool) -> List[Canonizer]:
    if family == "resnet":
        if two_input:
            return [ResNetResidualCanonizer(two_input=True), TimmResNetCanonizer(two_input=True)]
        merge = [SequentialMergeBatchNormExact()] if merge_bn else []
        return merge + [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(), TimmResNetCanonizer()]
    if family == "efficientnet_lite":
        merge = [EfficientNetMergeBatchNorm()] if merge_bn else []
        return merge + [MBConvSumCanonizer(two_input=two_input)]
    if family == "convnext":
        return [CNBlockCanonizer(two_input=two_input)]
    return []  # densenet: BN precedes its conv (nothing to merge), concatenation needs no rule
