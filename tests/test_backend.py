"""Backend resolution: auto per device, forced backends, errors that say how to fix, fallback warning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import vital_fast
from vital_fast import _backend, _ext
from conftest import HAS_CPP


def test_auto_picks_by_device():
    expected_cpu = "cpp" if HAS_CPP else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve("op", torch.device("cpu")) == expected_cpu
    assert _backend.resolve("op", torch.device("meta")) == "reference"


def test_forced_reference_and_env(monkeypatch):
    assert _backend.resolve("op", torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("VITAL_FAST_BACKEND", "reference")
    assert _backend.resolve("op", torch.device("cpu")) == "reference"
    monkeypatch.setenv("VITAL_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="VITAL_FAST_BACKEND must be one of"):
        _backend.resolve("op", torch.device("cpu"))


def test_forced_missing_backend_raises_with_fix(monkeypatch):
    monkeypatch.setattr(_ext, "load_cpp", lambda: (None, "vital_fast._C did not import: blocked"))
    with pytest.raises(RuntimeError, match=r"backend 'cpp' was requested.*blocked.*pip install --no-build-isolation -e \."):
        vital_fast.sort_match_loss(torch.randn(1, 2, 3, 3), torch.zeros(2, 9), backend="cpp")
    monkeypatch.setattr(_ext, "load_triton", lambda: (None, "triton did not import: blocked"))
    with pytest.raises(RuntimeError, match=r"backend 'triton'.*vital_fast\[gpu\]"):
        vital_fast.sort_match_loss(torch.randn(1, 2, 3, 3), torch.zeros(2, 9), backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_ext, "load_triton", lambda: (object(), None))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve("op", torch.device("cpu"), "triton")


def test_fallback_warns_once_per_op_and_reason(monkeypatch):
    monkeypatch.setattr(_ext, "load_cpp", lambda: (None, "a test reason"))
    monkeypatch.setattr(_backend, "_warned", set())
    x, ref = torch.randn(1, 2, 3, 3), torch.zeros(2, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vital_fast.sort_match_loss(x, ref)
        vital_fast.sort_match_loss(x, ref)
    msgs = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(msgs) == 1 and "a test reason" in msgs[0]


def test_available_backends_reports_reasons(monkeypatch):
    monkeypatch.setattr(_ext, "load_cpp", lambda: (None, "why not"))
    info = vital_fast.available_backends()
    assert set(info) == {"reference", "cpp", "triton"}
    assert info["reference"]["available"] is True
    assert info["cpp"] == {"available": False, "reason": "why not", "devices": "cpu"}


def test_imports_and_runs_without_compiled_parts():
    """With vital_fast._C and triton blocked, the package imports and the reference path runs."""
    code = (
        "import sys, warnings; sys.modules['vital_fast._C'] = None; sys.modules['triton'] = None\n"
        "import torch, vital_fast\n"
        "info = vital_fast.available_backends()\n"
        "assert not info['cpp']['available'] and not info['triton']['available'], info\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    vital_fast.sort_match_loss(x, torch.zeros(3, 16)).backward()\n"
        "assert any('falling back' in str(m.message) for m in w)\n"
        "assert x.grad is not None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_a_torch_without_triton_op_reports_triton_unavailable(monkeypatch):
    """torch before 2.6 has no torch.library.triton_op: the Triton backend is unavailable with the reason, it does
    not crash the backend probe."""
    import sys

    import torch

    from vital_fast import _backend, _ext

    if _ext.load_triton()[0] is None:
        pytest.skip("triton is not installed")
    monkeypatch.delattr(torch.library, "triton_op")
    monkeypatch.delitem(sys.modules, "vital_fast.ops.triton_ops", raising=False)
    ok, why = _backend._status("triton")
    assert not ok and "torch >= 2.6" in why
