"""The test matrix, defined once: backends, dtypes, tolerances, markers."""

from __future__ import annotations

import os

import pytest
import torch

from vital_fast import _ext

INTERPRET = _ext.triton_interpret()
HAS_CPP = _ext.load_cpp()[0] is not None
HAS_TRITON = _ext.load_triton()[0] is not None
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_cpp = pytest.mark.skipif(
    not HAS_CPP, reason="the C++ extension is not built (pip install --no-build-isolation -e .)"
)

# Compiled backends tested against the reference. Triton runs on CPU tensors only under
# TRITON_INTERPRET=1 (set in the job environment by .ci/run), on small shapes.
_triton_ok = HAS_TRITON and (INTERPRET or HAS_CUDA)
BACKENDS = [
    pytest.param("cpp", marks=requires_cpp, id="cpp"),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.interpret,
            pytest.mark.skipif(not _triton_ok, reason="triton needs CUDA or TRITON_INTERPRET=1"),
        ],
        id="triton",
    ),
]
ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) per dtype for comparisons against the float64 reference. Low precision is judged
# against the reference run in the same dtype (STYLE.md habit 15), with these as floors.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# DESIGN.md §4: loss within 1e-5 relative, gradient within 1e-4 (float32).
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-4


def device_for(backend: str) -> str:
    """Triton tests use CUDA when present, else CPU tensors under the interpreter."""
    if backend == "triton" and HAS_CUDA:
        return "cuda"
    return "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    # A developer's VITAL_FAST_BACKEND must not change what the tests exercise.
    monkeypatch.delenv("VITAL_FAST_BACKEND", raising=False)
    yield


def pytest_report_header(config):
    return (
        f"vital_fast backends: cpp={'yes' if HAS_CPP else 'no'} "
        f"triton={'yes' if HAS_TRITON else 'no'} interpret={INTERPRET} cuda={HAS_CUDA}; "
        f"threads={torch.get_num_threads()} pid={os.getpid()}"
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (results do not depend on it; on a busy 2-core machine OpenMP
    barriers make 2 threads far slower than 1). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
