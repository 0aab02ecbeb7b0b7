"""The batched optimizer on a tiny CNN: batched equals sequential, the loss falls, hooks are removed,
bad input stops before any step, the prototype cache is reused and never trusted when stale."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import vital_fast
from vital_fast.models import load_model
from vital_fast.optim import Settings, Target, parse_target, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, tensor_hash


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.act3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


LAYERS = [("conv1", 1.0), ("conv2", 1.0), ("conv3", 1.0)]


def tiny_model():
    torch.manual_seed(0)
    return load_model(Tiny(), input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def refs_for(key: str, n: int = 3, size: int = 40) -> ImageSet:
    g = torch.Generator().manual_seed(abs(hash(key)) % (2 ** 31))
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    return ImageSet(imgs, [f"{key}-{i}" for i in range(n)], [tensor_hash(i) for i in imgs])


def small_settings(**kw):
    base = dict(stages=[(0.5, 3), (1.0, 4)], lr=0.1, warmup=2, n_refs=3, ref_crops=4, quantiles=32,
                jitter=0.1, flip=True)
    base.update(kw)
    return Settings(**base)


TARGETS = ["class:1", "class:7", "channel:conv3:5", "channel:conv2:3"]


def test_batched_equals_sequential(tmp_path):
    """B targets in one pass give the images of B single-target runs with the same seeds.

    With oneDNN convolutions off, each element's arithmetic does not depend on the batch size, and
    the images are bit-identical. With oneDNN on, convolutions round differently per batch size;
    Adam turns those last-bit differences into small pixel differences where a gradient cancels
    to nearly zero, so there the losses are compared.
    """
    m = tiny_model()
    refs = {t: refs_for(t) for t in TARGETS}
    cache = DiskCache(str(tmp_path / "cache"))
    s = small_settings()
    with torch.backends.mkldnn.flags(enabled=False):
        batched = visualize(m, TARGETS, refs, settings=s, seed=3, class_layers=LAYERS, cache=cache)
        assert batched.images.shape == (4, 3, 32, 32)
        for i, t in enumerate(TARGETS):
            single = visualize(m, [t], {t: refs[t]}, settings=s, seed=3, class_layers=LAYERS, cache=cache)
            assert torch.equal(single.images[0], batched.images[i]), t
            assert torch.equal(single.losses[0], batched.losses[i]), t
    batched = visualize(m, TARGETS, refs, settings=s, seed=3, class_layers=LAYERS, cache=cache)
    single = visualize(m, TARGETS[2:3], {TARGETS[2]: refs[TARGETS[2]]}, settings=s, seed=3, class_layers=LAYERS,
                       cache=cache)
    torch.testing.assert_close(single.losses[0], batched.losses[2], rtol=1e-4, atol=1e-6)
    assert batched.seeds[0] == parse_target("class:1").seed(3)


def test_loss_decreases_and_outputs_are_valid(tmp_path):
    m = tiny_model()
    t = "class:2"
    res = visualize(m, [t], {t: refs_for(t)}, settings=small_settings(stages=[(1.0, 40)], flip=False, jitter=0.0),
                    seed=0, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    first, last = float(res.losses[0, :3].mean()), float(res.losses[0, -3:].mean())
    assert last < 0.7 * first, (first, last)
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert res.transparency.shape == (1, 1, 32, 32) and float(res.transparency.max()) == pytest.approx(1.0)
    assert not any(p.requires_grad for p in m.model.parameters())
    for mod in m.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks


def test_hooks_removed_after_error(tmp_path):
    m = tiny_model()
    t = "class:2"

    def boom(*a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        visualize(m, [t], {t: refs_for(t)}, settings=small_settings(), class_layers=LAYERS,
                  cache=DiskCache(str(tmp_path)), progress=boom)
    for mod in m.model.modules():
        assert not mod._forward_hooks


@pytest.mark.parametrize("targets, refs, fragment", [
    (["channel:conv9:1"], None, "conv9"),
    (["channel:conv3:99"], None, "has 16 channels"),
    (["class:10"], None, "10 classes"),
    (["class:1"], {}, "no reference images for target class:1"),
    (["klass:1"], None, "valid forms"),
    (["class:1", "class:1"], None, "duplicate"),
])
def test_bad_input_stops_before_optimizing(tmp_path, targets, refs, fragment):
    m = tiny_model()
    calls = []
    refs = refs if refs is not None else {t: refs_for(t) for t in targets}
    with pytest.raises(ValueError, match=fragment):
        visualize(m, targets, refs, settings=small_settings(), class_layers=LAYERS, cache=DiskCache(str(tmp_path)),
                  progress=lambda *a: calls.append(a))
    assert not calls


def test_resolution_the_model_cannot_run(tmp_path):
    class Fixed(Tiny):
        def forward(self, x):
            if x.shape[-1] != 32:
                raise RuntimeError("size mismatch")
            return super().forward(x)

    m = load_model(Fixed(), input_size=32, resize_size=32)
    with pytest.raises(ValueError, match="fails on a 16x16 input"):
        visualize(m, ["class:1"], {"class:1": refs_for("a")}, settings=small_settings(), class_layers=LAYERS,
                  cache=DiskCache(str(tmp_path)))


def test_prototype_cache_reused_and_invalidated(tmp_path):
    m = tiny_model()
    cache = DiskCache(str(tmp_path))
    s = small_settings(stages=[(1.0, 1)])
    r = refs_for("x")
    visualize(m, ["class:1"], {"class:1": r}, settings=s, class_layers=LAYERS, cache=cache)
    assert cache.misses == 1 and cache.hits == 0
    visualize(m, ["class:1"], {"class:1": r}, settings=s, class_layers=LAYERS, cache=cache)
    assert cache.hits == 1
    changed = ImageSet([r.images[0] * 0.5] + r.images[1:], r.names, [tensor_hash(r.images[0] * 0.5)] + r.hashes[1:])
    visualize(m, ["class:1"], {"class:1": changed}, settings=s, class_layers=LAYERS, cache=cache)
    assert cache.misses == 2
    # A truncated entry (an interrupted write by another tool) is never trusted.
    for root, _, files in os.walk(tmp_path):
        for f in files:
            p = os.path.join(root, f)
            data = open(p, "rb").read()
            open(p, "wb").write(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ignoring unreadable entry"):
        visualize(m, ["class:1"], {"class:1": r}, settings=s, class_layers=LAYERS, cache=cache)
    assert cache.misses == 3


def test_target_parsing():
    assert parse_target("channel:_blocks.10:7") == Target("channel", 7, "_blocks.10")
    assert parse_target("class:285").key == "class:285"
    assert Target("channel", 1, "a.b").slug == "channel__a.b__1"
    with pytest.raises(ValueError):
        parse_target("class:-1")


def test_class_relevance_weights_class_targets(tmp_path, monkeypatch):
    """``class_relevance``: class targets match relevance-weighted features (relevance from the class
    logit, for the references and for the synthetic image), with per-channel importance; channel
    targets are unchanged; the option is part of the prototype cache key; batched equals sequential."""
    from vital_fast.models import class_logit_layer
    from vital_fast.references import relevance as rel_mod
    from vital_fast.references.prototypes import class_references

    m = tiny_model()
    assert class_logit_layer(m) == "fc"
    targets = ["class:1", "class:7", "channel:conv3:5"]
    refs = {t: refs_for(t) for t in targets}
    cache = DiskCache(str(tmp_path / "cache"))
    plain, weighted = small_settings(), small_settings(class_relevance=True)

    r_plain = class_references(m, "class:1", refs["class:1"], LAYERS, 32, plain, 0, cache)
    r_rel = class_references(m, "class:1", refs["class:1"], LAYERS, 32, weighted, 0, cache)
    assert r_plain.importance == {} and set(r_rel.importance) == {l for l, _ in LAYERS}
    assert not torch.equal(r_plain.prototypes["conv3"], r_rel.prototypes["conv3"])  # a separate cache entry

    starts = []
    real = rel_mod.relevance_maps

    def spy(model, x, target_layer, channels, record_layers, **kw):
        starts.append((target_layer, channels.tolist()))
        return real(model, x, target_layer, channels, record_layers, **kw)

    monkeypatch.setattr(rel_mod, "relevance_maps", spy)
    with torch.backends.mkldnn.flags(enabled=False):
        a = visualize(m, targets, refs, settings=plain, seed=1, class_layers=LAYERS, cache=cache)
        starts.clear()
        b = visualize(m, targets, refs, settings=weighted, seed=1, class_layers=LAYERS, cache=cache)
        assert ("fc", [1, 7]) in starts and ("conv3", [5]) in starts  # the class logit starts class relevance
        assert not torch.equal(a.images[0], b.images[0]) and not torch.equal(a.images[1], b.images[1])
        assert torch.equal(a.images[2], b.images[2])  # the channel target does not change
        single = visualize(m, ["class:7"], {"class:7": refs["class:7"]}, settings=weighted, seed=1,
                           class_layers=LAYERS, cache=cache)
        assert torch.equal(single.images[0], b.images[1])
    assert torch.isfinite(b.losses).all() and b.losses[:2, -1].mean() < b.losses[:2, 0].mean()


def test_class_relevance_needs_class_logits(tmp_path):
    """A model without an nn.Linear head cannot start class relevance: a clear error before any step."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = load_model(net, input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="class_relevance"):
        visualize(m, ["class:1"], {"class:1": refs_for("class:1")}, settings=small_settings(class_relevance=True),
                  class_layers=[("0", 1.0), ("2", 1.0)], cache=DiskCache(enabled=False))


