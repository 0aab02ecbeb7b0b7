"""Shared test helpers: run an op and its float64 reference, return losses and gradients; a tiny network."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import vital_fast
from vital_fast import oracle as R


class TinyNet(nn.Module):
    """Two convolutions and a linear head: the engine's tests' network (family ``generic``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


def tiny_loaded():
    """:class:`TinyNet` (seed 0, eval mode) loaded at 32 px."""
    from vital_fast.models import load_model

    torch.manual_seed(0)
    return load_model(TinyNet().eval(), input_size=32, resize_size=32)


def tiny_refs() -> torch.Tensor:
    """Three random 36 px reference images (seed 1)."""
    return torch.rand(3, 3, 36, 36, generator=torch.Generator().manual_seed(1))


def run_op(op, backend, x, ref, weight=None, rel=None, channel_dim=1, upstream=None):
    """Per-element losses (reduction="none") and the gradient of <upstream, losses> w.r.t. x."""
    x = x.detach().clone().requires_grad_(True)
    if op == "sort_match":
        loss = vital_fast.sort_match_loss(
            x, ref, weight, channel_dim=channel_dim, reduction="none", backend=backend
        )
    else:
        loss = vital_fast.lrp_weight(
            x, rel, ref, weight, channel_dim=channel_dim, reduction="none", backend=backend
        )
    if upstream is None:
        upstream = torch.randn(loss.shape, dtype=loss.dtype, device=loss.device)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad.detach(), upstream


def reference_f64(op, x, ref, weight=None, rel=None, channel_dim=1, upstream=None):
    """The same through the pure-torch reference in float64 (the oracle)."""
    rel64 = None if rel is None else rel.double()
    w64 = None if weight is None else weight.double()
    return run_op(op, "reference", x.double(), ref.double(), w64, rel64, channel_dim, upstream)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_matches_reference(op, backend, x, ref, weight=None, rel=None, channel_dim=1,
                             loss_rtol=1e-5, grad_atol=1e-4, scale: float = 3.7) -> None:
    """Kernel vs float64 reference: losses (relative) and gradients with a random upstream gradient."""
    upstream = torch.randn(x.shape[0], dtype=torch.float64) * scale
    l_ref, g_ref, _ = reference_f64(op, x, ref, weight, rel, channel_dim, upstream)
    l_k, g_k, _ = run_op(op, backend, x, ref, weight, rel, channel_dim, upstream.to(x.device))
    assert g_k.shape == x.shape and g_k.dtype == x.dtype
    rel_err = float(((l_k.double().cpu() - l_ref) / l_ref.abs().clamp_min(1e-30)).abs().max())
    assert rel_err <= loss_rtol or max_err(l_k.cpu(), l_ref) <= 1e-7, (
        f"loss rel err {rel_err:.3e}: {l_k} vs {l_ref}"
    )
    ge = max_err(g_k.cpu(), g_ref)
    # 1e-4 absolute for gradients of order 1; relative to the largest gradient beyond that
    # (at |grad| ~ 2000 half an ulp of float32 is already 6e-5).
    scale = max(1.0, float(g_ref.abs().max()))
    assert ge <= grad_atol * scale, f"grad max abs err {ge:.3e} (largest |grad| {scale:.3g})"


def sorted_ref(C: int, Q: int, B: Optional[int] = None, dtype=torch.float32, device="cpu"):
    shape = (C, Q) if B is None else (B, C, Q)
    return torch.sort(torch.randn(shape, dtype=dtype, device=device) * 1.5 + 0.3, dim=-1).values
