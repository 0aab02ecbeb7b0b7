"""One optimizer update for every slot of a batch, in a constant number of ops whatever the batch size.

Each slot keeps its own Adam (or NAdam) state, step count and learning rate (slots enter stages and are
refilled at different times), but the update runs as ``torch._foreach_*`` ops over the lists of every
slot's tensors: one dispatched op each (one multi-tensor kernel launch on a GPU) instead of one
optimizer per slot. Per-slot scalars (learning rate, bias corrections) are Python lists, computed on the
host from the host's step counts, so nothing is read from the device.

The arithmetic is the one of ``torch.optim.Adam`` / ``torch.optim.NAdam`` (single-tensor form, the one
they run on CPU tensors), op for op, so a slot's parameters are bit-identical to what those optimizers
give on the CPU (tests/test_update.py); on a GPU the multi-tensor kernels round like ``foreach=True``.

With ``ok`` (a 0-dim float tensor on the device, 1 for a good step and 0 for a step whose gradients
overflowed: float16 loss scaling) a step with ``ok == 0`` leaves parameters and moments exactly as they
were, without a host read; the host's step count still advances (the bias corrections of later steps
then count that step: a small difference only under float16 scaling).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["OPTIMIZERS", "SlotMoments", "multi_step"]

OPTIMIZERS = ("adam", "nadam")
NADAM_MOMENTUM_DECAY = 4e-3  # torch.optim.NAdam's default


class SlotMoments:
    """One slot's optimizer state: first and second moments, the step count and NAdam's running product
    of momentum factors (a float32 number, as torch.optim.NAdam keeps it)."""

    __slots__ = ("exp_avg", "exp_avg_sq", "step", "mu_product")

    def __init__(self, p: torch.Tensor) -> None:
        self.exp_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.step = 0
        self.mu_product = torch.ones((), dtype=torch.float32)  # on the host, like torch.optim.NAdam's


def multi_step(name: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               states: Sequence[SlotMoments], lrs: Sequence[float], betas: Tuple[float, float], eps: float,
               ok: Optional[torch.Tensor] = None) -> None:
    """Update ``params`` in place from ``grads``: one Adam or NAdam step of each slot with its own
    ``lrs[i]`` and state. ``ok``: see the module docstring (the gradients must then be finite)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if not params:
        return
    params, grads = list(params), list(grads)
    beta1, beta2 = float(betas[0]), float(betas[1])
    exp_avgs = [s.exp_avg for s in states]
    exp_avg_sqs = [s.exp_avg_sq for s in states]
    for s in states:
        s.step += 1
    if ok is None:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
    else:  # a skipped step: weights 0 and factors 1 exactly, gradients already zeroed
        torch._foreach_mul_(exp_avgs, 1 - (1 - beta1) * ok)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, 1 - (1 - beta2) * ok)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if name == "adam":
        _adam(params, exp_avgs, exp_avg_sqs, states, lrs, beta1, beta2, eps, ok)
    else:
        _nadam(params, grads, exp_avgs, exp_avg_sqs, states, lrs, beta1, beta2, eps, ok)


def _adam(params, exp_avgs, exp_avg_sqs, states, lrs, beta1, beta2, eps, ok) -> None:
    steps = [float(s.step) for s in states]
    step_sizes = [-(lr / (1 - beta1 ** st)) for lr, st in zip(lrs, steps)]
    bc2_sqrt = [(1 - beta2 ** st) ** 0.5 for st in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    num = exp_avgs if ok is None else torch._foreach_mul(exp_avgs, ok)
    torch._foreach_addcdiv_(params, num, denom, step_sizes)


def _nadam(params, grads, exp_avgs, exp_avg_sqs, states, lrs, beta1, beta2, eps, ok) -> None:
    d = NADAM_MOMENTUM_DECAY
    bc2, grad_scale, avg_scale = [], [], []
    for s, lr in zip(states, lrs):
        st = float(s.step)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (st * d)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((st + 1) * d)))
        s.mu_product *= mu  # float32 on the host, as torch.optim.NAdam rounds it
        mu_product_next = s.mu_product.item() * mu_next
        bc2.append(1 - beta2 ** st)
        grad_scale.append(-lr * (1.0 - mu) / (1.0 - s.mu_product.item()))
        avg_scale.append(float((-lr * mu_next) / (1.0 - mu_product_next)))
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    g = grads if ok is None else torch._foreach_mul(grads, ok)
    num = exp_avgs if ok is None else torch._foreach_mul(exp_avgs, ok)
    torch._foreach_addcdiv_(params, g, denom, grad_scale)
    torch._foreach_addcdiv_(params, num, denom, avg_scale)

