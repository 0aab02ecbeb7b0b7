"""LRP relevance maps for channel targets (DESIGN.md §1 "Relevance weighting", §5 "Channel targets").

For a target channel ``n`` at layer ``L`` and an input ``x``, :func:`relevance_maps` returns, for
each requested earlier layer ``l'``, the LRP relevance of that layer's *output* (same shape as its
activations). The start relevance is the target channel's own activation map at ``L`` (all other
channels zero). Every batch element carries its own target channel; all rules act per sample, so
one backward sweep for ``B`` channels equals ``B`` separate sweeps. The forward pass stops at ``L``
and the backward sweep at the earliest recorded layer.

Composites
----------
``"paper"`` (default): the rules of the paper's code (DESIGN.md §5).

- every convolution (and ``nn.Linear``): z+ (zennit's ``ZPlus`` semantics, stabilizer 1e-5);
- BatchNorm, LayerNorm and element-wise activations (ReLU, ReLU6, GELU, SiLU, ...): passed through;
  batch norms are *not* merged into the convolutions, as in the paper's code;
- max pooling: treated as average pooling (z-rule over each window). As in the paper's code the
  window is 2x2 with stride 2 whenever that reproduces the pool's output shape (ResNet's 3x3/2
  stem pool), otherwise the pool's own geometry. A 2x2 window that is all zero while the 3x3 max
  was not drops its relevance (a few percent at the stem of a random ResNet; nothing above it).
  Average pooling: the same z-rule;
- residual sums (made explicit by a canonizer as a two-input :class:`ResidualAdd`): relevance
  split by ``|a| / (|a| + |b|)``.

These rules are zennit ``Hook`` subclasses registered through a zennit ``Composite`` with
canonizers, but they work as a single backward sweep: a hooked module's forward runs on a detached
input and its output is re-attached through one custom autograd node whose backward *is* the rule.
zennit's stock hooks instead let autograd differentiate the module and then overwrite that
gradient, clone every input and recompute each convolution twice (z+ also for inputs that are
all non-negative); the sweep gives the same maps (tests/test_relevance.py checks it against
zennit's own ``ZPlus``/``Pass`` hooks) about 3x faster on ResNet-50.

``"epsilon_plus_flat"`` / ``"epsilon_plus"``: zennit's stock composites and hooks with the
canonizers of the family (batch norms merged, with the BN epsilon zeroed while merged, see
:class:`MergeBatchNormExact`; residual sums through zennit's ``Sum`` with its Norm rule).

Families
--------
``"resnet"`` (torchvision ResNets), ``"efficientnet_lite"`` (``efficientnet_lite_pytorch``:
:class:`MBConvSumCanonizer`, and :class:`EfficientNetMergeBatchNorm` for the stock composites),
``"densenet"`` (no canonizer needed: concatenations split relevance by themselves), ``"convnext"``
(torchvision: :class:`CNBlockCanonizer`), ``"vit"`` and ``"generic"``: zennit's ``EpsilonPlusFlat``
(or ``EpsilonPlus``) without canonizers, with a warning. For ViTs the maps keep the token layout
``(B, N, D)`` and the channel is the last dimension.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.models.resnet import BasicBlock as ResNetBasicBlock
from torchvision.models.resnet import Bottleneck as ResNetBottleneck
from zennit.canonizers import AttributeCanonizer, Canonizer, MergeBatchNorm, SequentialMergeBatchNorm
from zennit.composites import EpsilonPlus, EpsilonPlusFlat
from zennit.core import Composite, Hook, RemovableHandle, RemovableHandleList, stabilize
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Activation, BatchNorm, Convolution

from vital_fast.models.batching import pad_batch, unpad

__all__ = [
    "COMPOSITES",
    "FAMILIES",
    "CNBlockCanonizer",
    "EfficientNetMergeBatchNorm",
    "MBConvSumCanonizer",
    "MergeBatchNormExact",
    "ResNetResidualCanonizer",
    "ResidualAdd",
    "SequentialMergeBatchNormExact",
    "reference_relevance",
    "relevance_maps",
]

OP = "relevance_maps"
FAMILIES = ("resnet", "efficientnet_lite", "densenet", "convnext", "vit", "generic")
COMPOSITES = ("paper", "epsilon_plus_flat", "epsilon_plus")
# The paper's code stabilizes z+ with eps = 1e-5 (DESIGN.md §5).
PAPER_STABILIZER = 1e-5


# ----------------------------------------------------------------------------------------------
# Single-sweep rules (zennit Hooks)
# ----------------------------------------------------------------------------------------------


class _RuleNode(torch.autograd.Function):
    """Ties a module's output (computed on detached inputs) back to its inputs; backward = rule."""

    @staticmethod
    def forward(ctx, rule, module, out, *xs):
        ctx.rule = rule
        ctx.module = module
        ctx.in_shapes = [x.shape for x in xs]
        if rule.saves_input:
            ctx.save_for_backward(*xs)
        # a detached alias, not the tensor itself: returning an input as-is makes autograd wrap it
        # as a view, and the in-place activations of torchvision models then refuse to run on it
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        xs = ctx.saved_tensors if ctx.rule.saves_input else (None,) * len(ctx.in_shapes)
        rels = ctx.rule.relevances(ctx.module, xs, relevance)
        for rel, shape in zip(rels, ctx.in_shapes):
            if rel.shape != shape:
                raise RuntimeError(
                    f"{OP}: rule {type(ctx.rule).__name__} on {type(ctx.module).__name__} produced relevance "
                    f"of shape {tuple(rel.shape)} for an input of shape {tuple(shape)}"
                )
        return (None, None, None, *rels)


