"""Each compiled backend of sort_match_loss against the float64 pure-torch reference."""

from __future__ import annotations

import pytest
import torch

import vital_fast
from conftest import BACKENDS, LOSS_RTOL, GRAD_ATOL, DTYPES, TOL, device_for
from _util import assert_matches_reference, max_err, reference_f64, run_op, sorted_ref

# (B, C, H, W): size 1, a prime, a non-power-of-two, and a small "many neurons x H.W" case.
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (3, 5, 10, 10), (1, 2, 1, 13), (4, 16, 14, 14)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_element", [False, True], ids=["shared_ref", "per_element_ref"])
def test_matches_reference(backend, shape, per_element):
    dev = device_for(backend)
    B, C, H, W = shape
    x = torch.randn(shape, device=dev)
    ref = sorted_ref(C, H * W, B if per_element else None, device=dev)
    assert_matches_reference("sort_match", backend, x, ref, loss_rtol=LOSS_RTOL, grad_atol=GRAD_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q", [1, 5, 64], ids=lambda q: f"Q{q}")
def test_resampled_reference_and_weights(backend, q):
    dev = device_for(backend)
    x = torch.randn(2, 4, 5, 6, device=dev)
    ref = sorted_ref(4, q, device=dev)
    w = torch.rand(2, 4, device=dev)
    assert_matches_reference("sort_match", backend, x, ref, weight=w)
    assert_matches_reference("sort_match", backend, x, ref, weight=w[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind", ["ties", "constant", "sorted", "reversed", "signed_zeros", "large_values"]
)
def test_edge_rows(backend, kind):
    dev = device_for(backend)
    B, C, D = 2, 3, 37
    if kind == "ties":
        x = torch.randint(-2, 3, (B, C, D)).float()
    elif kind == "constant":
        x = torch.full((B, C, D), 1.25)
    elif kind == "sorted":
        x = torch.sort(torch.randn(B, C, D), dim=-1).values
    elif kind == "reversed":
        x = torch.sort(torch.randn(B, C, D), dim=-1, descending=True).values
    elif kind == "signed_zeros":
        x = torch.zeros(B, C, D)
        x[..., ::2] = -0.0
        x[..., 5] = 1.0
        x[..., 7] = -1.0
    else:
        x = torch.randn(B, C, D) * 1e4
    ref = sorted_ref(C, D)
    assert_matches_reference("sort_match", backend, x.to(dev), ref.to(dev), loss_rtol=LOSS_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_give_the_same_loss_whatever_the_order(backend):
    dev = device_for(backend)
    base = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0, 3.0])
    perm = torch.tensor([4, 0, 2, 5, 1, 3])
    ref = sorted_ref(1, 6, device=dev)
    l1 = vital_fast.sort_match_loss(base.view(1, 1, 6).to(dev), ref, backend=backend)
    l2 = vital_fast.sort_match_loss(base[perm].view(1, 1, 6).to(dev), ref, backend=backend)
    assert torch.equal(l1, l2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_tokens_and_noncontiguous(backend):
    dev = device_for(backend)
    C = 6
    ref = sorted_ref(C, 20, device=dev)
    x = torch.randn(2, C, 5, 7, device=dev)
    assert_matches_reference("sort_match", backend, x.to(memory_format=torch.channels_last), ref)
    tokens = torch.randn(3, 11, C, device=dev)
    assert_matches_reference("sort_match", backend, tokens, ref, channel_dim=-1)
    wide = torch.randn(2, 2 * C, 5, 14, device=dev)
    sliced = wide[:, ::2, :, ::2]
    assert not sliced.is_contiguous()
    assert_matches_reference("sort_match", backend, sliced, ref)
    # Same numbers, different layout: the losses agree.
    l_cl = vital_fast.sort_match_loss(x.to(memory_format=torch.channels_last), ref, backend=backend)
    l_c = vital_fast.sort_match_loss(x.contiguous(), ref, backend=backend)
    torch.testing.assert_close(l_cl, l_c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_error_is_earned(backend, dtype):
    """err(kernel vs f64 ref) <= 2 * err(ref in the same dtype vs f64 ref) + floor."""
    dev = device_for(backend)
    # Tie-free inputs: with ties the gradient routing is legitimately ambiguous in low precision.
    D = 60
    x = (torch.randperm(2 * 3 * D).float().view(2, 3, D) / 7.0 - 12.0).to(dtype).to(dev)
    ref = sorted_ref(3, 50, device=dev)
    up = torch.randn(2, dtype=torch.float64)
    l64, g64, _ = reference_f64("sort_match", x, ref, upstream=up)
    l_r, g_r, _ = run_op("sort_match", "reference", x, ref, upstream=up.to(dev))
    l_k, g_k, _ = run_op("sort_match", backend, x, ref, upstream=up.to(dev))
    atol, _ = TOL[dtype]
    el_r, el_k = max_err(l_r.cpu(), l64), max_err(l_k.cpu(), l64)
    eg_r, eg_k = max_err(g_r.cpu(), g64), max_err(g_k.cpu(), g64)
    assert el_k <= 2 * el_r + atol, f"loss: kernel err {el_k:.3e}, reference err {el_r:.3e}"
    assert eg_k <= 2 * eg_r + atol, f"grad: kernel err {eg_k:.3e}, reference err {eg_r:.3e}"
    assert g_k.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    dev = device_for(backend)
    x = torch.randint(-3, 4, (3, 8, 9, 9)).float().to(dev) + torch.randn(3, 8, 9, 9, device=dev) * 0.01
    ref = sorted_ref(8, 81, B=3, device=dev)
    l1, g1, up = run_op("sort_match", backend, x, ref)
    l2, g2, _ = run_op("sort_match", backend, x, ref, upstream=up)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    dev = device_for(backend)
    x = torch.randn(3, 4, 6, 6, device=dev)
    ref = sorted_ref(4, 36, device=dev)
    per = vital_fast.sort_match_loss(x, ref, reduction="none", backend=backend)
    mean = vital_fast.sort_match_loss(x, ref, reduction="mean", backend=backend)
    total = vital_fast.sort_match_loss(x, ref, reduction="sum", backend=backend)
    assert per.shape == (3,) and mean.shape == () and total.shape == ()
    torch.testing.assert_close(per.mean(), mean)
    torch.testing.assert_close(per.sum(), total)
    # Each element's loss depends only on that element: a sweep can read one target's loss.
    alone = vital_fast.sort_match_loss(x[1:2], ref, reduction="none", backend=backend)
    torch.testing.assert_close(alone[0], per[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_held_between_forward_and_backward(backend):
    """At most one tensor of the input's size is saved for backward (float32 input)."""
    dev = device_for(backend)
    x = torch.randn(2, 8, 12, 12, device=dev, requires_grad=True)
    ref = sorted_ref(8, 144, device=dev)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vital_fast.sort_match_loss(x, ref, backend=backend)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    extra = sum(t.numel() * t.element_size() for t in big)
    assert extra <= x.numel() * x.element_size(), [tuple(t.shape) for t in big]
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_arity_and_no_reference_grad(backend):
    dev = device_for(backend)
    x = torch.randn(1, 2, 3, 3, device=dev, requires_grad=True)
    ref = sorted_ref(2, 9, device=dev).requires_grad_(True)
    vital_fast.sort_match_loss(x, ref, backend=backend).backward()
    assert x.grad is not None and ref.grad is None
    # One gradient slot per forward input (x, ref, backend).
    from vital_fast.ops._common import prepare

    xr, _, r = prepare("t", x, ref.detach(), None, 1, "mean", True)
    out = vital_fast.SortMatchLossFunction.apply(xr, r, backend)
    grads = out.grad_fn.apply(torch.ones_like(out))
    assert len(grads) == 3


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=BACKENDS[0].marks)])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    ref = sorted_ref(3, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    f = lambda t: vital_fast.sort_match_loss(t, ref, w, reduction="none", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=BACKENDS[0].marks)])
def test_realistic_shape(backend):
    """A layer-sized case: 16 targets x 64 channels x 28 x 28."""
    x = torch.randn(16, 64, 28, 28)
    ref = sorted_ref(64, 256, B=16)
    assert_matches_reference("sort_match", backend, x, ref, loss_rtol=LOSS_RTOL, grad_atol=GRAD_ATOL)


@pytest.mark.parametrize("backend", [BACKENDS[1]])
@pytest.mark.parametrize("op", ["sort_match", "lrp_weight"])
def test_triton_large_row_path(backend, op, monkeypatch):
    """Rows wider than one block go through torch.sort plus the fused epilogue."""
    from vital_fast.kernels.triton import _heuristics

    monkeypatch.setattr(_heuristics, "MAX_FUSED_D", 32)
    dev = device_for(backend)
    x = torch.randn(2, 3, 9, 11, device=dev)
    rel = torch.rand_like(x) if op == "lrp_weight" else None
    assert_matches_reference(op, backend, x, sorted_ref(3, 40, B=2, device=dev), rel=rel)
    assert_matches_reference(op, backend, x.half(), sorted_ref(3, 99, device=dev), rel=rel,
                             loss_rtol=1e-5, grad_atol=1e-3)
