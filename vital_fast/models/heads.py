"""Attention heads as layers: the output of one head before the output projection, in token layout.

A transformer block's attention concatenates its heads' outputs ``(B, N, H·d)`` and projects them with a linear
map (timm's ``attn.proj``, ``transformers``' ``o_proj`` / ``out_proj``). :func:`head_layer` finds that projection in
a block and makes its input a layer of its own, ``<attention>.heads`` (an ``nn.Identity`` the input passes
through, by a pre-hook on the projection: no weights, values unchanged), so that head ``h`` is the channels
``h·d .. (h+1)·d`` of that layer: ``head:LAYER:H`` targets (:func:`vital_fast.optim.targets.head_target`).
``nn.MultiheadAttention`` (torchvision's ViT, OpenCLIP) projects inside one fused call: its heads cannot be tapped.
"""

from __future__ import annotations

from typing import Tuple

from torch import nn

from vital_fast.models import taps

__all__ = ["HEADS", "head_layer"]

HEADS = "heads"
_PROJ = ("o_proj", "out_proj", "proj")


def _heads_of(attn: nn.Module, model: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads", "n_heads"):
        v = getattr(attn, name, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", None) or cfg
    v = getattr(cfg, "num_attention_heads", None)
    if isinstance(v, int) and v > 0:
        return v
    raise ValueError(f"cannot tell the number of heads of {type(attn).__name__}")


def head_layer(model, block: str) -> Tuple[str, int, int]:
    """``(layer, heads, head_dim)``: the layer holding the concatenated head outputs of ``block``'s attention
    (made on first use), its number of heads and each head's width. ``ValueError`` (one line) for an unknown
    block (closest names) or one without a tappable attention projection."""
    module, _ = taps._unwrap(model)
    taps.resolve_layer(module, block)
    mods = dict(module.named_modules())
    found = [n for n in mods if n.startswith(block + ".") and isinstance(mods[n], nn.Linear)
             and n.rsplit(".", 1)[-1] in _PROJ and any(k in n[len(block) + 1:] for k in ("attn", "attention"))
             and not isinstance(mods[n.rsplit(".", 1)[0]], nn.MultiheadAttention)]  # it never calls out_proj
    if not found:
        mha = any(isinstance(mods[n], nn.MultiheadAttention) for n in mods if n.startswith(block + "."))
        why = ("its attention is an nn.MultiheadAttention, which projects its heads inside one fused call"
               if mha else "no attention output projection (attn.proj, o_proj, out_proj) in it")
        raise ValueError(f"head targets: {block!r} has no tappable attention heads: {why}")
    proj_name = min(found, key=len)
    parent = proj_name.rsplit(".", 1)[0]
    attn, proj = mods[parent], mods[proj_name]
    heads = _heads_of(attn, module)
    if proj.in_features % heads:
        raise ValueError(f"head targets: {proj_name} takes {proj.in_features} features, not a multiple of {heads} heads")
    if HEADS not in attn._modules:
        tap = nn.Identity()
        attn.add_module(HEADS, tap)
        proj.__dict__[_TAP] = tap  # not a submodule of the projection: the layer is <attention>.heads
        proj.register_forward_pre_hook(_heads_hook)  # module-level: the model still pickles
    return f"{parent}.{HEADS}", heads, proj.in_features // heads


_TAP = "_vital_fast_heads_tap"


def _heads_hook(proj: nn.Module, args):
    return (proj.__dict__[_TAP](args[0]),) + tuple(args[1:])
