"""The ops as first-class PyTorch operators: opcheck on every operator and backend, torch.compile with
fullgraph=True and no graph break, torch.func.grad and vmap, torch.export, and the same errors at trace time."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import vital_fast
from conftest import _triton_ok, requires_cpp

triton_only = [pytest.mark.interpret, pytest.mark.skipif(not _triton_ok, reason="triton needs CUDA or TRITON_INTERPRET=1")]

torch._dynamo.config.cache_size_limit = 64


def _ops():
    from vital_fast import _ext

    _ext.load_cpp()
    return torch.ops.vital_fast


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    rel = torch.rand(2, 3, 4, 4, generator=g)
    ref = vital_fast.sorted_prototype(torch.randn(5, 3, 4, 4, generator=g), q=8)
    return x, rel, ref


def _entry_points(rel, ref):
    """The three public loss entry points, as functions of the features."""
    crit = vital_fast.SortMatchLoss(ref)
    lrp = vital_fast.LRPWeight(ref)
    return {
        "sort_match_loss": lambda x: vital_fast.sort_match_loss(x, ref),
        "SortMatchLoss": crit,
        "lrp_weight": lambda x: vital_fast.lrp_weight(x, rel, ref),
        "LRPWeight": lambda x: lrp(x, rel),
    }


@requires_cpp
def test_cpp_operators_have_autograd_and_pass_opcheck():
    ops = _ops()
    x = torch.randn(2, 3, 35, requires_grad=True)
    ref = torch.sort(torch.randn(1, 3, 35), -1).values
    torch.library.opcheck(ops.sort_match_fwd, (x, ref))
    torch.library.opcheck(ops.lrp_weight_fwd, (x, torch.rand(2, 3, 35), ref))


@pytest.mark.parametrize("relevance", [False, True])
@pytest.mark.parametrize("q", [None, 8])
def test_prototype_operator_passes_opcheck(relevance, q):
    f = torch.randn(4, 3, 5, 5)
    rel = torch.rand(4, 3, 5, 5) if relevance else None
    torch.library.opcheck(torch.ops.vital_fast.sorted_prototype, (f, q, rel, 1))
    assert torch.equal(vital_fast.sorted_prototype(f, q, relevance=rel),
                       torch.ops.vital_fast.sorted_prototype(f, q, rel, 1))


@pytest.mark.parametrize("_", [pytest.param(0, marks=triton_only, id="triton")])
def test_triton_operators_pass_opcheck(_):
    """Under the Triton interpreter (CPU tensors): the triton_op operators around the Triton launchers (their
    decomposition into kernels for inductor needs real kernels: gpu_check's compiled row on a GPU)."""
    from vital_fast.ops import triton_ops

    ops = torch.ops.vital_fast
    assert isinstance(triton_ops.sort_match_fwd_triton, torch._library.custom_ops.CustomOpDef)
    x = torch.randn(2, 3, 35, requires_grad=True)
    ref = torch.sort(torch.randn(1, 3, 35), -1).values
    torch.library.opcheck(ops.sort_match_fwd_triton, (x, ref))
    torch.library.opcheck(ops.lrp_weight_fwd_triton, (x, torch.rand(2, 3, 35), ref))
    g, saved = torch.randn(2, 3), torch.randn(2, 3, 11)
    for dtype in (torch.float32, torch.float16):
        torch.library.opcheck(ops.sort_match_bwd_triton, (g, saved, dtype))
        torch.library.opcheck(ops.lrp_weight_bwd_triton, (g, saved, dtype))


@pytest.mark.parametrize("_", [pytest.param(0, marks=triton_only, id="triton")])
def test_triton_backend_compiles_fullgraph(data, _):
    x, rel, ref = data
    for fn in (lambda t: vital_fast.sort_match_loss(t, ref, backend="triton"),
               lambda t: vital_fast.lrp_weight(t, rel, ref, backend="triton")):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.compile(fn, fullgraph=True, backend="aot_eager")(xc).backward()
        fn(xe).backward()
        torch.testing.assert_close(xc.grad, xe.grad)


@requires_cpp
@pytest.mark.parametrize("name", ["sort_match_loss", "SortMatchLoss", "lrp_weight", "LRPWeight"])
def test_no_graph_break(data, name):
    x, rel, ref = data
    fn = _entry_points(rel, ref)[name]
    torch._dynamo.reset()
    exp = torch._dynamo.explain(fn)(x.clone().requires_grad_())
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1


def _has_compiler() -> bool:
    import shutil

    return shutil.which("c++") is not None or shutil.which("g++") is not None


@requires_cpp
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not _has_compiler(), reason="inductor needs a C++ compiler"))])
@pytest.mark.parametrize("name", ["sort_match_loss", "SortMatchLoss", "lrp_weight", "LRPWeight"])
def test_fullgraph_compile_equals_eager_forward_and_backward(data, name, backend):
    x, rel, ref = data
    fn = _entry_points(rel, ref)[name]
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    lc = torch.compile(fn, fullgraph=True, backend=backend)(xc)
    le = fn(xe)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("name", ["sort_match_loss", "SortMatchLoss", "lrp_weight", "LRPWeight"])