@pytest.mark.parametrize("target", ["channel:fc:1", "neuron:fc:1:0:0"])
def test_a_unit_of_a_layer_without_a_grid_is_refused_in_one_line(target):
    """A unit target on an nn.Linear layer ended in an internal einsum/IndexError after the model loaded."""
    from _util import tiny_loaded, tiny_refs

    lm = tiny_loaded()
    with pytest.raises(ValueError, match=r"layer 'fc' outputs \(B, 5\) with no spatial grid or tokens; \w+ targets need"):
        visualize(lm, [target], {target: tiny_refs()}, settings=Settings(stages=[(1.0, 2)], n_refs=3, quantiles=8))


def test_a_matched_layer_without_a_grid_is_refused_in_one_line():
    """``--layers _fc`` answered `sorted_prototype: 'features' must have at least 3 dimensions`."""
    from _util import tiny_loaded, tiny_refs

    lm = tiny_loaded()
    with pytest.raises(ValueError, match=r"matched layer 'fc' outputs \(B, 5\) with no spatial grid or tokens"):
        visualize(lm, ["class:1"], {"class:1": tiny_refs()}, class_layers=[("conv1", 1.0), ("fc", 1.0)],
                  settings=Settings(stages=[(1.0, 2)], n_refs=3, quantiles=8))
