"""Channel-target settings: the target's own layer in the loss, and relevance weighting on or off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vital_fast.models import load_model
from vital_fast.optim import ActMax, Settings, visualize
from vital_fast.references.cache import DiskCache


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.act3(self.conv3(x)).mean((2, 3)))


LAYERS = [("act1", 1.0), ("act2", 1.0), ("act3", 1.0)]
T = "channel:act3:2"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model(Tiny().eval(), input_size=32, resize_size=32)


@pytest.fixture(scope="module")
def refs():
    return torch.rand(3, 3, 36, 36, generator=torch.Generator().manual_seed(1))


def small(**kw):
    base = dict(stages=[(0.5, 2), (1.0, 3)], warmup=1, n_refs=3, quantiles=16, lr=0.1)
    base.update(kw)
    return Settings(**base)


def run(lm, refs, tmp_path, **kw):
    return visualize(lm, [T], {T: refs}, settings=small(**kw), class_layers=LAYERS, cache=DiskCache(str(tmp_path)))


def test_target_layer_enters_the_loss_only_when_weighted(lm, refs, tmp_path):
    off = run(lm, refs, tmp_path)
    on = run(lm, refs, tmp_path, channel_target_weight=2.0)
    assert [l for l, _ in off.layers[0]] == ["act1", "act2"]
    assert on.layers[0][-1] == ("act3", 2.0) and [l for l, _ in on.layers[0]] == ["act1", "act2", "act3"]
    assert not torch.equal(off.images, on.images)
    assert torch.isfinite(on.images).all()


def test_relevance_off_never_runs_lrp(lm, refs, tmp_path, monkeypatch):
    import vital_fast.references.relevance as relevance

    def boom(*a, **k):
        raise AssertionError("relevance must not run with channel_relevance=False")

    monkeypatch.setattr(relevance, "relevance_maps", boom)
    monkeypatch.setattr(relevance, "reference_relevance", boom)
    res = run(lm, refs, tmp_path, channel_relevance=False, channel_target_weight=1.0)
    assert torch.isfinite(res.images).all() and res.layers[0][-1] == ("act3", 1.0)


def test_relevance_off_matches_plain_prototypes(lm, refs, tmp_path):
    from vital_fast.oracle import sorted_prototype_reference as sorted_prototype
    from vital_fast.references.images import load_images
    from vital_fast.references.prototypes import _features, channel_references, prepare_inputs

    s = small(channel_relevance=False)
    imgs = load_images(refs)
    got = channel_references(lm, T, "act3", 2, imgs, record_layers=LAYERS[:2], size=16, settings=s,
                             cache=DiskCache(str(tmp_path)))
    assert got.importance == {}
    feats = _features(lm, prepare_inputs(lm, imgs, 16, 0, None), ["act1", "act2"])
    for l in ("act1", "act2"):
        torch.testing.assert_close(got.prototypes[l], sorted_prototype(feats[l], q=16))
    weighted = channel_references(lm, T, "act3", 2, imgs, record_layers=LAYERS[:2], size=16, settings=small(),
                                  cache=DiskCache(str(tmp_path)))
    assert set(weighted.importance) == {"act1", "act2"}  # a different cache entry, with relevance


def test_pooled_prototypes_are_the_quantiles_of_all_references_together(lm, refs, tmp_path):
    """Settings.channel_prototype="pooled": per channel, the quantiles of the K references' values taken as one
    row (the mixture of their distributions), with and without relevance; "mean" (the default) keeps the
    barycenter and its cache entry."""
    from vital_fast.oracle import resample_quantiles
    from vital_fast.references.images import load_images
    from vital_fast.references.prototypes import _features, channel_references, prepare_inputs

    imgs = load_images(refs)
    cache = DiskCache(str(tmp_path))

    def protos(**kw):
        return channel_references(lm, T, "act3", 2, imgs, record_layers=LAYERS[:2], size=16,
                                  settings=small(channel_relevance=False, **kw), cache=cache)

    mean, pooled = protos(), protos(channel_prototype="pooled")
    feats = _features(lm, prepare_inputs(lm, imgs, 16, 0, None), ["act1", "act2"])
    for l in ("act1", "act2"):
        f = feats[l].float()
        rows = f.transpose(0, 1).reshape(f.shape[1], -1).sort(-1).values  # (C, K·D): every reference's values
        torch.testing.assert_close(pooled.prototypes[l], resample_quantiles(rows, 16))
        assert not torch.allclose(pooled.prototypes[l], mean.prototypes[l])
    torch.testing.assert_close(protos().prototypes["act1"], mean.prototypes["act1"])
    rel = channel_references(lm, T, "act3", 2, imgs, record_layers=LAYERS[:2], size=16,
                             settings=small(channel_prototype="pooled"), cache=cache)
    assert rel.prototypes["act1"].shape == pooled.prototypes["act1"].shape and set(rel.importance) == {"act1", "act2"}
    with pytest.raises(ValueError, match="channel_prototype must be one of mean, pooled"):
        small(channel_prototype="median")


def test_to_dict_records_every_field_and_round_trips():
    """No neutral-value shims (issue 24): every field is recorded; the run identity carries a version instead."""
    import dataclasses

    d = Settings().to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(Settings)}
    s = Settings(channel_target_weight=3.0, channel_relevance=False, share_forward=False, rules_dtype="float32")
    assert Settings(**s.to_dict()) == s


def test_fourier_for_every_target_leaves_class_targets_as_auto_made_them(lm, refs, tmp_path):
    """The fast preset moved from param "auto" (Fourier for class targets, pixels for units) to "fourier" for
    every target: its class images are the ones "auto" made."""
    targets = {"class:1": refs, "class:3": refs}
    a = visualize(lm, list(targets), targets, settings=small(param="auto"), class_layers=LAYERS,
                  cache=DiskCache(str(tmp_path)))
    f = visualize(lm, list(targets), targets, settings=small(param="fourier"), class_layers=LAYERS,
                  cache=DiskCache(str(tmp_path)))
    assert torch.equal(a.images, f.images)


def test_channel_activation_weight_pushes_units_and_leaves_classes(lm, refs, tmp_path):
    """Settings.channel_activation_weight adds minus the unit's activation to a unit target's loss (class targets
    get nothing from it); 0 is the recipe without it."""
    from vital_fast.optim.methods import build_recipe

    targets = {"class:1": refs, "channel:act3:2": refs}
    base = small()
    assert "actmax" not in build_recipe("vital", base).objective.name
    pushed = base.replace(channel_activation_weight=1.0)
    assert "actmax(units)" in build_recipe("vital", pushed).objective.name.replace("[", "(").replace("]", ")")
    a = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    b = visualize(lm, list(targets), targets, settings=pushed, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    assert torch.equal(a.images[0], b.images[0])  # the class target: unchanged
    assert not torch.equal(a.images[1], b.images[1])  # the unit: pushed
    with pytest.raises(ValueError, match="channel_activation_weight must be >= 0.0"):
        base.replace(channel_activation_weight=-1.0)


def test_channel_activation_norm_scales_the_term_by_the_layers_width(lm, refs, tmp_path):
    """Settings.channel_activation_norm N scales a unit's activation term by N / C (C: its layer's channels, 8 for
    act3): N = 8 is the term unscaled, N = 16 at half the weight the same again (powers of two: bit-equal images),
    N = 4 a weaker push."""
    images = {}
    for w, n in ((1.0, 0), (1.0, 8), (0.5, 16), (1.0, 4)):
        images[w, n] = run(lm, refs, tmp_path, channel_relevance=False, channel_target_weight=1.0,
                           channel_activation_weight=w, channel_activation_norm=n).images
    assert torch.equal(images[1.0, 0], images[1.0, 8])
    assert torch.equal(images[1.0, 0], images[0.5, 16])
    assert not torch.equal(images[1.0, 0], images[1.0, 4])
    with pytest.raises(ValueError, match="channel_activation_norm must be >= 0"):
        small(channel_activation_norm=-1)
    with pytest.raises(ValueError, match="channel_norm must be a whole number"):
        ActMax(units_only=True, channel_norm=1.5)


def test_channel_activation_top_averages_the_strongest_positions(lm, refs, tmp_path):
    """Settings.channel_activation_top q: the activation term reads the mean of a channel's strongest q share of
    positions (1.0: the mean over all, the term as it was); the run takes it, and values outside (0, 1] are refused."""
    from types import SimpleNamespace

    from vital_fast.optim.objectives import StepContext
    from vital_fast.optim.targets import parse_target

    f = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    slots = [SimpleNamespace(target=parse_target(f"channel:act3:{c}")) for c in (2, 5)]
    ctx = StepContext(engine=SimpleNamespace(loaded=lm), slots=slots, image=f, view=torch.zeros(2, 3, 8, 8),
                      features={"act3": f})
    rows = f[[0, 1], [2, 5]].flatten(1)  # (2, 16)
    torch.testing.assert_close(ActMax(units_only=True)(ctx), -rows.mean(1))
    torch.testing.assert_close(ActMax(units_only=True, top=0.25)(ctx), -rows.topk(4, dim=1).values.mean(1))
    torch.testing.assert_close(ActMax(units_only=True, top=0.01)(ctx), -rows.max(1).values)
    all_, top = (run(lm, refs, tmp_path, channel_relevance=False, channel_target_weight=1.0,
                     channel_activation_weight=1.0, channel_activation_top=q).images for q in (1.0, 0.25))
    assert torch.isfinite(top).all() and not torch.equal(all_, top)
    with pytest.raises(ValueError, match=r"channel_activation_top must be in \(0, 1\]"):
        small(channel_activation_top=1.5)
    with pytest.raises(ValueError, match="ActMax top must be a share"):
        ActMax(units_only=True, top=0)


def test_class_logit_weight_pushes_classes_and_leaves_units(lm, refs, tmp_path):
    """Settings.class_logit_weight adds minus the class logit to a class target's loss (unit targets get nothing from
    it; their recorded plan has no logits); 0 is the recipe without it."""
    from vital_fast.optim.methods import build_recipe

    targets = {"class:1": refs, "channel:act3:2": refs}
    base = small()
    pushed = base.replace(class_logit_weight=1.0)
    assert "actmax[classes]" in build_recipe("vital", pushed).objective.name
    a = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    b = visualize(lm, list(targets), targets, settings=pushed, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    assert not torch.equal(a.images[0], b.images[0])  # the class: pushed
    assert torch.equal(a.images[1], b.images[1])  # the unit: unchanged
    assert a.layers[1] == b.layers[1]
    with pytest.raises(ValueError, match="class_logit_weight must be >= 0.0"):
        base.replace(class_logit_weight=-0.5)
    with pytest.raises(ValueError, match="exclude each other"):
        ActMax(units_only=True, classes_only=True)


def test_channel_later_weight_matches_the_layers_after_the_unit(lm, refs, tmp_path):
    """Settings.channel_later_weight adds the matched layers after a unit's own layer, at that weight, to its plan (and
    its loss); class targets keep theirs."""
    targets = {"class:1": refs, "channel:act2:2": refs}
    base = small().replace(channel_relevance=False)
    later = base.replace(channel_later_weight=0.5)
    with pytest.raises(ValueError, match="channel_later_weight needs channel_relevance=False"):
        later.replace(channel_relevance=True)
    a = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    b = visualize(lm, list(targets), targets, settings=later, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    assert a.layers[0] == b.layers[0] and torch.equal(a.images[0], b.images[0])
    added = [p for p in b.layers[1] if p not in a.layers[1]]
    assert added and all(w == 0.5 for _, w in added) and "act2" not in [l for l, _ in added]
    assert not torch.equal(a.images[1], b.images[1])


def test_channel_later_layers_keeps_the_first_n_after_the_unit(lm, refs, tmp_path):
    """Settings.channel_later_layers N keeps the first N matched layers after the unit (0: all of them)."""
    targets = {"channel:act1:2": refs}
    base = small().replace(channel_relevance=False, channel_later_weight=0.5)
    every = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    one = visualize(lm, list(targets), targets, settings=base.replace(channel_later_layers=1), class_layers=LAYERS,
                    cache=DiskCache(str(tmp_path)))
    assert [l for l, w in every.layers[0] if w == 0.5] == ["act2", "act3"]
    assert [l for l, w in one.layers[0] if w == 0.5] == ["act2"]
    assert not torch.equal(every.images[0], one.images[0])
    with pytest.raises(ValueError, match="channel_later_layers must be >= 0"):
        base.replace(channel_later_layers=-1)


def test_channel_later_stages_matches_later_layers_in_the_first_stages_only(lm, refs, tmp_path):
    """Settings.channel_later_stages N: a unit's later layers are matched in the first N stages only (the recorded
    plan still names them; 0: every stage)."""
    from vital_fast.optim.matching import SortMatch
    from vital_fast.optim.targets import parse_target

    targets = {"channel:act1:2": refs}
    base = small().replace(channel_relevance=False, channel_later_weight=0.5)
    first = base.replace(channel_later_stages=1)
    every = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    one = visualize(lm, list(targets), targets, settings=first, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    assert every.layers == one.layers and not torch.equal(every.images, one.images)
    sm = SortMatch(first, LAYERS)

    class _E:
        loaded = lm

    t = parse_target("channel:act1:2")
    assert [l for l, w in sm.plan(_E, t, 0) if w == 0.5] == ["act2", "act3"]
    assert [l for l, w in sm.plan(_E, t, 1) if w == 0.5] == []
    assert sm.plan(_E, t) == sm.plan(_E, t, 0)


def test_channel_later_every_matches_later_layers_at_every_nth_step(lm, refs, tmp_path, monkeypatch):
    """Settings.channel_later_every N: a unit's later layers are tapped and matched at every N-th step of a stage only,
    at N times their weight (the recorded plan still names them at their own weight); batched equals alone."""
    from vital_fast.optim import matching

    seen = []
    real = matching.SortMatch._groups_for

    def spy(self, ctx):
        groups = real(self, ctx)
        seen.append([(sl.step, [p for g in groups for p in g["layers"]]) for sl in ctx.slots])
        return groups

    monkeypatch.setattr(matching.SortMatch, "_groups_for", spy)
    targets = {"channel:act1:2": refs}
    base = small().replace(channel_relevance=False, channel_later_weight=0.5)
    every = visualize(lm, list(targets), targets, settings=base, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    seen.clear()
    two = visualize(lm, list(targets), targets, settings=base.replace(channel_later_every=2), class_layers=LAYERS,
                    cache=DiskCache(str(tmp_path)))
    assert every.layers == two.layers and [l for l, w in two.layers[0] if w == 0.5] == ["act2", "act3"]
    assert not torch.equal(every.images, two.images)
    steps = [s[0] for s in seen]
    assert [st for st, _ in steps] == [0, 1, 0, 1, 2]  # the stages' steps (2, then 3)
    for st, layers in steps:
        later = [(l, w) for l, w in layers if l in ("act2", "act3")]
        assert later == ([("act2", 1.0), ("act3", 1.0)] if st % 2 == 0 else [])
    with pytest.raises(ValueError, match="channel_later_every must be >= 1"):
        base.replace(channel_later_every=0)

    monkeypatch.setattr(matching.SortMatch, "_groups_for", real)
    s = base.replace(channel_later_every=2)
    both = {"channel:act1:2": refs, "channel:act2:3": refs}
    together = visualize(lm, list(both), both, settings=s, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
    for i, t in enumerate(both):
        alone = visualize(lm, [t], {t: refs}, settings=s, class_layers=LAYERS, cache=DiskCache(str(tmp_path)))
        torch.testing.assert_close(together.images[i], alone.images[0], rtol=0, atol=1e-6)


def test_channel_activation_rfs_reads_what_the_receptive_fields_cover(lm, refs, tmp_path):
    """Settings.channel_activation_rfs n: the activation term reads the strongest min(1, n (rf / side)^2) share of a
    channel's positions, rf the unit's receptive field measured at setup, scaled by the square root of that share at
    the model's input size; the run takes it; bad values are refused."""
    from types import SimpleNamespace

    from vital_fast.optim.objectives import StepContext
    from vital_fast.optim.targets import parse_target
    from vital_fast.references.mining import receptive_field

    f = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    slots = [SimpleNamespace(target=parse_target(f"channel:act3:{c}")) for c in (2, 5)]
    rows = f[[0, 1], [2, 5]].flatten(1)  # (2, 16)
    rf = receptive_field(lm, "act3", 32)
    assert 1 < rf < 32
    for side, n in ((32, 1.0), (32, 4.0), (16, 1.0), (8, 1.0)):
        ctx = StepContext(engine=SimpleNamespace(loaded=lm), slots=slots, image=f, view=torch.zeros(2, 3, side, side),
                          features={"act3": f})
        obj = ActMax(units_only=True, rfs=n)
        obj.setup(SimpleNamespace(loaded=lm), [s.target for s in slots])
        k = max(1, round(min(1.0, n * (rf / side) ** 2) * 16))
        scale = min(1.0, n * (rf / 32) ** 2) ** 0.5  # at the model's input size: the mean's gradient L2 norm
        torch.testing.assert_close(obj(ctx), -rows.topk(k, dim=1).values.mean(1) * scale)
        if side == 8:  # the receptive field covers the whole image: the mean
            assert k == 16
    state = torch.random.get_rng_state()
    receptive_field(lm, "act3", 32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the run's random stream alone
    all_, some, whole = (run(lm, refs, tmp_path, channel_relevance=False, channel_target_weight=1.0,
                             channel_activation_weight=1.0, channel_activation_rfs=n).images for n in (0.0, 1.0, 100.0))
    assert torch.isfinite(some).all() and not torch.equal(all_, some)
    assert torch.equal(all_, whole)  # receptive fields that cover the image: the mean, the run as without them
    with pytest.raises(ValueError, match=r"channel_activation_rfs must be >= 0"):
        small(channel_activation_rfs=-1.0)
    with pytest.raises(ValueError, match="give one of them"):
        ActMax(units_only=True, top=0.5, rfs=1.0)
