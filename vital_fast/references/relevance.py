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

The single-sweep rules live in :mod:`vital_fast.references.lrp_rules`, the canonizers of each
family in :mod:`vital_fast.references.lrp_canonizers`; this module builds the composites from
them and runs the sweep.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from zennit.composites import EpsilonPlus, EpsilonPlusFlat
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.types import Activation, BatchNorm, Convolution

from vital_fast.models.batching import pad_batch, unpad
from vital_fast.models.identity import FAMILIES
from vital_fast.references.lrp_canonizers import (
    CNBlockCanonizer,
    EfficientNetMergeBatchNorm,
    MBConvSumCanonizer,
    MergeBatchNormExact,
    ResidualAdd,
    ResNetResidualCanonizer,
    SequentialMergeBatchNormExact,
    _family_canonizers,
    _LayerScale,
)
from vital_fast.references.lrp_transformer import conservative
from vital_fast.references.lrp_rules import (
    OP,
    PAPER_STABILIZER,
    _AbsSplitAddRule,
    _AbsSplitRule,
    _MaxPoolAsAvgRule,
    _NormRule,
    _PassRule,
    _ZPlusRule,
)

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

COMPOSITES = ("paper", "epsilon_plus_flat", "epsilon_plus")


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


_FOREIGN_CACHE: "weakref.WeakKeyDictionary[nn.Module, List[str]]" = weakref.WeakKeyDictionary()


def _uncanonized(model: nn.Module, family: str) -> List[str]:
    """:func:`~vital_fast.references.lrp_canonizers.uncanonized_blocks`, memoized per model."""
    from vital_fast.references.lrp_canonizers import uncanonized_blocks

    if model not in _FOREIGN_CACHE:
        _FOREIGN_CACHE[model] = uncanonized_blocks(model, family)
    return _FOREIGN_CACHE[model]


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
    if channels.dtype == torch.bool or channels.is_complex():
        raise TypeError(f"{OP}: 'channels' must have an integer dtype (channel indices) or a floating one "
                        f"(directions), got {channels.dtype}")
    if channels.dtype.is_floating_point:
        if channels.dim() != 2:
            raise TypeError(f"{OP}: 'channels' must have an integer dtype (channel indices, shape (B,)) or be "
                            f"floating directions of shape (B, C); got {channels.dtype} of shape {tuple(channels.shape)}")
        if channels.shape[0] != x.shape[0]:
            raise ValueError(f"{OP}: directions in 'channels' must have shape ({x.shape[0]}, C) (one per batch "
                             f"element of 'x' {tuple(x.shape)}), got {tuple(channels.shape)}")
    elif channels.shape != (x.shape[0],):
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


def _warn_family(model: nn.Module, family: str, composite: str, stacklevel: int) -> None:
    """The warning of a family without canonizers, or of residual blocks no canonizer knows."""
    if family == "generic" or (family == "vit" and composite != "paper"):
        warnings.warn(
            f"{OP}: family {family!r} has no canonizer; using zennit's "
            f"{'EpsilonPlus' if composite == 'epsilon_plus' else 'EpsilonPlusFlat'} without one. Residual "
            "sums and normalization layers get plain gradients, so relevance may be less faithful.",
            stacklevel=stacklevel,
        )
        return
    foreign = _uncanonized(model, family)
    if foreign:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n in set(foreign)})
        warnings.warn(
            f"{OP}: no canonizer for {len(foreign)} residual block(s) of family {family!r} ({', '.join(kinds)} "
            f"from {type(model).__module__.split('.')[0]}: {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); "
            "their skip sums get plain gradients, so relevance may be less faithful",
            stacklevel=stacklevel,
        )


