"""Every common model family, random weights (nothing is downloaded): torchvision resnet18, convnext_tiny,
densenet121, efficientnet_b0, vit_b_16 and timm resnet18, convnext_atto, efficientnet_b0,
vit_tiny_patch16_224. For each: the presets' layers exist, a class target and a channel target run a few
steps through the Python API, batched equals sequential, and the CLI runs the same two targets."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from vital_fast.cli.main import main
from vital_fast.models import default_layers, load_model, resolve_layer
from vital_fast.optim import Settings, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, tensor_hash

MODELS = [
    ("torchvision:resnet18", 64), ("torchvision:convnext_tiny", 64), ("torchvision:densenet121", 64),
    ("torchvision:efficientnet_b0", 64), ("torchvision:vit_b_16", 224),
    ("timm:resnet18", 64), ("timm:convnext_atto", 64), ("timm:efficientnet_b0", 64),
    ("timm:vit_tiny_patch16_224", 224),
]
FAMILY = {"resnet18": "resnet", "convnext_tiny": "convnext", "convnext_atto": "convnext", "densenet121": "densenet",
          "efficientnet_b0": "efficientnet", "vit_b_16": "vit", "vit_tiny_patch16_224": "vit"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings():
    return Settings(stages=[(1.0, 2)], lr=0.05, warmup=1, n_refs=2, ref_crops=2, quantiles=16)


def _pool():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 72, 80, generator=g) for _ in range(3)]
    return ImageSet(imgs, [f"i{i}" for i in range(3)], [tensor_hash(x) for x in imgs])


def _channel_layer(lm):
    return default_layers(lm)[-2][0]


@pytest.mark.parametrize("spec, size", MODELS, ids=[m for m, _ in MODELS])
def test_family(spec, size, tmp_path):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # canonizer notes for blocks without one
        torch.manual_seed(0)
        lm = load_model(spec, weights="random")
        assert lm.family == FAMILY[spec.split(":", 1)[1]]
        for layer, _ in default_layers(lm):
            resolve_layer(lm.model, layer)
        layer = _channel_layer(lm)
        pool = _pool()
        targets = ["class:3", f"channel:{layer}:1"]
        kw = dict(pool=pool, settings=_settings(), seed=0, size=size, cache=DiskCache(enabled=False))
        both = visualize(lm, targets, {"class:3": pool}, **kw)
        assert bool(torch.isfinite(both.losses).all()), both.losses
        for i, t in enumerate(targets):
            one = visualize(lm, [t], {"class:3": pool} if t.startswith("class") else None, **kw)
            assert torch.allclose(one.images[0], both.images[i], atol=2e-3), (t, (one.images[0] - both.images[i]).abs().max())
        out = tmp_path / "run"
        images = tmp_path / "imgs"
        (images / "3").mkdir(parents=True)
        from PIL import Image

        for j, x in enumerate(pool.images):
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(images / "3" / f"{j}.png")
        rc = main(["visualize", "--model", spec, "--random-weights", "--target", targets[0], "--target", targets[1],
                   "--images", str(images), "--out", str(out), "--size", str(size), "--steps", "2", "--no-cache",
                   "--workers", "0", "--set", "n_refs=2", "--set", "ref_crops=2", "--set", "quantiles=16"])
        assert rc == 0
        m = json.loads((out / "manifest.json").read_text())
        assert [t["key"] for t in m["targets"]] == targets
