"""The references themselves: closed forms, NumPy oracles, float64 gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vital_fast
from vital_fast import oracle as R


def test_w2_matches_numpy_quantile_matching():
    rng = np.random.default_rng(1)
    B, C, D, Q = 3, 4, 17, 9
    x = rng.normal(size=(B, C, D))
    q = np.sort(rng.normal(size=(B, C, Q)), axis=-1)
    target = np.stack([[np.interp((np.arange(D) + 0.5) / D, (np.arange(Q) + 0.5) / Q, q[b, c])
                        for c in range(C)] for b in range(B)])
    expected = ((np.sort(x, axis=-1) - target) ** 2).mean(-1).mean(-1)
    got = vital_fast.sort_match_loss(torch.from_numpy(x), torch.from_numpy(q), reduction="none",
                                     backend="reference")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_w2_matches_scipy_when_same_size():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(loc=1.0, size=50)
    # For equal-size 1-D samples, W2^2 = mean((sort a - sort b)^2); W1 from scipy bounds it.
    w2sq = float(vital_fast.sort_match_loss(torch.from_numpy(a).view(1, 1, 50),
                                            torch.from_numpy(np.sort(b)).view(1, 50), backend="reference"))
    w1 = stats.wasserstein_distance(a, b)
    assert w1 ** 2 <= w2sq + 1e-12
    np.testing.assert_allclose(w2sq, np.mean((np.sort(a) - np.sort(b)) ** 2), rtol=1e-12)


def test_gradient_is_the_matched_difference():
    x = torch.tensor([[[0.3, -1.0, 2.0, 0.5]]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[-2.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    vital_fast.sort_match_loss(x, r, backend="reference").backward()
    # ranks of x: -1.0 ->0, 0.3 ->1, 0.5 ->2, 2.0 ->3; t = r[rank]
    t = torch.tensor([0.0, -2.0, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(x.grad[0, 0], 2 / 4 * (x.detach()[0, 0] - t))


def test_resample_is_identity_sorted_and_holds_ends():
    ref = torch.sort(torch.randn(3, 10), dim=-1).values
    assert torch.equal(R.resample_quantiles(ref, 10), ref)
    up = R.resample_quantiles(ref, 37)
    assert (up[:, 1:] >= up[:, :-1]).all()
    assert torch.allclose(up[:, 0], ref[:, 0]) and torch.allclose(up[:, -1], ref[:, -1])
    np.testing.assert_allclose(
        R.resample_quantiles(ref.double(), 4).numpy(),
        np.stack([np.interp((np.arange(4) + 0.5) / 4, (np.arange(10) + 0.5) / 10, r) for r in ref.double().numpy()]),
        rtol=1e-12,
    )


def test_prototype_is_the_barycenter():
    feats = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(vital_fast.sorted_prototype(feats), torch.sort(feats.view(3, 16), -1).values)
    k = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    proto = vital_fast.sorted_prototype(k)
    torch.testing.assert_close(proto, torch.sort(k.view(5, 2, 9), -1).values.mean(0))
    # The barycenter minimizes the mean W2^2 to the K rows: perturbing it only increases that.
    def mean_cost(p):
        return sum(float(vital_fast.sort_match_loss(k[i:i + 1], p, backend="reference")) for i in range(5))
    assert mean_cost(proto) < mean_cost(proto + 0.01 * torch.sort(torch.randn(2, 9, dtype=torch.float64)).values)
    assert vital_fast.sorted_prototype(k, q=4).shape == (2, 4)


def test_paper_style_baseline_agrees():
    x = torch.randn(2, 3, 6, 6)
    refs = torch.randn(10, 3, 6, 6)
    proto = vital_fast.sorted_prototype(refs)
    ours = vital_fast.sort_match_loss(x, proto, backend="reference")
    theirs = R.paper_style_sort_match_loss(x, refs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gradcheck_sort_match_reference():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ref = torch.sort(torch.randn(2, 3, 5, dtype=torch.float64), -1).values
    w = torch.rand(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: R.sort_match_reference(t, ref, w, reduction="none"), (x,), eps=1e-6, atol=1e-6
    )
