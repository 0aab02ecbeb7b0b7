"""Feature taps: read the outputs of named layers of any ``nn.Module`` through forward hooks.

Hooks are registered only on the layers asked for, inside a context manager that removes them
on exit, also when the body raises (STYLE.md habit 23, zennit's pattern). Layers are addressed by
their ``named_modules()`` names (``"layer4"``, ``"features.denseblock4"``,
``"encoder.layers.encoder_layer_11"``).

Layout: CNN layers give ``(B, C, H, W)`` (channel dimension 1); ViT encoder layers give tokens
``(B, N, C)`` with the CLS token included (channel dimension -1). A module that returns a tuple or
a list is tapped at its first tensor.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vital_fast.models.batching import pad_batch, unpad

__all__ = ["FeatureTaps", "channel_dim", "list_layers", "resolve_layer"]


def _unwrap(model: Any) -> Tuple[nn.Module, Any]:
    """``(module, loaded)`` for an ``nn.Module`` or a ``LoadedModel`` (duck-typed: no import cycle)."""
    if isinstance(model, nn.Module):
        return model, None
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner, model
    raise TypeError(f"expected an nn.Module or a LoadedModel, got {type(model).__name__}")


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _script_error(op: str) -> TypeError:
    return TypeError(
        f"{op}: TorchScript modules run compiled code, so Python forward hooks on their layers never "
        "run and no layer can be tapped; save the weights with torch.save(model.state_dict(), path) "
        "and load them with load_model(path, arch=...) instead"
    )


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The tensor a tap records: the output itself, or the first tensor of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        items = output
    elif isinstance(output, dict):
        items = list(output.values())
    else:
        return None
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _module_names(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: Any, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name`` in ``named_modules()``.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The network.
    name : str
        A dotted module name, e.g. ``"layer4"`` or ``"features.denseblock4"``.

    Returns
    -------
    nn.Module
        The submodule.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the closest names (``difflib``).

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import resolve_layer
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> resolve_layer(net, "0")
    Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
    """
    module, _ = _unwrap(model)
    if not isinstance(name, str) or not name:
        raise ValueError(f"resolve_layer: layer name must be a non-empty str, got {name!r}")
    modules = dict(module.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    if close:
        hint = "closest: " + ", ".join(close)
    else:
        top = [n for n in names if "." not in n]
        hint = "top-level modules: " + (", ".join(top[:12]) + (", ..." if len(top) > 12 else "") or "none")
    raise ValueError(f"unknown layer '{name}'; {hint}")


def channel_dim(model: Any, layer: str, family: str) -> int:
    """The channel dimension of ``layer``'s output: 1 for CNN layers, -1 for ViT token layers.

    In the ``"vit"`` family every layer but a convolution (the patch embedding ``conv_proj``)
    produces tokens ``(B, N, C)``; everywhere else the layout is ``(B, C, H, W)``.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import channel_dim
    >>> channel_dim(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "0", "generic")
    1
    """
    module = resolve_layer(model, layer)
    if family != "vit":
        return 1
    is_conv = isinstance(module, nn.Conv2d) or getattr(module, "original_name", "") == "Conv2d"
    return 1 if is_conv else -1


def _probe_input(model: nn.Module, input_size: Union[int, Sequence[int]], device: Any) -> torch.Tensor:
    if isinstance(input_size, int):
        h = w = input_size
    else:
        h, w = (int(v) for v in input_size)
    first = next(iter(model.parameters()), None)
    if device is None:
        device = first.device if first is not None else "cpu"
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(1, 3, h, w, device=device, dtype=dtype)


def list_layers(
    model: Any, input_size: Optional[Union[int, Sequence[int]]] = None, device: Any = None
) -> List[Dict[str, Any]]:
    """Every named layer whose output is a tensor, in execution order, with its output shape.

    One dry forward pass at batch 1 (zeros, ``torch.no_grad()``) with a hook on every named
    submodule; the hooks are removed afterwards, also on error. A module that runs several times
    is listed once, at its first call. Containers that are never called (``nn.ModuleList``) and
    modules without a tensor output are left out.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The network (in eval mode, as ``load_model`` returns it).
    input_size : int or (int, int), optional
        Image size of the probe; default the ``LoadedModel``'s ``input_size``, else 224.
    device : torch.device or str, optional
        Device of the probe; default the device of the model's parameters.

    Returns
    -------
    list of dict
        ``{"name": str, "type": str, "shape": tuple}`` with the shape without the batch dimension,
        e.g. ``{"name": "layer4", "type": "Sequential", "shape": (512, 7, 7)}`` for ResNet-18.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import list_layers
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU())
    >>> [(d["name"], d["shape"]) for d in list_layers(net, input_size=9)]
    [('0', (4, 4, 4)), ('1', (4, 4, 4))]
    """
    module, loaded = _unwrap(model)
    if _is_script(module):
        raise _script_error("list_layers")
    if input_size is None:
        input_size = loaded.input_size if loaded is not None else 224
    x = _probe_input(module, input_size, device)
    seen: Dict[str, Tuple[str, Tuple[int, ...]]] = {}

    def make_hook(name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if name in seen:
                return
            t = _first_tensor(output)
            if t is not None:
                seen[name] = (type(mod).__name__, tuple(t.shape[1:]))

        return hook

    handles = []
    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    # dicts keep insertion order, which is the order of the first calls.
    return [{"name": n, "type": t, "shape": s} for n, (t, s) in seen.items()]


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every tapped layer has its output."""

    def __init__(self) -> None:
        super().__init__(
            "FeatureTaps(stop_after=True) stopped the forward pass after the last tapped layer; "
            "call taps.run(x) rather than model(x) to have this caught"
        )


class FeatureTaps:
    """Context manager that records the outputs of the named layers on every forward pass.

    Hooks go only on the listed layers and are removed on exit, also when the body raises.
    ``outputs[name]`` holds the layer's output (its first tensor for a tuple output) from the
    latest forward pass; for a module called several times per pass, the last call.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The network.
    layers : sequence of str
        Layer names (see :func:`list_layers`); duplicates are dropped.
    detach : bool
        Store detached outputs (reference mining); default ``False`` keeps the graph so a loss on
        the outputs backpropagates to the input (the optimizer).
    stop_after : bool
        End the forward pass as soon as every tapped layer has produced its output, skipping the
        rest of the network. Use with :meth:`run`, which catches the internal stop signal.

    Raises
    ------
    ValueError
        For an unknown layer name (listing the closest names) or an empty ``layers``.
    TypeError
        For a TorchScript model, whose layers cannot be hooked.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import FeatureTaps
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    >>> with FeatureTaps(net, ["0"], detach=True) as taps:
    ...     _ = net(torch.zeros(2, 3, 5, 5))
    >>> taps.outputs["0"].shape
    torch.Size([2, 4, 3, 3])
    >>> FeatureTaps(net, ["1"], stop_after=True).run(torch.zeros(1, 3, 5, 5))["1"].shape
    torch.Size([1, 4, 3, 3])
    """

    def __init__(
        self, model: Any, layers: Sequence[str], detach: bool = False, stop_after: bool = False
    ) -> None:
        module, _ = _unwrap(model)
        if isinstance(layers, str):
            layers = [layers]
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise ValueError("FeatureTaps: 'layers' must name at least one layer, got an empty list")
        if _is_script(module):
            raise _script_error("FeatureTaps")
        self.model = module
        self.layers: Tuple[str, ...] = tuple(layers)
        self._modules = {name: resolve_layer(module, name) for name in self.layers}
        self.detach = bool(detach)
        self.stop_after = bool(stop_after)
        self.outputs: Dict[str, torch.Tensor] = {}
        self._no_tensor: Dict[str, str] = {}
        self._handles: List[Any] = []

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside the ``with`` block)."""
        return bool(self._handles)

    def _make_hook(self, name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                self._no_tensor[name] = type(output).__name__
                return
            self.outputs[name] = t.detach() if self.detach else t
            if self.stop_after and len(self.outputs) == len(self.layers):
                raise _StopForward()

        return hook

    def __enter__(self) -> "FeatureTaps":
        if self._handles:
            raise RuntimeError("FeatureTaps: already active; a FeatureTaps cannot be entered twice")
        try:
            for name, mod in self._modules.items():
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Remove the hooks (``__exit__`` does this); the recorded outputs stay."""
        while self._handles:
            self._handles.pop().remove()

    def clear(self) -> None:
        """Forget the recorded outputs."""
        self.outputs.clear()
        self._no_tensor.clear()

    def run(self, x: torch.Tensor, *args: Any, pad: bool = True, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Clear, run ``model(x, *args, **kwargs)`` and return the tapped outputs.

        Works inside or outside the ``with`` block (outside, the hooks live for this call only).
        With ``stop_after=True`` the forward pass ends after the last tapped layer. A one-element
        CPU batch runs padded to two (:mod:`vital_fast.models.batching`), so that its convolutions
        take the same thread-schedule-independent path as any other batch; the outputs are sliced back
        (``pad=False``: the caller decided already, as the engine does with
        :func:`~vital_fast.models.batching.needs_padding`).

        Returns
        -------
        dict of str to Tensor
            One entry per tapped layer (a new dict; the tensors are the recorded ones).

        Raises
        ------
        RuntimeError
            When a tapped layer did not run in the forward pass, or returned no tensor.
        """
        self.clear()
        temporary = not self.active
        if temporary:
            self.__enter__()
        xp = pad_batch(x) if pad else x
        try:
            self.model(xp, *args, **kwargs)
        except _StopForward:
            pass
        finally:
            if temporary:
                self.remove()
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            details = [
                f"'{n}' returned {self._no_tensor[n]} (no tensor)"
                if n in self._no_tensor
                else f"'{n}' never ran"
                for n in missing
            ]
            raise RuntimeError("FeatureTaps.run: no output for " + "; ".join(details))
        return unpad(self.outputs, x.shape[0], xp.shape[0])