class _SweepRule(Hook):
    """Base of the single-sweep rules: a zennit Hook whose backward is an autograd node of its own.

    ``pre_forward`` hands the module detached aliases of its first ``n_inputs`` inputs, so
    autograd does not differentiate the module at all; ``post_forward`` re-attaches the output to
    the real inputs through :class:`_RuleNode`, whose backward calls :meth:`relevances`.
    """

    saves_input = True
    n_inputs = 1

    def __init__(self, stabilizer: float = PAPER_STABILIZER):
        super().__init__()
        self.stabilizer = stabilizer
        self._pending: List[Optional[Tuple[torch.Tensor, ...]]] = []

    def copy(self):
        return self.__class__(stabilizer=self.stabilizer)

    def register(self, module):
        return RemovableHandleList(
            [
                RemovableHandle(self),
                module.register_forward_pre_hook(self.pre_forward),
                module.register_forward_hook(self.post_forward),
            ]
        )

    def pre_forward(self, module, args):
        xs = tuple(args[: self.n_inputs])
        if (
            len(xs) != self.n_inputs
            or not all(isinstance(x, torch.Tensor) for x in xs)
            or not any(x.requires_grad for x in xs)
            or not torch.is_grad_enabled()
        ):
            self._pending.append(None)
            return None
        self._pending.append(xs)
        return tuple(x.detach() for x in xs) + tuple(args[self.n_inputs :])

    def post_forward(self, module, args, output):
        xs = self._pending.pop() if self._pending else None
        if xs is None or not isinstance(output, torch.Tensor):
            return None
        return _RuleNode.apply(self, module, output, *xs)

    def remove(self):
        self._pending.clear()
        super().remove()

    def relevances(self, module, xs, rel):
        """Relevance of each input, given the saved inputs ``xs`` and the output relevance."""
        return (self.relevance(module, xs[0], rel),)

    def relevance(self, module, x, rel):  # pragma: no cover - abstract
        raise NotImplementedError


class _PassRule(_SweepRule):
    """Relevance passes through unchanged (BatchNorm, LayerNorm, element-wise activations)."""

    saves_input = False

    def relevance(self, module, x, rel):
        return rel


