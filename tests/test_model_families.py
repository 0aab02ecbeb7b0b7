"""Models as users hand them over: the caller's module comes back untouched (training and requires_grad
flags, device), torch.compile'd modules with their original layer names, float16/bfloat16 models with the
image and the loss kept in float32, and state dicts saved from a compiled model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from vital_fast.models import load_model
from vital_fast.models.loading import uncompiled
from vital_fast.models.state import preserved
from vital_fast.optim import Settings, visualize
from vital_fast.references.images import ImageSet, tensor_hash

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from test_optim import Tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:relevance_maps:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pool():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 40, 48, generator=g) for _ in range(5)]
    return ImageSet(imgs, [f"i{i}" for i in range(5)], [tensor_hash(x) for x in imgs])


def _s():
    return Settings(stages=[(0.5, 1), (1.0, 2)], lr=0.1, warmup=1, n_refs=3, ref_crops=2, quantiles=16)


def test_the_callers_module_comes_back_as_given(pool):
    torch.manual_seed(0)
    m = Tiny().train()
    m.conv1.weight.requires_grad_(False)
    m.act2.eval()
    flags = [x.training for x in m.modules()]
    grads = [p.requires_grad for p in m.parameters()]
    values = [p.detach().clone() for p in m.parameters()]
    for method in ("vital", "actmax"):
        visualize(m, ["class:1", "channel:conv3:2"], {"class:1": pool}, pool=pool, settings=_s(), size=32,
                  method=method)
        assert [x.training for x in m.modules()] == flags
        assert [p.requires_grad for p in m.parameters()] == grads
        assert all(torch.equal(a, b) for a, b in zip(values, m.parameters()))
    with pytest.raises(RuntimeError):  # also when the call fails
        with preserved(m):
            m.eval().requires_grad_(False)
            raise RuntimeError("interrupted")
    assert [x.training for x in m.modules()] == flags and [p.requires_grad for p in m.parameters()] == grads


def test_compiled_modules_use_their_original_layer_names(pool, tmp_path):
    torch.manual_seed(0)
    plain = Tiny()
    compiled = torch.compile(plain)
    assert uncompiled(compiled) is plain
    lm = load_model(compiled, input_size=32, resize_size=32)
    assert lm.model is plain
    r = visualize(compiled, ["channel:conv3:2"], pool=pool, settings=_s(), size=32)
    assert r.images.shape == (1, 3, 32, 32)
    # a state dict saved from a compiled model has '_orig_mod.' keys
    torch.save(compiled.state_dict(), tmp_path / "c.pt")
    assert all(k.startswith("_orig_mod.") for k in torch.load(tmp_path / "c.pt"))
    from vital_fast.models.sources import _extract_state_dict

    state = _extract_state_dict(torch.load(tmp_path / "c.pt"), "c.pt")
    Tiny().load_state_dict(state)  # strict: the names fit the plain module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_with_a_float32_image(pool, dtype):
    torch.manual_seed(0)
    m = Tiny().to(dtype)
    for method in ("vital", "actmax"):
        r = visualize(m, ["channel:conv3:2", "class:1"], {"class:1": pool}, pool=pool, settings=_s(), size=32,
                      method=method)
        assert r.images.dtype == torch.float32 and r.losses.dtype == torch.float32
        assert bool(torch.isfinite(r.losses).all()) and bool(torch.isfinite(r.images).all())
    assert next(m.parameters()).dtype == dtype
    assert load_model(m).normalize(torch.rand(1, 3, 8, 8)).dtype == dtype
