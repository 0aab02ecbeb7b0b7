"""Token layers' patch tokens as a layer of their own: ``LAYER.patches``.

A ViT's token layer ``(B, N, C)`` holds its prefix tokens (the CLS token, DeiT's distillation token, DINOv2's
register tokens) before the patch tokens. :func:`patches_layer` makes the patch tokens alone a layer, the
child ``patches`` of the token layer (an ``nn.Identity`` fed ``out[:, P:]`` by a forward hook on the layer: no
weights, the layer's own output unchanged), so that a unit of ``LAYER.patches`` (a channel, a direction: the
concept probe's ``--tokens patches``) is read over the patch tokens only: its mean leaves the prefix out.
:func:`prefix_tokens` counts the prefix of a model.
"""

from __future__ import annotations

from torch import nn

from vital_fast.models import taps

__all__ = ["PATCHES", "patches_layer", "prefix_tokens"]

PATCHES = "patches"
_ONE = ("cls_token", "class_token", "class_embedding", "dist_token", "distillation_token")
_MANY = ("register_tokens", "reg_token")


def prefix_tokens(model) -> int:
    """The number of tokens before the patch tokens: timm's ``num_prefix_tokens``, else one per CLS/distillation
    token parameter plus the register tokens (``(1, R, C)`` parameters) the model holds."""
    module, _ = taps._unwrap(model)
    n = getattr(module, "num_prefix_tokens", None)
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n
    count = 0
    for name, p in module.named_parameters():
        base = name.rsplit(".", 1)[-1]
        if base in _ONE:
            count += 1
        elif base in _MANY:
            count += int(p.shape[-2]) if p.dim() >= 2 else 1
    return count


def patches_layer(model, layer: str) -> str:
    """``LAYER.patches``, made on first use: the patch tokens ``(B, N - P, C)`` of token layer ``layer``.
    ``ValueError`` for an unknown layer (closest names)."""
    module, _ = taps._unwrap(model)
    target = taps.resolve_layer(module, layer)
    if PATCHES not in target._modules:
        target.__dict__[_PREFIX] = prefix_tokens(module)
        target.add_module(PATCHES, nn.Identity())
        target.register_forward_hook(_patches_hook)  # module-level: the model still pickles
    return f"{layer}.{PATCHES}"


_PREFIX = "_vital_fast_prefix_tokens"


def _patches_hook(m: nn.Module, args, out):
    if hasattr(out, "dim") and out.dim() == 3:
        m._modules[PATCHES](out[:, m.__dict__[_PREFIX]:])
    return out
