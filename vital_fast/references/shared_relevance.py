"""Relevance from a forward pass that also serves the caller's loss (:class:`SharedRelevance`).

:func:`~vital_fast.references.relevance.relevance_maps` runs a hooked forward of its own; an optimizer
that already runs the network on the same input can instead let that pass carry the rules
(:mod:`vital_fast.references.lrp_rules`, dual mode) and run the relevance sweep over its graph.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vital_fast.references.lrp_rules import OP, _Switch, dual_mode
from vital_fast.references.relevance import _backward, _borrow_composite, _warn_family

__all__ = ["SharedRelevance", "shares_forward"]


def shares_forward(model: nn.Module, family: str, composite: str) -> bool:
    """Whether :class:`SharedRelevance` can serve ``(model, family, composite)``: the paper composite on a
    family with canonizers (not ``vit``, whose conservative rules change the forward's graph, nor ``generic``,
    which uses zennit's stock hooks), a model in eval mode."""
    return composite == "paper" and family not in ("vit", "generic") and not any(m.training for m in model.modules())


class SharedRelevance:
    """:func:`relevance_maps` computed from a forward pass that also serves the caller's own loss.

    Entered around that forward pass (before any :class:`~vital_fast.models.FeatureTaps` of the caller,
    so that the taps see what the rules re-attach), it registers the paper composite in *dual mode*: every
    hooked module keeps its own autograd graph and is also tied to its inputs by its rule
    (:class:`~vital_fast.references.lrp_rules._DualNode`). After the pass, :meth:`maps` runs the relevance
    sweep of each start over the same graph (kept for the caller's backward); the caller's backward then
    gets the ordinary gradient. One forward pass instead of two; the maps equal :func:`relevance_maps` of
    the same input (tests/test_relevance.py). The forward must reach every start layer (tap them); a
    pass that called one of the start or record layers more than once (a shared ReLU) leaves ``ran`` False,
    since :func:`relevance_maps` explains such a module at the call before the start's first.

    Parameters
    ----------
    model : nn.Module
        In eval mode (see :func:`shares_forward`).
    family, composite : str
        As for :func:`relevance_maps`; only what :func:`shares_forward` accepts.
    starts : sequence of (target_layer, members, channels, record_layers, locations)
        One relevance sweep each: the batch rows it explains (``members``, indices into the forward's
        unpadded batch), their channels ``(M,)`` (integer) or directions ``(M, C)`` (float), the layers
        whose relevance it returns, and optional ``(M, 2)`` neuron locations.
    rule_dtype : torch.dtype or None
        ``torch.bfloat16``: under a bfloat16 autocast forward, the rules of modules whose inputs are
        bfloat16 compute in bfloat16: the maps stay as close to the float32 sweep as float32 rules over the
        same bfloat16 forward do (tests/test_relevance.py), at a fraction of their cost. None (default):
        rules compute in each module's parameter dtype, reading a reduced-precision forward in float32.
    """

    def __init__(self, model: nn.Module, family: str, composite: str, starts: Sequence[tuple],
                 rule_dtype: Optional[torch.dtype] = None) -> None:
        if not shares_forward(model, family, composite):
            raise ValueError(f"{OP}: no shared forward for family {family!r} with composite {composite!r} "
                             "(or a model in training mode); use relevance_maps")
        modules = dict(model.named_modules())
        self.model, self.family, self.composite = model, family, composite
        self.starts = []
        for layer, members, channels, record, locations in starts:
            for name in [layer, *record]:
                if name not in modules:
                    raise ValueError(f"{OP}: model has no layer named {name!r}")
            self.starts.append((layer, list(members), channels, list(dict.fromkeys(record)), locations))
        self.layers = list(dict.fromkeys([n for st in self.starts for n in (st[0], *st[3])]))
        self._modules = {name: modules[name] for name in self.layers}
        if rule_dtype not in (None, torch.bfloat16):
            raise ValueError(f"{OP}: rule_dtype must be None or torch.bfloat16, got {rule_dtype}")
        self._switch = _Switch(rule_dtype)
        self._captured: Dict[str, torch.Tensor] = {}
        self._calls: Dict[str, int] = {}
        self._stack: Optional[contextlib.ExitStack] = None
        self.ran = False
        self.repeated: List[str] = []  # start / record layers whose module the last pass called more than once

    def __enter__(self) -> "SharedRelevance":
        _warn_family(self.model, self.family, self.composite, stacklevel=3)
        self._captured.clear()
        self._calls.clear()
        self.ran = False
        self.repeated = []
        stack = contextlib.ExitStack()
        try:
            comp = stack.enter_context(_borrow_composite(self.model, self.family, self.composite))
            with torch.no_grad():
                comp.register(self.model)
            # in-place activations would fold a module's own graph into the tensor its rule reads
            flipped = [m for m in self.model.modules() if getattr(m, "inplace", False) is True]
            for m in flipped:
                m.inplace = False
            stack.callback(_restore_inplace, flipped)

            def capture(name):
                def hook(module, args, output):
                    self._calls[name] = self._calls.get(name, 0) + 1
                    if isinstance(output, torch.Tensor):
                        self._captured[name] = output
                        # later layers get a copy: an in-place op downstream (``out += identity``, an
                        # in-place ReLU in a model's forward) would rebind this tensor's values and grad_fn
                        return output.clone()
                return hook

            for name, mod in self._modules.items():  # after the composite: they see the re-attached outputs
                stack.callback(mod.register_forward_hook(capture(name)).remove)
            stack.enter_context(dual_mode(self._switch))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        # a module called more than once (a shared ReLU) is explained at one call by relevance_maps; here the
        # forward goes on past it, so such a pass does not serve (the caller falls back to relevance_maps)
        self.repeated = [name for name in self.layers if self._calls.get(name, 0) > 1]
        self.ran = (exc[0] is None and all(st[0] in self._captured for st in self.starts) and not self.repeated)

    def maps(self, n: int) -> List[Dict[str, torch.Tensor]]:
        """Per start, layer -> relevance ``(M, ...)`` of its members (float32, detached), from the forward
        pass just run over ``n`` unpadded rows. The graph is kept for the caller's backward."""
        if not self.ran:
            raise RuntimeError(f"{OP}: SharedRelevance.maps before a completed forward pass that called every start "
                               "and record layer exactly once (check .ran; else use relevance_maps)")
        out = []
        try:
            for layer, members, channels, record, locations in self.starts:
                act = self._captured[layer]
                rows = act.shape[0]
                cd = act.dim() - 1 if (self.family == "vit" and act.dim() == 3) else 1
                C = act.shape[cd]
                idx = torch.tensor(members, device=act.device)
                if not channels.dtype.is_floating_point and channels.device.type == "cpu" and channels.numel() and (
                        int(channels.min()) < 0 or int(channels.max()) >= C):  # checked on the host, before the copy
                    raise ValueError(f"{OP}: 'channels' must lie in [0, {C}) for target layer {layer!r} "
                                     f"{tuple(act.shape)}, got values in [{int(channels.min())}, {int(channels.max())}]")
                ch = channels.to(act.device)
                if ch.dtype.is_floating_point:
                    if ch.shape[-1] != C:
                        raise ValueError(f"{OP}: directions have {ch.shape[-1]} values but target layer {layer!r} "
                                         f"{tuple(act.shape)} has {C} channels")
                    rows_w = ch.to(act.dtype)
                else:
                    rows_w = F.one_hot(ch.long(), C).to(act.dtype)
                weight = torch.zeros(rows, C, dtype=act.dtype, device=act.device).index_copy_(0, idx, rows_w)
                locs = None
                if locations is not None:
                    locs = torch.full((rows, 2), -1, dtype=torch.long)
                    locs[idx.cpu()] = locations.to("cpu", torch.long)
                self._switch.lrp = True
                try:
                    got = _backward(act, weight, self._captured, record, layer, self.family, locs, retain_graph=True)
                finally:
                    self._switch.lrp = False
                out.append({name: got[name].index_select(0, idx) for name in record})
        finally:
            self._captured.clear()
        return out


def _restore_inplace(modules) -> None:
    for m in modules:
        m.inplace = True
