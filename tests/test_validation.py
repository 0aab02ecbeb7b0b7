"""Bad input raises the right exception with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

import vital_fast

X = torch.randn(2, 3, 4, 4)
REF = torch.sort(torch.randn(3, 16), -1).values


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (dict(features=torch.randn(2, 4, 4, 4)), ValueError, "'reference' must have shape"),
        (dict(reference=torch.sort(torch.randn(3, 3, 16), -1).values), ValueError, "(B, C, Q) = (2, 3, Q)"),
        (dict(reference=torch.randn(3, 16)), ValueError, "must be sorted ascending"),
        (dict(reference=REF[0]), ValueError, "'reference' must be 2-D or 3-D"),
        (dict(features=torch.randn(2, 3)), ValueError, "at least 3 dimensions"),
        (dict(weight=torch.ones(4)), ValueError, "'weight' must have shape (C,) = (3,)"),
        (dict(weight=torch.ones(3, 3)), ValueError, "(B, C) = (2, 3)"),
        (dict(features=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "'features' must have dtype"),
        (dict(reference=REF.long()), TypeError, "'reference' must have dtype"),
        (dict(features=X.numpy()), TypeError, "'features' must be a torch.Tensor"),
        (dict(features=torch.randn(2, 3, 0, 4)), ValueError, "D = 0"),
        (dict(channel_dim=0), ValueError, "batch dimension"),
        (dict(channel_dim=7), ValueError, "'channel_dim' must be an int"),
        (dict(reduction="avg"), ValueError, "'reduction' must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(reference=REF.to("meta")), ValueError, "same device as 'features'"),
    ],
)
def test_bad_input(kwargs, exc, fragment):
    args = dict(features=X, reference=REF, weight=None)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        vital_fast.sort_match_loss(args.pop("features"), args.pop("reference"), args.pop("weight"), **args)
    assert fragment in str(info.value), str(info.value)
    assert "sort_match_loss" in str(info.value)


@pytest.mark.parametrize("where", ["features", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_raises_unless_turned_off(where, value):
    x, ref = X.clone(), REF.clone()
    (x if where == "features" else ref).view(-1)[-1] = value
    with pytest.raises(ValueError, match=f"'{where}' must be finite"):
        vital_fast.sort_match_loss(x, ref)
    out = vital_fast.sort_match_loss(x, ref, check_values=False, backend="reference")
    assert out.dim() == 0  # no check: the caller asked for speed and gets whatever the math gives


def test_lrp_weight_bad_relevance():
    with pytest.raises(ValueError, match="'relevance' must have the shape of 'activations'"):
        vital_fast.lrp_weight(X, torch.rand(2, 3, 4, 5), REF)
    with pytest.raises(TypeError, match="'relevance' must have dtype"):
        vital_fast.lrp_weight(X, torch.ones(2, 3, 4, 4, dtype=torch.int32), REF)
    with pytest.raises(ValueError, match="'relevance' must be finite"):
        vital_fast.lrp_weight(X, torch.full((2, 3, 4, 4), float("nan")), REF)


def test_d_equal_one_and_constant_rows_work():
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    out = vital_fast.sort_match_loss(x, torch.zeros(3, 1))
    out.backward()
    torch.testing.assert_close(out, (x.detach() ** 2).mean())
    c = torch.full((1, 3, 4, 4), 2.0)
    assert float(vital_fast.sort_match_loss(c, torch.full((3, 16), 2.0))) == 0.0


def test_prototype_bad_input():
    with pytest.raises(ValueError, match="'q' must be a positive int"):
        vital_fast.sorted_prototype(X, q=0)
    with pytest.raises(ValueError, match="K = 0"):
        vital_fast.sorted_prototype(torch.randn(0, 3, 4, 4))
