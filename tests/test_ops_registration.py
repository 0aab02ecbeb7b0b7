"""torch.library.opcheck on every registered vital_fast:: op (schemas, fake kernels, autograd-free)."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cpp

pytestmark = requires_cpp


def _ops():
    import vital_fast._C  # noqa: F401  (registers the ops)

    return torch.ops.vital_fast


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_opcheck_forward(layout, dtype):
    ops = _ops()
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x3 = x.reshape(2, 3, 35) if layout == "contiguous" else x.flatten(2)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    ref = torch.sort(torch.randn(1, 3, 35, dtype=md), -1).values
    rel = torch.rand(2, 3, 35, dtype=torch.bfloat16 if dtype == torch.float16 else dtype)
    torch.library.opcheck(ops.sort_match_fwd, (x3, ref))
    torch.library.opcheck(ops.lrp_weight_fwd, (x3, rel, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_backward(dtype):
    ops = _ops()
    g = torch.randn(2, 3)
    saved = torch.randn(2, 3, 11)
    torch.library.opcheck(ops.sort_match_bwd, (g, saved, dtype))
    torch.library.opcheck(ops.lrp_weight_bwd, (g, saved, dtype))


def test_check_messages_name_the_argument():
    ops = _ops()
    with pytest.raises(RuntimeError, match="'ref' must have batch size 1"):
        ops.sort_match_fwd(torch.randn(2, 3, 4), torch.randn(3, 3, 4))
