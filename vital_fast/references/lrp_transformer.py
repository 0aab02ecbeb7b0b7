"""Relevance rules for transformer blocks (ViT families): conservative propagation.

A transformer block is made of linear maps (the patch embedding, the query/key/value and output
projections, the MLP's two layers), residual sums, and three non-linear parts: the attention weights
``softmax(q k^T)``, the normalization's scale and the MLP's activation. Gradient x input through the
linear parts and sums conserves relevance (up to what biases take); through the non-linear parts it
does not, and on deep stacks it explodes. The rules here, our own formulation of the idea that
attention weights and normalization scales act as constants that route relevance (rather than
receive it), make the backward sweep linear:

- attention: the attention weights are held constant, so relevance flows through the values only
  (``F.scaled_dot_product_attention``, explicit ``softmax`` attention, ``nn.MultiheadAttention``);
- normalization (``F.layer_norm``) and elementwise activations (``F.gelu``, ``F.silu``, and activation modules
  written with tensor ops such as CLIP's QuickGELU): each is
  read as ``y = x * c(x)`` with the gate ``c = y / x`` held constant, which passes relevance through
  unchanged, element by element (the identity rule).

Each rule keeps the forward value exactly (``y.detach() + lin - lin.detach()``); only the backward
changes. Relevance at a recorded layer is then its output times the gradient of the start relevance
``R = A * mask`` at the target. With all biases (and position embeddings) zero, the sum of relevance is
the same at every layer (tests/test_model_families.py checks it); plain gradient x input is far off.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}


def _keep_value(y: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """``y``'s value with ``lin``'s gradient."""
    return y.detach() + (lin - lin.detach())


def _gate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = x * c`` with ``c = y / x`` held constant (0 where ``x`` is 0): the identity rule."""
    safe = x.detach().abs() > 1e-12
    c = torch.where(safe, y.detach() / torch.where(safe, x.detach(), torch.ones_like(x)), torch.zeros_like(x))
    return _keep_value(y, x * c)


def _sdpa_linear(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * s
    if is_causal:
        n, m = logits.shape[-2:]
        logits = logits.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: repeat the key/value heads
        rep = q.shape[-3] // k.shape[-3]
        v = v.repeat_interleave(rep, dim=-3)
    return logits.softmax(-1).detach() @ v


class _Conservative(TorchFunctionMode):
    """Swap the backward of attention, layer norm and elementwise activations for the rules above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            y = func(*args, **kwargs)
            return _keep_value(y, _sdpa_linear(*args, **kwargs))
        if func in _SOFTMAX:  # explicit attention: the weights are constants
            return func(*args, **kwargs).detach()
        if func in (F.layer_norm, F.gelu, F.silu, torch.layer_norm):
            y = func(*args, **kwargs)
            x = args[0] if args else kwargs["input"]
            return _gate(x, y) if isinstance(y, torch.Tensor) and y.shape == x.shape else y
        return func(*args, **kwargs)


def _mha_hook(module: nn.MultiheadAttention, args, output):
    """``nn.MultiheadAttention`` self-attention (batch first, packed projections) with constant weights."""
    if len(args) < 3 or not (args[0] is args[1] is args[2]) or not module.batch_first \
            or module.in_proj_weight is None or not isinstance(output, tuple):
        return None
    x = args[0]
    b, n, e = x.shape
    h = module.num_heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2) for t in (q, k, v))
    o = _sdpa_linear(q, k, v).transpose(1, 2).reshape(b, n, e)
    lin = F.linear(o, module.out_proj.weight, module.out_proj.bias)
    return (_keep_value(output[0], lin),) + tuple(output[1:])


# Activation modules written with tensor ops rather than F.gelu / F.silu (CLIP's QuickGELU, x * sigmoid(1.702 x);
# the tanh GELU of transformers' NewGELUActivation; Swish, Mish): their output gated as a whole.
_ACTIVATION = re.compile(r"gelu|silu|swish|mish", re.IGNORECASE)


def _activation_hook(module: nn.Module, args, output):
    x = args[0] if args else None
    if isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and output.shape == x.shape:
        return _gate(x, output)
    return None


def _is_activation(m: nn.Module) -> bool:
    return (bool(_ACTIVATION.search(type(m).__name__)) and not any(True for _ in m.children())
            and not any(True for _ in m.parameters(recurse=False)))


@contextlib.contextmanager
def conservative(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the conservative backward rules (forward values unchanged); hooks removed on exit."""
    handles: List = [m.register_forward_hook(_mha_hook) for m in model.modules()
                     if isinstance(m, nn.MultiheadAttention)]
    handles += [m.register_forward_hook(_activation_hook) for m in model.modules() if _is_activation(m)]
    try:
        with _Conservative():
            yield
    finally:
        for h in handles:
            h.remove()
