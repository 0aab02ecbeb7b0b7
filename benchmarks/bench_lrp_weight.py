"""lrp_weight, forward + backward: the pure-torch reference vs the fused op.

    pytest benchmarks/bench_lrp_weight.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import vital_fast
from vital_fast import oracle as R
from vital_fast.bench import RESNET50_SHAPES, fused_bytes, make_sync
from benchmarks.conftest import DEVICES, record


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["reference", "vital_fast"])
@pytest.mark.parametrize("shape", [(8, *s) for s in RESNET50_SHAPES[:4]], ids=lambda s: "x".join(map(str, s)))
def test_lrp_weight_fwd_bwd(benchmark, provider, shape, device):
    B, C, H, W = shape
    if benchmark.disabled and C > 256:
        pytest.skip("smoke run: small shapes only")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    rel = torch.rand(shape, generator=g).to(device)
    proto = vital_fast.sorted_prototype(torch.randn(4, C, H, W, generator=g).to(device),
                                        relevance=torch.rand(4, C, H, W, generator=g).to(device))
    w = torch.rand(C, generator=g).to(device)
    sync = make_sync(device)
    torch.testing.assert_close(vital_fast.lrp_weight(x, rel, proto, w), R.lrp_weight_reference(x, rel, proto, w),
                               rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_(True)

    def run():
        xr.grad = None
        if provider == "reference":
            R.lrp_weight_reference(xr, rel, proto, w).backward()
        else:
            vital_fast.lrp_weight(xr, rel, proto, w, check_values=False).backward()
        sync()

    benchmark.group = f"lrp_weight-fwd+bwd-{device}-{'x'.join(map(str, shape))}"
    record(benchmark, shape, x.dtype, fused_bytes(x) + x.numel() * 4, provider, device)
    benchmark.pedantic(run, warmup_rounds=1, rounds=3)