@contextmanager
def _swapped_params(module: nn.Module, **tensors):
    """Temporarily replace entries of ``module._parameters`` (no nn.Parameter creation, no hooks)."""
    params = module._parameters
    saved = {key: params[key] for key in tensors if key in params}
    try:
        for key in saved:
            params[key] = tensors[key]
        yield module
    finally:
        params.update(saved)


class _ClampedParams:
    """z+ parameter views of one module: w+ (and lazily w-, b+), reused while the weights are unchanged.

    Valid while the weight's storage, version counter, dtype and device are the same (an in-place
    update bumps the version; ``.data =`` or ``.to()`` changes the storage). The cache keeps a
    detached alias of the weight it was built from, so that storage cannot be freed and reused at
    the same address while the entry lives.
    """

    __slots__ = ("source", "version", "bias_key", "pos", "neg", "bias_pos")

    def __init__(self, weight, bias):
        self.source = weight.detach()
        self.version = weight._version
        self.bias_key = None if bias is None else (bias.data_ptr(), bias._version)
        self.pos = self.source.clamp(min=0)
        self.neg = None
        self.bias_pos = None if bias is None else bias.detach().clamp(min=0)

    def valid_for(self, weight, bias):
        return (
            self.source.data_ptr() == weight.data_ptr()
            and self.version == weight._version
            and self.source.dtype == weight.dtype
            and self.source.shape == weight.shape
            and self.bias_key == (None if bias is None else (bias.data_ptr(), bias._version))
        )

    def negative(self):
        if self.neg is None:
            self.neg = self.source.clamp(max=0)
        return self.neg


_PARAM_CACHE: "weakref.WeakKeyDictionary[nn.Module, _ClampedParams]" = weakref.WeakKeyDictionary()
# Trades memory (one clamped copy of each convolution's weight, two for convolutions that see
# negative inputs) for not re-clamping every weight on every call.
CACHE_CLAMPED_WEIGHTS = True


def _clamped_params(module: nn.Module) -> _ClampedParams:
    weight = module.weight
    bias = getattr(module, "bias", None)
    entry = _PARAM_CACHE.get(module) if CACHE_CLAMPED_WEIGHTS else None
    if entry is None or not entry.valid_for(weight, bias):
        with torch.no_grad():
            entry = _ClampedParams(weight, bias)
        if CACHE_CLAMPED_WEIGHTS:
            _PARAM_CACHE[module] = entry
    return entry


class _ZPlusRule(_SweepRule):
    """z+ (alpha=1, beta=0) exactly as zennit's ``ZPlus``: z = x+ w+ + b+ + x- w-, R_i = x_i c_i.

    The x- branch is skipped when the input has no negative entries (after a ReLU): the result is
    the same, the work half. z is non-negative, so zennit's stabilizer ``z + eps·sign(z)`` (sign(0)
    taken as +1) is exactly ``z + eps``.
    """

    def relevance(self, module, x, rel):
        params = _clamped_params(module)
        has_neg = bool(x.min() < 0)
        parts = [x.clamp(min=0), x.clamp(max=0)] if has_neg else [x]
        with torch.enable_grad():
            inputs = [part.detach().requires_grad_() for part in parts]
            with _swapped_params(module, weight=params.pos, bias=params.bias_pos):
                z = module.forward(inputs[0])
            if has_neg:
                with _swapped_params(module, weight=params.negative(), bias=None):
                    z = z + module.forward(inputs[1])
        # in place on z's values only: no node of this small graph saved z
        scaled = rel / z.detach().add_(self.stabilizer)
        grads = torch.autograd.grad(z, inputs, scaled)
        out = grads[0].mul_(parts[0])
        if has_neg:
            out.addcmul_(parts[1], grads[1])
        return out


