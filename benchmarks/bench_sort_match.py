"""sort_match_loss, forward + backward: reference vs paper-style vs vital_fast, ResNet-50 shapes.

    pytest benchmarks/bench_sort_match.py --benchmark-only --benchmark-group-by=group
    pytest benchmarks --benchmark-disable      # smoke: each provider runs once, outputs checked
"""

from __future__ import annotations

import pytest
import torch

import vital_fast
from vital_fast import oracle as R
from vital_fast.bench import RESNET50_SHAPES, fused_bytes, make_inputs, providers
from benchmarks.conftest import DEVICES, record

CASES = [(b, *s) for b in (1, 16) for s in RESNET50_SHAPES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["reference", "paper-style", "vital_fast"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_sort_match_fwd_bwd(benchmark, provider, shape, device):
    B, C, H, W = shape
    if benchmark.disabled and B > 1:
        pytest.skip("smoke run: batch 1 only")
    x, refs, proto = make_inputs(B, C, H, W, device=device)
    # Outputs agree with the reference before anything is timed.
    got = vital_fast.sort_match_loss(x, proto)
    torch.testing.assert_close(got, R.sort_match_reference(x, proto), rtol=1e-5, atol=1e-6)
    fn = providers(x, refs, proto)[provider]  # each closure synchronizes on CUDA
    benchmark.group = f"sort_match-fwd+bwd-{device}-{'x'.join(map(str, shape))}"
    record(benchmark, shape, x.dtype, fused_bytes(x), provider, device)
    benchmark.pedantic(fn, warmup_rounds=1, rounds=3 if B > 1 else 5)
