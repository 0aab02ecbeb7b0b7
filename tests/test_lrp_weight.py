"""The fused LRP-weighting op: each backend against the reference, and the reference against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vital_fast
from conftest import BACKENDS, GRAD_ATOL, LOSS_RTOL, device_for
from _util import assert_matches_reference, sorted_ref

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (3, 5, 10, 10), (4, 16, 14, 14)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_element", [False, True], ids=["shared_ref", "per_element_ref"])
def test_matches_reference(backend, shape, per_element):
    dev = device_for(backend)
    B, C, H, W = shape
    x = torch.randn(shape, device=dev)
    rel = torch.randn(shape, device=dev)
    ref = sorted_ref(C, H * W, B if per_element else None, device=dev)
    w = torch.rand(C, device=dev)
    assert_matches_reference(
        "lrp_weight", backend, x, ref, weight=w, rel=rel, loss_rtol=LOSS_RTOL, grad_atol=GRAD_ATOL
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_constant_relevance_and_half(backend):
    dev = device_for(backend)
    C = 4
    ref = sorted_ref(C, 30, device=dev)
    x = torch.randn(2, C, 5, 6, device=dev)
    rel = torch.rand(2, C, 5, 6, device=dev)
    assert_matches_reference(
        "lrp_weight", backend, x.to(memory_format=torch.channels_last), ref,
        rel=rel.to(memory_format=torch.channels_last),
    )
    # Constant relevance normalizes to zero: the weighted rows are all zero.
    assert_matches_reference("lrp_weight", backend, x, ref, rel=torch.ones_like(rel))
    tokens = torch.randn(2, 30, C, device=dev)
    assert_matches_reference("lrp_weight", backend, tokens, ref, rel=torch.rand_like(tokens), channel_dim=-1)
    l16 = vital_fast.lrp_weight(x.half(), rel.half(), ref, backend=backend)
    l32 = vital_fast.lrp_weight(x.half().float(), rel.half().float(), ref, backend=backend)
    torch.testing.assert_close(l16, l32, rtol=1e-5, atol=1e-6)


def test_reference_against_numpy():
    rng = np.random.default_rng(0)
    B, C, D, Q = 2, 3, 12, 5
    a = rng.normal(size=(B, C, D))
    r = rng.normal(size=(B, C, D))
    q = np.sort(rng.normal(size=(C, Q)), axis=-1)
    w = rng.random(C)
    expected = np.zeros(B)
    for b in range(B):
        for c in range(C):
            rhat = (r[b, c] - r[b, c].min()) / (r[b, c].max() - r[b, c].min() + 1e-6)
            y = np.sort(a[b, c] * rhat)
            target = np.interp((np.arange(D) + 0.5) / D, (np.arange(Q) + 0.5) / Q, q[c])
            expected[b] += w[c] * np.mean((y - target) ** 2) / C
    got = vital_fast.lrp_weight(
        torch.from_numpy(a), torch.from_numpy(r), torch.from_numpy(q), torch.from_numpy(w),
        reduction="none", backend="reference",
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_relevance_gets_no_gradient():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    rel = torch.rand(1, 2, 4, 4, requires_grad=True)
    vital_fast.lrp_weight(x, rel, sorted_ref(2, 16), backend="reference").backward()
    assert x.grad is not None and rel.grad is None


def test_channel_importance_closed_form():
    rel = torch.zeros(2, 3, 2, 2)
    rel[0, :, 0, 0] = torch.tensor([1.0, 3.0, 2.0])
    rel[1, :, 1, 1] = torch.tensor([4.0, 0.0, 2.0])
    w = vital_fast.channel_importance(rel)
    expected = torch.tensor([(0.0 + 1.0) / 2, (1.0 + 0.0) / 2, (0.5 + 0.5) / 2])
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)


def test_gradcheck_reference_float64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    rel = torch.rand(2, 3, 5, dtype=torch.float64)
    ref = sorted_ref(3, 7, dtype=torch.float64)
    f = lambda t: vital_fast.lrp_weight(t, rel, ref, reduction="none", backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=BACKENDS[0].marks)])
def test_gradcheck_cpp_float64(backend):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    rel = torch.rand(2, 3, 5, dtype=torch.float64)
    ref = sorted_ref(3, 7, dtype=torch.float64)
    f = lambda t: vital_fast.lrp_weight(t, rel, ref, reduction="none", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)