class _NormRule(_SweepRule):
    """z-rule for parameter-free linear modules (average pooling): R_i = x_i d z/dx_i · R / z."""

    def _forward(self, module, x, out_shape):
        return module.forward(x)

    def relevance(self, module, x, rel):
        with torch.enable_grad():
            xi = x.detach().requires_grad_()
            z = self._forward(module, xi, rel.shape)
        (grad,) = torch.autograd.grad(z, xi, rel / stabilize(z.detach(), self.stabilizer))
        return x * grad


class _MaxPoolAsAvgRule(_NormRule):
    """Max pooling explained as average pooling (the paper's code swaps in a 2x2 average pool)."""

    def _forward(self, module, x, out_shape):
        z = F.avg_pool2d(x, 2, 2)
        if z.shape == out_shape:
            return z
        return F.avg_pool2d(
            x, module.kernel_size, module.stride, module.padding, module.ceil_mode, count_include_pad=True
        )


class _AbsSplitRule(_SweepRule):
    """Residual sum (zennit ``Sum`` over stacked summands): R_k = |x_k| / sum_j |x_j| · R."""

    def relevance(self, module, x, rel):
        dim = module.dim
        mag = x.abs()
        share = rel.unsqueeze(dim) / mag.sum(dim, keepdim=True).add_(self.stabilizer)
        return mag.mul_(share)


class _AbsSplitAddRule(_SweepRule):
    """Residual ``a + b`` (:class:`ResidualAdd`): R_a = |a| / (|a| + |b|) · R, and R_b likewise."""

    n_inputs = 2

    def relevances(self, module, xs, rel):
        mag_a, mag_b = xs[0].abs(), xs[1].abs()
        share = torch.div(rel, (mag_a + mag_b).add_(self.stabilizer))
        return mag_a.mul_(share), mag_b.mul_(share)


# ----------------------------------------------------------------------------------------------
# Canonizers
# ----------------------------------------------------------------------------------------------


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
            return [ResNetResidualCanonizer(two_input=True)]
        merge = [SequentialMergeBatchNormExact()] if merge_bn else []
        return merge + [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    if family == "efficientnet_lite":
        merge = [EfficientNetMergeBatchNorm()] if merge_bn else []
        return merge + [MBConvSumCanonizer(two_input=two_input)]
    if family == "convnext":
        return [CNBlockCanonizer(two_input=two_input)]
    return []  # densenet: BN precedes its conv (nothing to merge), concatenation needs no rule


# ----------------------------------------------------------------------------------------------
# Composites
# ----------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def _is_elementwise_activation(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):  # zennit lists it as an "Activation"
        return False
    return isinstance(module, Activation) or type(module).__name__ in ("Swish", "MemoryEfficientSwish")


class _PaperComposite(Composite):
    """The paper's rules as a zennit Composite (see the module docstring)."""

    def __init__(self, canonizers=None, stabilizer: float = PAPER_STABILIZER):
        self.stabilizer = stabilizer
        self._zplus = _ZPlusRule(stabilizer)
        self._pass = _PassRule(stabilizer)
        self._maxpool = _MaxPoolAsAvgRule(stabilizer)
        self._norm = _NormRule(stabilizer)
        self._sum = _AbsSplitRule(stabilizer)
        self._add = _AbsSplitAddRule(stabilizer)
        super().__init__(module_map=self._map, canonizers=canonizers)

    def _map(self, ctx, name, module):
        if isinstance(module, (Convolution, nn.Linear)):
            return self._zplus
        if isinstance(module, ResidualAdd):
            return self._add
        if isinstance(module, Sum):
            return self._sum
        if isinstance(module, (BatchNorm, _NORM_TYPES, _LayerScale)) or _is_elementwise_activation(module):
            return self._pass
        if isinstance(module, nn.MaxPool2d) and module.dilation in (1, (1, 1)) and not module.return_indices:
            return self._maxpool
        if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return self._norm
        return None


def _build_composite(family: str, composite: str) -> Composite:
    if family in ("vit", "generic"):
        # zennit maps nn.MultiheadAttention to Pass, whose hook cannot serve its three inputs:
        # leave attention to the plain gradient instead
        layer_map = [(nn.MultiheadAttention, None)]
        if composite == "epsilon_plus":
            return EpsilonPlus(layer_map=layer_map)
        return EpsilonPlusFlat(layer_map=layer_map)
    if composite == "paper":
        return _PaperComposite(canonizers=_family_canonizers(family, merge_bn=False, two_input=True))
    layer_map = [(_LayerScale, Pass())]
    canonizers = _family_canonizers(family, merge_bn=True, two_input=False)
    if composite == "epsilon_plus":
        return EpsilonPlus(layer_map=layer_map, canonizers=canonizers)
    return EpsilonPlusFlat(layer_map=layer_map, canonizers=canonizers)


class _CacheEntry:
    __slots__ = ("composite", "busy")

    def __init__(self, composite):
        self.composite = composite
        self.busy = False


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple[str, str], _CacheEntry]]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


