"""pytest-benchmark settings shared by the op benchmarks."""

from __future__ import annotations

import platform

import pytest
import torch

try:
    import triton

    TRITON_VERSION = triton.__version__
except Exception:  # pragma: no cover - optional
    TRITON_VERSION = None


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# every op benchmark runs on the CPU, and on the GPU too when there is one (closures synchronized there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def record(benchmark, shape, dtype, nbytes: int, provider: str, device: str = "cpu") -> None:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()
    benchmark.extra_info.update({
        "shape": list(shape), "dtype": str(dtype), "provider": provider,
        "device": name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": TRITON_VERSION, "bytes": nbytes,
    })
