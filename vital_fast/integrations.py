"""The sort-matching loss inside other feature-visualization tools: small adapters, one per client.

The loss itself needs no adapter (``vital_fast.sort_match_loss(features, prototype)`` is a differentiable
PyTorch operator that works under ``torch.compile``, ``torch.func`` and ``torch.export``); what a client
needs is the prototype of the layer it reads and the sign and call convention of its objectives:

* :func:`layer_prototype`: the sorted prototype of a layer's features over reference images (any model);
* :func:`lucent_objective`: a Lucent (``torch-lucent``) objective for ``render_vis``, minimized as Lucent
  minimizes its objectives; Lucent names layers with ``_`` for ``.`` (``layer3_0``), which it accepts too;
* :func:`horama_objective`: a Horama objective (``horama.fourier``/``horama.maco``), a score that Horama
  maximizes: the negative loss.

The clients are optional: each adapter imports its client when called and says how to install it.
``examples/`` holds a short script per client (tests/test_clients.py runs them).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from vital_fast.ops import sort_match_loss, sorted_prototype

__all__ = ["horama_objective", "layer_prototype", "lucent_objective"]


def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    names = dict(model.named_modules())
    if layer in names:
        return names[layer]
    dotted = {n.replace(".", "_"): m for n, m in names.items()}
    if layer in dotted:
        return dotted[layer]
    close = sorted(n for n in names if n and layer.replace("_", ".").split(".")[-1] in n)[:5]
    raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}"
                     + (f"; close: {', '.join(close)}" if close else ""))


def layer_features(model: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a module name, dotted or with Lucent's ``_``) for ``images``, differentiable."""
    out = {}
    handle = _module(model, layer).register_forward_hook(lambda m, i, o: out.__setitem__("f", o))
    try:
        model(images)
    finally:
        handle.remove()
    return out["f"]


def layer_prototype(model: torch.nn.Module, layer: str, images: torch.Tensor, q: Optional[int] = None,
                    *, channel_dim: int = 1) -> torch.Tensor:
    """The sorted prototype ``(C, q)`` of ``layer``'s features over reference ``images`` (already in the model's
    input space: normalized as the model expects), the ``reference`` of :func:`~vital_fast.sort_match_loss`.

    Example
    -------
    >>> import torch, vital_fast
    >>> from vital_fast.integrations import layer_prototype
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> layer_prototype(net, "0", torch.rand(2, 3, 16, 16), q=32).shape
    torch.Size([4, 32])
    """
    with torch.no_grad():
        return sorted_prototype(layer_features(model, layer, images), q, channel_dim=channel_dim)


def lucent_objective(layer: str, reference: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     *, channel_dim: int = 1):
    """A Lucent objective: the sort-matching loss of ``layer``'s features (Lucent's name: ``.`` written ``_``)
    against ``reference``, for ``lucent.optvis.render.render_vis(model, objective, ...)``. Objectives compose
    as Lucent's do (``lucent_objective(...) - 0.1 * objectives.channel(...)``).

    Raises
    ------
    ImportError
        Lucent is not installed (``pip install torch-lucent``).
    """
    try:
        from lucent.optvis.objectives import Objective
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lucent_objective needs Lucent: pip install torch-lucent (or vital_fast[clients])") from exc
    name = layer.replace(".", "_")

    def loss(hook):
        return sort_match_loss(hook(name), reference.to(hook(name).device), weight, channel_dim=channel_dim)

    return Objective(loss, name=f"vital_fast.sort_match({name})")


def horama_objective(model: torch.nn.Module, layer: str, reference: torch.Tensor,
                     weight: Optional[torch.Tensor] = None, *, channel_dim: int = 1
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Horama objective: ``images -> score`` for ``horama.fourier(objective, ...)``, the negative
    sort-matching loss of ``layer``'s features against ``reference`` (Horama maximizes its score)."""

    def score(images: torch.Tensor) -> torch.Tensor:
        f = layer_features(model, layer, images)
        return -sort_match_loss(f, reference.to(f.device), weight, channel_dim=channel_dim)

    return score