def test_func_grad_and_vmap_match_autograd_and_a_loop(data, name):
    x, rel, ref = data
    fn = _entry_points(rel, ref)[name]
    xe = x.clone().requires_grad_()
    fn(xe).backward()
    torch.testing.assert_close(grad(fn)(x), xe.grad)
    X = torch.randn(4, *x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vmap(fn)(X), torch.stack([fn(X[i]) for i in range(4)]))
    torch.testing.assert_close(vmap(grad(fn))(X), torch.stack([grad(fn)(X[i]) for i in range(4)]))


def test_vmap_over_per_element_references():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 4, 6, generator=g)
    R = torch.sort(torch.randn(3, 2, 4, 6, generator=g), -1).values  # (V, B, C, Q): one reference per element
    f = lambda x, r: vital_fast.sort_match_loss(x, r, reduction="none")  # noqa: E731
    torch.testing.assert_close(vmap(f)(X, R), torch.stack([f(X[i], R[i]) for i in range(3)]))


def test_export_of_a_module_that_calls_the_loss(data):
    x, rel, ref = data

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.crit = vital_fast.SortMatchLoss(ref)
            self.lrp = vital_fast.LRPWeight(ref)

        def forward(self, t, r):
            f = self.conv(t)
            return self.crit(f) + self.lrp(f, r)

    torch.manual_seed(0)
    net = Net()
    ep = torch.export.export(net, (x, rel))
    assert "vital_fast" in ep.graph_module.code
    torch.testing.assert_close(ep.module()(x, rel), net(x, rel))


def test_compiled_call_raises_the_eager_errors_at_trace_time(data):
    x, rel, ref = data
    bad_ref = torch.sort(torch.randn(4, 8), -1).values  # 4 channels, the features have 3
    f = torch.compile(lambda t: vital_fast.sort_match_loss(t, bad_ref), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"sort_match_loss: 'reference' must have shape \(C, Q\) = \(3, Q\)"):
        f(x)
    g = torch.compile(lambda t: vital_fast.lrp_weight(t, rel.double(), ref), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="lrp_weight: 'relevance' must"):
        g(x.float()[:, :, :2])


def test_debug_flag_names_the_op_and_the_input_under_compile(data):
    x, rel, ref = data
    bad = x.clone()
    bad[0, 1, 2, 2] = float("nan")
    f = torch.compile(lambda t: vital_fast.sort_match_loss(t, ref), fullgraph=True, backend="aot_eager")
    f(bad)  # no value check when compiled, by default: nothing read back
    vital_fast.set_debug(True)
    try:
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="sort_match_loss: 'features' must be finite"):
            f(bad)
        with pytest.raises(ValueError, match="sort_match_loss: 'features' must be finite"):  # eager: the usual error
            vital_fast.sort_match_loss(bad, ref)
    finally:
        vital_fast.set_debug(False)
        torch._dynamo.reset()


def test_lrp_weight_module_equals_the_functional(data):
    x, rel, ref = data
    w = torch.rand(3)
    m = vital_fast.LRPWeight(ref, w, reduction="none")
    torch.testing.assert_close(m(x, rel), vital_fast.lrp_weight(x, rel, ref, w, reduction="none"))
    assert "reference" in dict(m.named_buffers()) and m.weight is not None


def test_engine_compile_compiles_the_loss_too_without_a_graph_break(monkeypatch):
    """--compile: the network's forward and the matching loss both run through torch.compile, no graph break,
    and the images are the eager ones up to rounding."""
    from torch._dynamo.utils import counters

    import vital_fast.optim.matching as matching
    from _util import tiny_loaded, tiny_refs
    from vital_fast.optim import Settings, visualize
    from vital_fast.references.cache import DiskCache

    calls = []
    real = matching.compiled_matching_loss
    monkeypatch.setattr(matching, "compiled_matching_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm, refs = tiny_loaded(), tiny_refs()
    targets = ["class:1", "class:3"]

    def run(compile):
        s = Settings(stages=[(0.5, 2), (1.0, 3)], warmup=1, n_refs=3, quantiles=16, lr=0.1, compile=compile)
        return visualize(lm, targets, {t: refs for t in targets}, settings=s, cache=DiskCache(enabled=False))

    eager = run("off")
    assert not calls
    torch._dynamo.reset()
    counters.clear()
    compiled = run("aot_eager")
    assert len(calls) == 5 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)


def test_kernel_table_has_a_compiled_row():
    import io

    from vital_fast.bench import run

    res = run([1], 1, 1, shapes=[(4, 6, 6)], out=io.StringIO(), compiled="aot_eager")
    assert {r["provider"] for r in res["rows"]} == {"reference", "paper-style", "vital_fast", "vital_fast compiled"}


def test_importing_vital_fast_imports_neither_dynamo_nor_triton():
    """Nothing compiled at import: a process may still set TRITON_INTERPRET after `import vital_fast`."""
    import subprocess
    import sys

    code = "import sys, vital_fast; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
