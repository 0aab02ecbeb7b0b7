"""The network under ``torch.compile`` (``Settings.compile``): taps whose hooks stay for the whole run.

:class:`~vital_fast.models.taps.FeatureTaps` registers its hooks for each call and, with
``stop_after=True``, ends the forward pass by raising from a hook; under ``torch.compile`` the first
would change the module's hooks every call (a recompilation) and the second breaks the graph. Here the
hooks are registered once (:class:`PersistentTaps`, on the union of the layers ever asked for) and
:class:`TappedForward` runs the whole network and returns the tapped outputs as a tuple in a fixed
layer order, plus the logits when asked. Nothing is skipped in Python; a compiled graph drops the
layers after the last tapped one by itself when the logits are not returned (dead code).

The hooks record only while a :class:`TappedForward` runs (``recording``), so an eager pass of the
same model meanwhile (relevance, an objective's own hooks) records nothing. :meth:`PersistentTaps.close`
removes them; the engine calls it when its run ends (:meth:`vital_fast.optim.engine.Engine.close`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vital_fast.models.taps import _first_tensor, _is_script, _script_error, _unwrap, resolve_layer

__all__ = ["COMPILE_DEBUG_BACKENDS", "PersistentTaps", "TappedForward", "compile_backends", "compiled_frames",
           "resolve_compile", "tapped_outputs"]

# torch.compile's debug backends (no code generation: dynamo's graph run as is, or through AOTAutograd)
COMPILE_DEBUG_BACKENDS = ("eager", "aot_eager")


def compile_backends() -> Tuple[str, ...]:
    """The backend names ``Settings.compile`` lists: torch's (``torch._dynamo.list_backends()``) and the
    debug backends ``eager`` and ``aot_eager``."""
    import torch._dynamo

    main = [b for b in torch._dynamo.list_backends() if b not in COMPILE_DEBUG_BACKENDS]
    return tuple(main) + COMPILE_DEBUG_BACKENDS


def resolve_compile(value: Optional[str]) -> Optional[str]:
    """The ``torch.compile`` backend for ``Settings.compile`` (None: not compiled).

    ``"off"`` (or None): eager; ``"on"``: ``"inductor"`` (torch.compile's default); any other value
    must name a registered torch dynamo backend (every name ``torch.compile(backend=...)`` accepts).

    Raises
    ------
    ValueError
        In one line, listing the valid values, for an unknown name.

    Example
    -------
    >>> resolve_compile("off") is None, resolve_compile("on")
    (True, 'inductor')
    """
    if value is None or value == "off":
        return None
    if value == "on":
        return "inductor"
    if isinstance(value, str) and value:
        import torch._dynamo

        if value in compile_backends() or value in torch._dynamo.list_backends(exclude_tags=()):
            return value
        listed = ", ".join(("off", "on") + compile_backends())
    else:
        listed = "off, on, inductor, eager, aot_eager"
    raise ValueError(f"unknown compile {value!r}; valid: {listed} (or another registered torch dynamo backend)")


class PersistentTaps:
    """Forward hooks on named layers of ``model``, registered once each and kept until :meth:`close`.

    While ``recording`` is true a hook stores its layer's output (the first tensor of a tuple output;
    for a layer run several times per pass, the last call) in ``store``; otherwise it does nothing.
    """

    def __init__(self, model: Any) -> None:
        module, _ = _unwrap(model)
        if _is_script(module):
            raise _script_error("compile")
        self.model = module
        self.store: Dict[str, torch.Tensor] = {}
        self.no_tensor: Dict[str, str] = {}
        self.recording = False
        self._handles: Dict[str, Any] = {}

    @property
    def layers(self) -> Tuple[str, ...]:
        """The hooked layers, in the order they were added."""
        return tuple(self._handles)

    def add(self, layers: Sequence[str]) -> None:
        """Hook every layer of ``layers`` that has no hook yet (an unknown name: ValueError)."""
        for name in layers:
            if name not in self._handles:
                self._handles[name] = resolve_layer(self.model, name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if not self.recording:
                return
            t = _first_tensor(output)
            if t is None:
                self.no_tensor[name] = type(output).__name__
            else:
                self.store[name] = t

        return hook

    def reset(self) -> None:
        """Stop recording and forget what was recorded (after a pass that raised)."""
        self.recording = False
        self.store.clear()
        self.no_tensor.clear()

    def close(self) -> None:
        """Remove every hook (the model is left with the hooks it had before)."""
        self.reset()
        while self._handles:
            self._handles.popitem()[1].remove()


class TappedForward(nn.Module):
    """``forward(x)``: run the whole model and return the outputs of ``layers`` (a tuple, in that order),
    followed by the logits when ``logits`` is true; through ``taps`` (which must hook ``layers``)."""

    def __init__(self, taps: PersistentTaps, layers: Sequence[str], logits: bool) -> None:
        super().__init__()
        self.model = taps.model
        self.taps = taps
        self.layers: Tuple[str, ...] = tuple(layers)
        self.logits = bool(logits)
        taps.add(self.layers)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        taps = self.taps
        taps.recording = True
        out = self.model(x)
        taps.recording = False
        missing = [n for n in self.layers if n not in taps.store]
        if missing:
            details = [f"'{n}' returned {taps.no_tensor[n]} (no tensor)" if n in taps.no_tensor else f"'{n}' never ran"
                       for n in missing]
            raise RuntimeError("compiled forward: no output for " + "; ".join(details))
        feats = tuple(taps.store[n] for n in self.layers)
        taps.store.clear()  # no reference to this pass's tensors outlives it
        return feats + (out,) if self.logits else feats


def tapped_outputs(outs: Sequence[torch.Tensor], layers: Sequence[str], logits: bool
                   ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """``TappedForward``'s tuple as ``({layer: output}, logits or None)``."""
    feats = dict(zip(layers, outs[:len(layers)]))
    return feats, (outs[len(layers)] if logits else None)


def compiled_frames() -> int:
    """How many frames torch dynamo has compiled in this process (a change: the call compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo's counters: no compile time recorded
        return 0
    return int(counters["frames"]["ok"])
