"""The C++ prototype builder (csrc/sorted_prototype_cpu.cpp) against its plain-torch reference: every row-length
strategy of the ranking, dtypes, layouts, relevance, ties, thread counts, the forced reference backend, errors."""

from __future__ import annotations

import pytest
import torch

import vital_fast
from conftest import requires_cpp
from vital_fast.oracle import as_rows, sorted_prototype_reference

pytestmark = requires_cpp


def _ops():
    from vital_fast import _ext

    _ext.load_cpp()
    return torch.ops.vital_fast


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


# rows of 9 (counting), 400 (8-bit radix) and 2500 (11-bit radix) elements
@pytest.mark.parametrize("hw", [3, 20, 50])
@pytest.mark.parametrize("relevance", [False, True])
@pytest.mark.parametrize("q", [None, 7, 4096])
def test_matches_reference_at_every_row_length(hw, relevance, q):
    g = torch.Generator().manual_seed(hw)
    f = torch.randn(5, 6, hw, hw, generator=g).relu()  # half zeros: ties everywhere
    rel = torch.rand(5, 6, hw, hw, generator=g) if relevance else None
    got = vital_fast.sorted_prototype(f, q, relevance=rel)
    want = sorted_prototype_reference(f, q, relevance=rel)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_compute_in_the_reference_math_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 3, 12, 12, generator=g).to(dtype)
    rel = torch.rand(4, 3, 12, 12, generator=g).to(dtype)
    for r in (None, rel):
        got = vital_fast.sorted_prototype(f, 16, relevance=r)
        want = sorted_prototype_reference(f, 16, relevance=r)
        assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got, want, **_tol(want.dtype))


def test_layouts_channels_last_and_tokens():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(3, 10, 9, 9, generator=g)
    rel = torch.rand(3, 10, 9, 9, generator=g)
    want = sorted_prototype_reference(f, 32, relevance=rel)
    cl = f.contiguous(memory_format=torch.channels_last)
    rel_cl = rel.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(vital_fast.sorted_prototype(cl, 32, relevance=rel_cl), want, **_tol(torch.float32))
    torch.testing.assert_close(vital_fast.sorted_prototype(cl, 32, relevance=rel), want, **_tol(torch.float32))
    tokens = torch.randn(3, 50, 10, generator=g)  # (B, N, C), as ViT layers give them
    torch.testing.assert_close(vital_fast.sorted_prototype(tokens, 16, channel_dim=-1),
                               sorted_prototype_reference(tokens, 16, channel_dim=-1), **_tol(torch.float32))


def test_one_image_is_its_sorted_rows_and_constant_rows_stay_constant():
    f = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(vital_fast.sorted_prototype(f), torch.sort(as_rows(f)[0], -1).values, rtol=0, atol=0)
    c = torch.full((3, 2, 40, 40), 2.5)
    assert torch.equal(vital_fast.sorted_prototype(c, 8), torch.full((2, 8), 2.5))
    signed = torch.tensor([[[[0.0, -0.0, 1.0, -1.0]]]])  # −0.0 and +0.0 rank alike, as torch.sort does
    assert torch.equal(vital_fast.sorted_prototype(signed), torch.tensor([[-1.0, 0.0, 0.0, 1.0]]))


def test_result_does_not_depend_on_the_thread_count():
    f = torch.randn(6, 64, 30, 30).contiguous(memory_format=torch.channels_last)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vital_fast.sorted_prototype(f, 64)
        torch.set_num_threads(2)
        two = vital_fast.sorted_prototype(f, 64)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_forced_backends(monkeypatch):
    f = torch.randn(4, 3, 11, 11)
    want = sorted_prototype_reference(f, 8)
    assert torch.equal(vital_fast.sorted_prototype(f, 8, backend="reference"), want)
    assert torch.equal(vital_fast.sorted_prototype(f, 8, backend="cpp"), vital_fast.sorted_prototype(f, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        vital_fast.sorted_prototype(f, 8, backend="gpu")
    monkeypatch.setenv("VITAL_FAST_BACKEND", "reference")
    assert torch.equal(vital_fast.sorted_prototype(f, 8), want)


def test_operator_passes_opcheck_and_refuses_bad_input():
    ops = _ops()
    x = torch.randn(3, 4, 30)
    torch.library.opcheck(ops.sorted_rows_mean, (x, None))
    torch.library.opcheck(ops.sorted_rows_mean, (x, torch.rand(3, 4, 30)))
    with pytest.raises(RuntimeError, match="no images"):
        ops.sorted_rows_mean(torch.randn(0, 4, 30), None)
    with pytest.raises(RuntimeError, match="'rel' must have the shape"):
        ops.sorted_rows_mean(x, torch.rand(3, 4, 29))
    with pytest.raises(RuntimeError, match=r"\(K, C, D\)"):
        ops.sorted_rows_mean(torch.randn(3, 4), None)