def relevance_maps(
    model: nn.Module,
    x: torch.Tensor,
    target_layer: str,
    channels: torch.Tensor,
    record_layers: Sequence[str],
    *,
    family: str = "generic",
    composite: str = "paper",
    locations: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """LRP relevance of earlier layers' outputs for one target unit per batch element.

    The start relevance at ``target_layer``'s output ``A`` is ``R[b, c] = A[b, c]`` for
    ``c = channels[b]`` and zero for every other channel; for a direction ``d = channels[b]`` (a float
    row) it is ``R[b, c] = d[c] * A[b, c]`` (a one-hot ``d`` is the channel it names, bit for bit); with
    ``locations[b] = (y, x)`` (a spatial neuron; ``(-1, -1)``: none) only that position keeps it. It is propagated down with the rules of
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
    channels : Tensor (B,), integer, or (B, C), floating
        Target channel of each batch element (dimension 1 of the target output; the last
        dimension for ``family="vit"`` token layouts), or a direction per element.
    record_layers : sequence of str
        Dotted names of layers that run before the target; the relevance of their outputs is
        returned. A module called several times reports its last call before the target.
    locations : Tensor (B, 2), integer, optional
        A position ``(y, x)`` of the target's grid per element (for tokens: ``(token, 0)``), or
        ``(-1, -1)`` for the whole map.
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
    _warn_family(model, family, composite, stacklevel=3)
    record_names = list(dict.fromkeys(record_layers))
    captured: Dict[str, torch.Tensor] = {}
    target_out: List[torch.Tensor] = []
    handles = []
    # A one-element CPU batch runs as two (vital_fast.models.batching): its convolutions then take
    # oneDNN, not the MKL path whose sums depend on the thread schedule.
    n = x.shape[0]
    x = pad_batch(x.detach())
    if x.shape[0] != n:
        reps = [x.shape[0]] + [1] * (channels.dim() - 1)
        channels = channels.repeat(*reps)
        if locations is not None:
            locations = locations.repeat(x.shape[0], 1)

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

    # ViTs under the paper's composite: the conservative transformer rules (lrp_transformer), no zennit
    cp = family == "vit" and composite == "paper"
    with _eval_mode(model), (contextlib.nullcontext() if cp else _borrow_composite(model, family, composite)) as comp:
        try:
            if not cp:
                with torch.no_grad():  # canonizers edit parameters; never record that in a graph
                    comp.register(model)
            # after the composite: these hooks see the outputs its rules re-attached
            for name in record_names:
                handles.append(modules[name].register_forward_hook(make_record_hook(name)))
            handles.append(modules[target_layer].register_forward_hook(stop_hook))
            with torch.enable_grad(), (conservative(model) if cp else contextlib.nullcontext()):
                pdt = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
                x_in = x.detach().to(pdt if pdt in (torch.float16, torch.bfloat16) else x.dtype).requires_grad_(True)
                try:
                    model(x_in)
                except _StopForward:
                    pass
                if not target_out:
                    raise ValueError(f"{OP}: target layer {target_layer!r} did not run in the forward pass")
                maps = unpad(_backward(target_out[0], channels, captured, record_names, target_layer, family,
                                       locations, times_input=cp), n, x.shape[0])
        finally:
            for handle in handles:
                handle.remove()
            captured.clear()
            target_out.clear()
    return maps


def _backward(act, channels, captured, record_names, target_layer, family, locations=None, times_input=False,
              retain_graph=False):
    if not isinstance(act, torch.Tensor) or act.dim() < 2:
        raise ValueError(f"{OP}: target layer {target_layer!r} must output a tensor of at least 2-D")
    missing = [name for name in record_names if name not in captured]
    if missing:
        raise ValueError(f"{OP}: record layers {missing} did not run before target layer {target_layer!r}")
    channel_dim = act.dim() - 1 if (family == "vit" and act.dim() == 3) else 1
    n_channels = act.shape[channel_dim]
    if channels.dtype.is_floating_point and channels.shape[1] != n_channels:
        raise ValueError(f"{OP}: directions have {channels.shape[1]} values but target layer {target_layer!r} "
                         f"{tuple(act.shape)} has {n_channels} channels")
    if not channels.dtype.is_floating_point and channels.device.type == "cpu" and channels.numel() and (
        int(channels.min()) < 0 or int(channels.max()) >= n_channels
    ):
        raise ValueError(
            f"{OP}: 'channels' must lie in [0, {n_channels}) for target layer {target_layer!r} "
            f"{tuple(act.shape)}, got values in [{int(channels.min())}, {int(channels.max())}]"
        )
    shape = [1] * act.dim()
    shape[0], shape[channel_dim] = act.shape[0], n_channels
    if channels.dtype.is_floating_point:
        mask = channels.to(act.device, act.dtype)
    else:
        mask = F.one_hot(channels.to(act.device, torch.long), n_channels).to(act.dtype)
    if channel_dim != 1:
        mask = mask.unsqueeze(1)
    weight = mask.view(shape)
    if locations is not None:
        weight = weight * _location_mask(act, channel_dim, locations, target_layer)
    start = act.detach() * weight
    inputs = [captured[name] for name in record_names]
    # zennit's rules take the start relevance as the output gradient; gradient x input takes the weights
    # (then R_in = x * J^T w sums to w . J x = the start relevance's sum, for linear J)
    seed = weight.expand_as(act).to(act.dtype) if times_input else start
    grads = torch.autograd.grad(act, inputs, grad_outputs=seed, allow_unused=True, retain_graph=retain_graph)
    out = {}
    for name, tensor, grad in zip(record_names, inputs, grads):
        if grad is None:
            if tensor is act:
                out[name] = start.detach().float()
                continue
            raise ValueError(f"{OP}: record layer {name!r} does not feed target layer {target_layer!r}")
        # zennit's rules hand relevance back as the gradient; plain rules give gradient x input
        out[name] = (grad * tensor if times_input else grad).detach().float()
    return out


def _location_mask(act: torch.Tensor, channel_dim: int, locations: torch.Tensor, target_layer: str) -> torch.Tensor:
    """``(B, 1, H, W)`` (or ``(B, N, 1)`` for tokens) ones at each element's ``(y, x)`` (clamped to the grid); all
    ones for ``(-1, -1)``."""
    loc = locations.to("cpu", torch.long).reshape(act.shape[0], 2)
    grid = [act.shape[d] for d in range(1, act.dim()) if d != channel_dim]
    grid = (grid + [1])[:2] if len(grid) < 2 else grid[:2]
    m = torch.zeros(act.shape[0], *grid, dtype=act.dtype)
    for b, (y, x) in enumerate(loc.tolist()):
        if y < 0:
            m[b] = 1
        else:  # a location scaled from another resolution may land one past the edge: the edge it is
            m[b, min(y, grid[0] - 1), min(x, grid[1] - 1)] = 1
    m = m.to(act.device)
    if channel_dim == 1:
        return m.reshape(act.shape[0], 1, *act.shape[2:])
    return m.reshape(act.shape[0], act.shape[1], 1)


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
    location: Optional[Tuple[int, int]] = None,
) -> Dict[str, torch.Tensor]:
    """:func:`relevance_maps` over a large reference batch, ``batch_size`` images at a time.

    Parameters
    ----------
    x : Tensor (K, 3, H, W)
        Reference images.
    channels : int or Tensor () or (K,), or a float Tensor (C,)
        One channel for all images, or one per image; or one direction for all images.
    location : (y, x), optional
        A spatial neuron's position in the target layer's grid, for all images.
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
    if channels.dtype.is_floating_point and channels.dim() == 1:
        channels = channels[None].expand(k, -1)
    elif channels.dim() == 0:
        channels = channels.expand(k)
    if channels.shape[:1] != (k,) or (channels.dim() != 1 and not channels.dtype.is_floating_point):
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
            locations=None if location is None else torch.tensor([list(location)] * len(channels[start:start + batch_size])),
        )
        for name, rel in chunk.items():
            parts.setdefault(name, []).append(rel)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