@contextmanager
def _borrow_composite(model: nn.Module, family: str, composite: str):
    """One composite per (model, family, composite), reused; a fresh one while it is in use."""
    key = (family, composite)
    with _CACHE_LOCK:
        per_model = _CACHE.setdefault(model, {})
        entry = per_model.get(key)
        if entry is None:
            entry = per_model[key] = _CacheEntry(_build_composite(family, composite))
        if entry.busy:  # re-entrant or concurrent use of the same model
            entry = _CacheEntry(_build_composite(family, composite))
        entry.busy = True
    try:
        yield entry.composite
    finally:
        entry.composite.remove()
        entry.busy = False


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the target layer's hook: nothing after the target is needed."""


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the call (BN batch statistics would couple samples and update buffers)."""
    training = [m for m in model.modules() if m.training]
    try:
        for m in training:
            m.training = False
        yield
    finally:
        for m in training:
            m.training = True


def _check_args(model, x, channels, target_layer, record_layers, family, composite):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{OP}: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: 'x' must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{OP}: 'x' must have a floating dtype, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{OP}: 'x' must be 4-D (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if not isinstance(channels, torch.Tensor):
        raise TypeError(f"{OP}: 'channels' must be a torch.Tensor, got {type(channels).__name__}")
    if channels.dtype.is_floating_point or channels.dtype == torch.bool or channels.is_complex():
        raise TypeError(f"{OP}: 'channels' must have an integer dtype, got {channels.dtype}")
    if channels.shape != (x.shape[0],):
        raise ValueError(
            f"{OP}: 'channels' must have shape ({x.shape[0]},) (one per batch element of 'x' "
            f"{tuple(x.shape)}), got {tuple(channels.shape)}"
        )
    if family not in FAMILIES:
        raise ValueError(f"{OP}: 'family' must be one of {FAMILIES}, got {family!r}")
    if composite not in COMPOSITES:
        raise ValueError(f"{OP}: 'composite' must be one of {COMPOSITES}, got {composite!r}")
    if isinstance(record_layers, str):
        raise TypeError(f"{OP}: 'record_layers' must be a sequence of layer names, got the string {record_layers!r}")
    modules = dict(model.named_modules())
    for name in [target_layer, *record_layers]:
        if name not in modules:
            raise ValueError(f"{OP}: model has no layer named {name!r}")
    return modules


def relevance_maps(
    model: nn.Module,
    x: torch.Tensor,
    target_layer: str,
    channels: torch.Tensor,
    record_layers: Sequence[str],
    *,
    family: str = "generic",
    composite: str = "paper",
) -> Dict[str, torch.Tensor]:
    """LRP relevance of earlier layers' outputs for one target channel per batch element.

    The start relevance at ``target_layer``'s output ``A`` is ``R[b, c] = A[b, c]`` for
    ``c = channels[b]`` and zero for every other channel. It is propagated down with the rules of
    ``composite`` (see the module docstring) in a single backward sweep for the whole batch. The
    forward pass stops at ``target_layer`` and the sweep stops at the earliest recorded layer.
    The model is left exactly as it was: canonizers undone, hooks removed, training flags restored
    (the call itself runs in eval mode), parameters untouched, also when an exception is raised.

    Parameters
    ----------
    model : nn.Module
        The network; its parameters need not (and should not) require grad.
    x : Tensor (B, 3, H, W)
        The (already normalized) model input. Not modified; no gradient flows to it.
    target_layer : str
        Dotted module name of the target layer (``"layer3"``, ``"_blocks.10"``); for a module
        called several times (a shared ReLU), its first call.
    channels : Tensor (B,), integer
        Target channel of each batch element (dimension 1 of the target output; the last
        dimension for ``family="vit"`` token layouts).
    record_layers : sequence of str
        Dotted names of layers that run before the target; the relevance of their outputs is
        returned. A module called several times reports its last call before the target.
    family : str
        ``"resnet" | "efficientnet_lite" | "densenet" | "convnext" | "vit" | "generic"``.
    composite : str
        ``"paper" | "epsilon_plus_flat" | "epsilon_plus"``.

    Returns
    -------
    dict[str, Tensor]
        Layer name -> relevance of shape ``(B, C_l, H_l, W_l)`` (the layer's output shape),
        detached, float32.

    Raises
    ------
    TypeError, ValueError
        Bad argument types, shapes, unknown layer names, a record layer that does not run before
        the target or does not feed it, or a channel index out of range.

    Example
    -------
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().eval().requires_grad_(False)
    >>> rel = relevance_maps(model, torch.randn(2, 3, 64, 64), "layer3", torch.tensor([3, 7]),
    ...                      ["layer1", "layer2"], family="resnet")
    >>> tuple(rel["layer1"].shape), tuple(rel["layer2"].shape)
    ((2, 64, 16, 16), (2, 128, 8, 8))
    """
    modules = _check_args(model, x, channels, target_layer, record_layers, family, composite)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{OP}: LRP needs autograd; call it outside torch.inference_mode() (no_grad is fine)")
    if x.is_inference():
        x = x.clone()  # an inference tensor cannot join an autograd graph; a clone made here can
    if family in ("vit", "generic"):
        warnings.warn(
            f"{OP}: family {family!r} has no canonizer; using zennit's "
            f"{'EpsilonPlus' if composite == 'epsilon_plus' else 'EpsilonPlusFlat'} without one. Residual "
            "sums and normalization layers get plain gradients, so relevance may be less faithful.",
            stacklevel=2,
        )
    record_names = list(dict.fromkeys(record_layers))
    captured: Dict[str, torch.Tensor] = {}
    target_out: List[torch.Tensor] = []
    handles = []
    # A one-element CPU batch runs as two (vital_fast.models.batching): its convolutions then take
    # oneDNN, not the MKL path whose sums depend on the thread schedule.
    n = x.shape[0]
    x = pad_batch(x.detach())
    if x.shape[0] != n:
        channels = channels.reshape(-1).repeat(x.shape[0])

    def make_record_hook(name):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"{OP}: record layer {name!r} must output a tensor, got {type(output).__name__}")
            captured[name] = output
            # Later layers get a copy: an in-place op downstream (``out += identity``) would
            # otherwise rebind this tensor's grad_fn and its "gradient" would belong to the sum.
            return output.clone()

        return hook

    def stop_hook(module, args, output):
        target_out.append(output)
        raise _StopForward

    with _eval_mode(model), _borrow_composite(model, family, composite) as comp:
        try:
            with torch.no_grad():  # canonizers edit parameters; never record that in a graph
                comp.register(model)
            # after the composite: these hooks see the outputs its rules re-attached
            for name in record_names:
                handles.append(modules[name].register_forward_hook(make_record_hook(name)))
            handles.append(modules[target_layer].register_forward_hook(stop_hook))
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                try:
                    model(x_in)
                except _StopForward:
                    pass
                if not target_out:
                    raise ValueError(f"{OP}: target layer {target_layer!r} did not run in the forward pass")
                maps = unpad(_backward(target_out[0], channels, captured, record_names, target_layer, family),
                             n, x.shape[0])
        finally:
            for handle in handles:
                handle.remove()
            captured.clear()
            target_out.clear()
    return maps


def _backward(act, channels, captured, record_names, target_layer, family):
    if not isinstance(act, torch.Tensor) or act.dim() < 2:
        raise ValueError(f"{OP}: target layer {target_layer!r} must output a tensor of at least 2-D")
    missing = [name for name in record_names if name not in captured]
    if missing:
        raise ValueError(f"{OP}: record layers {missing} did not run before target layer {target_layer!r}")
    channel_dim = act.dim() - 1 if (family == "vit" and act.dim() == 3) else 1
    n_channels = act.shape[channel_dim]
    if channels.device.type == "cpu" and channels.numel() and (
        int(channels.min()) < 0 or int(channels.max()) >= n_channels
    ):
        raise ValueError(
            f"{OP}: 'channels' must lie in [0, {n_channels}) for target layer {target_layer!r} "
            f"{tuple(act.shape)}, got values in [{int(channels.min())}, {int(channels.max())}]"
        )
    shape = [1] * act.dim()
    shape[0], shape[channel_dim] = act.shape[0], n_channels
    mask = F.one_hot(channels.to(act.device, torch.long), n_channels).to(act.dtype)
    if channel_dim != 1:
        mask = mask.unsqueeze(1)
    start = act.detach() * mask.view(shape)
    inputs = [captured[name] for name in record_names]
    grads = torch.autograd.grad(act, inputs, grad_outputs=start, allow_unused=True)
    out = {}
    for name, tensor, grad in zip(record_names, inputs, grads):
        if grad is None:
            if tensor is act:
                grad = start
            else:
                raise ValueError(f"{OP}: record layer {name!r} does not feed target layer {target_layer!r}")
        out[name] = grad.detach().float()
    return out


def reference_relevance(
    model: nn.Module,
    x: torch.Tensor,
    target_layer: str,
    channels: Union[int, torch.Tensor],
    record_layers: Sequence[str],
    *,
    family: str,
    composite: str = "paper",
    batch_size: int = 8,
) -> Dict[str, torch.Tensor]:
    """:func:`relevance_maps` over a large reference batch, ``batch_size`` images at a time.

    Parameters
    ----------
    x : Tensor (K, 3, H, W)
        Reference images.
    channels : int or Tensor () or (K,)
        One channel for all images, or one per image.
    batch_size : int
        Images per LRP sweep.

    Returns
    -------
    dict[str, Tensor]
        Layer name -> relevance ``(K, C_l, H_l, W_l)``, float32, on ``x``'s device.

    Example
    -------
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().eval().requires_grad_(False)
    >>> rel = reference_relevance(model, torch.randn(3, 3, 64, 64), "layer2", 5, ["layer1"],
    ...                           family="resnet", batch_size=2)
    >>> tuple(rel["layer1"].shape)
    (3, 64, 16, 16)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"reference_relevance: 'x' must be a 4-D tensor (K, C, H, W), got {getattr(x, 'shape', x)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reference_relevance: 'batch_size' must be a positive int, got {batch_size!r}")
    k = x.shape[0]
    channels = torch.as_tensor(channels, device=x.device)
    if channels.dim() == 0:
        channels = channels.expand(k)
    if channels.shape != (k,):
        raise ValueError(
            f"reference_relevance: 'channels' must be a scalar or have shape ({k},), got {tuple(channels.shape)}"
        )
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, k, batch_size):
        chunk = relevance_maps(
            model,
            x[start : start + batch_size],
            target_layer,
            channels[start : start + batch_size],
            record_layers,
            family=family,
            composite=composite,
        )
        for name, rel in chunk.items():
            parts.setdefault(name, []).append(rel)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
