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

pytestmark = [pytest.mark.filterwarnings("ignore:relevance_maps:UserWarning"), pytest.mark.usefixtures("one_thread")]


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


def _vit_tiny(zero_bias: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", depth=4).eval().requires_grad_(False)
    if zero_bias:  # biases and position embeddings take relevance; without them nothing may be lost
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias") or n in ("pos_embed", "cls_token"):
                    p.zero_()
    return m


@pytest.mark.parametrize("zero_bias", [True, False])
def test_vit_relevance_is_conserved_through_transformer_blocks(zero_bias):
    from vital_fast.models import FeatureTaps
    from vital_fast.references.relevance import relevance_maps

    m = _vit_tiny(zero_bias)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rec = ["patch_embed.proj", "blocks.0", "blocks.1", "blocks.2"]
    r = relevance_maps(m, x, "blocks.3", torch.tensor([5, 9]), rec, family="vit")
    with torch.no_grad(), FeatureTaps(m, ["blocks.3"], stop_after=True) as taps:
        a = taps.run(x)["blocks.3"]
    start = torch.stack([a[0, :, 5].sum(), a[1, :, 9].sum()])
    for layer in rec[1:] if not zero_bias else rec:  # the embedding's bias and positions take their share
        got = torch.stack([r[layer][b].sum() for b in range(2)])
        assert torch.allclose(got, start, rtol=1e-3, atol=1e-3), (layer, got, start)
    assert all(bool(torch.isfinite(v).all()) for v in r.values())
    # a one-hot direction gives the channel's relevance through the transformer rules too
    d = torch.zeros(2, a.shape[-1])
    d[0, 5] = d[1, 9] = 1.0
    rd = relevance_maps(m, x, "blocks.3", d, rec, family="vit")
    assert all(torch.equal(r[k], rd[k]) for k in rec)


def test_plain_gradient_x_input_is_not_conserved_in_a_vit():
    """What the rules buy: the same sweep with the model's own backward (gradient x input) loses the sum."""
    m = _vit_tiny(True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [m.blocks[i].register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, o)) for i in (0, 3)]
    try:
        with torch.enable_grad():
            m(x.requires_grad_(True))
            a0, a3 = seen[0], seen[3]
            (g,) = torch.autograd.grad(a3[..., 5].sum(), a0)
    finally:
        for h in hooks:
            h.remove()
    ratio = float((g * a0).sum() / a3[..., 5].sum())
    assert abs(ratio - 1.0) > 0.05, ratio


class ResNetLike(torch.nn.Module):
    """Named like a ResNet (the family guess says resnet), laid out like nothing the preset knows."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def resnet_like():
    torch.manual_seed(0)
    return ResNetLike()


def test_cli_layers_when_no_preset_fits(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vital_fast.cli.main import main
    from vital_fast.cli.pyref import FAMILY_CHOICES
    from vital_fast.models import FAMILIES

    assert tuple(FAMILY_CHOICES) == tuple(FAMILIES)
    (tmp_path / "imgs" / "3").mkdir(parents=True)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / "3" / f"{i}.png")
    base = ["visualize", "--model", "py:test_model_families:resnet_like", "--target", "class:3", "--images",
            str(tmp_path / "imgs"), "--size", "32", "--steps", "2", "--no-cache", "--workers", "0", "--set", "n_refs=2"]
    rc = main(base + ["--out", str(tmp_path / "r1")])
    err = capsys.readouterr().err
    assert rc == 2 and "--layers" in err and "conv1" in err and not (tmp_path / "r1").exists()
    assert main(base + ["--out", str(tmp_path / "r2"), "--layers", "a,b:2"]) == 0
    import json

    m = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    # the layers the objective reads: the matched ones, then the logits of the fast preset's logit term
    assert m["targets"][0]["layers"] == [["a", 1.0], ["b", 2.0], ["fc", 1.0]]
    assert m["run"]["layers"] == [["a", 1.0], ["b", 2.0]]
    rc = main(base + ["--out", str(tmp_path / "r3"), "--layers", "a,nope"])
    assert rc == 2 and "unknown layer 'nope'" in capsys.readouterr().err
    rc = main(base + ["--out", str(tmp_path / "r4"), "--family", "generic"])
    assert rc == 0


def test_token_layout_that_cannot_be_inferred():
    timm = pytest.importorskip("timm")
    from vital_fast.models.facts import check_targets
    from vital_fast.optim import parse_target

    lm = load_model(timm.create_model("vit_tiny_patch16_224", depth=2), family="generic")
    with pytest.raises(ValueError, match="family='vit'"):
        check_targets(lm, [parse_target("channel:blocks.1:3")])


def test_token_locations_map_back_to_image_patches():
    from vital_fast.references.mining import crop_patch, token_grid

    assert token_grid((197, 1)) == (14, 1) and token_grid((196, 1)) == (14, 0) and token_grid((14, 14)) is None
    lm = load_model(Tiny(), input_size=224, resize_size=224)
    img = torch.zeros(3, 224, 224)
    img[:, 16:32, 32:48] = 1.0  # the image patch of token 1 + (1 * 14 + 2) = 17
    p = crop_patch(lm, img, (17, 0), (197, 1), 224, 48)
    assert p.shape == (3, 48, 48)
    assert float(p[:, 16:32, 16:32].mean()) > 0.9 and float(p.mean()) < 0.2  # its patch, in the middle
    whole = crop_patch(lm, img, (0, 0), (197, 1), 224, 48)  # CLS: the whole view
    assert 0.0 < float(whole.mean()) < 0.05


def test_own_preprocessing_callable(pool):
    calls = []

    def prep(x01):
        calls.append(tuple(x01.shape))
        return (x01 - 0.5) * 4.0  # not a per-channel mean/std a preset knows

    torch.manual_seed(0)
    m = Tiny()
    lm = load_model(m, input_size=32, resize_size=32, preprocess=prep)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(lm.normalize(x), (x - 0.5) * 4.0)
    assert "prep" in lm.norm_key[-1]
    for param in ("pixel", "fourier"):
        calls.clear()
        r = visualize(lm, ["class:1", "channel:conv3:2"], {"class:1": pool}, pool=pool, settings=_s(), size=32,
                      param=param)
        assert bool(torch.isfinite(r.losses).all()) and len(calls) > 3
    with pytest.raises(TypeError, match="callable"):
        load_model(Tiny(), preprocess="zscore")
