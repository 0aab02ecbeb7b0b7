"""The one engine: parametrizations, composable objectives, the method registry, bad input.

Objectives compose to the sums they name; an objective of the wrong shape and unknown names stop
before any step with the valid choices listed; VITAL runs on any parametrization; a user's recipe
and a user's objective run through ``visualize``; the CLI takes ``--param`` and records it.
"""

from __future__ import annotations

import json

import pytest
import torch

from vital_fast.models import load_model
from vital_fast.optim import (METHODS, ActMax, ImagePriors, Objective, Settings, build_recipe, objective,
                              register_method, visualize)
from vital_fast.optim.engine import Engine
from vital_fast.optim.objectives import L2, StepContext, TotalVariation
from vital_fast.optim.parametrizations import Fourier, get_parametrization
from vital_fast.references.cache import DiskCache

from _util import TinyNet, tiny_loaded, tiny_refs


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded()


@pytest.fixture(scope="module")
def refs():
    return tiny_refs()


def small(**kw):
    base = dict(stages=[(0.5, 3), (1.0, 4)], warmup=1, n_refs=3, quantiles=16, lr=0.1)
    base.update(kw)
    return Settings(**base)


def _never(*a):
    raise AssertionError("no step may run")


def test_objectives_compose_to_the_sums_they_name(lm):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    ctx = StepContext(engine=None, slots=[None, None], image=img, view=img)
    tv, l2 = TotalVariation(2), L2()
    assert torch.allclose((tv + 0.5 * l2)(ctx), tv(ctx) + 0.5 * l2(ctx))
    assert torch.allclose((tv - l2)(ctx), tv(ctx) - l2(ctx))
    assert torch.allclose((-tv)(ctx), -tv(ctx))
    assert torch.allclose((tv / 4)(ctx), tv(ctx) / 4)
    assert torch.allclose(sum([tv, l2, tv])(ctx), 2 * tv(ctx) + l2(ctx))
    assert torch.allclose(ImagePriors(tv_l2=2.0, l2=0.5)(ctx), 2 * tv(ctx) + 0.5 * l2(ctx))
    assert (tv + 0.1 * l2).name == "tv_l2 + 0.1 * l2"
    with pytest.raises(TypeError, match="number"):
        tv * "a"
    with pytest.raises(TypeError, match="objectives compose with objectives"):
        tv + 1.5


def test_wrong_shape_fails_before_the_first_step(lm):
    @objective(layers=["conv1"])
    def scalar(ctx):
        return ctx.features["conv1"].mean()

    with pytest.raises(ValueError, match=r"returned shape \(\).*one value per batch element, shape \(2,\)"):
        visualize(lm, ["class:1", "class:2"], objective=scalar, settings=small(), progress=_never)

    @objective(layers=["conv1"])
    def per_channel(ctx):
        return ctx.features["conv1"].mean((2, 3))

    with pytest.raises(ValueError, match=r"returned shape \(1, 8\)"):
        visualize(lm, ["class:1"], objective=per_channel, settings=small(), progress=_never)
    # the image is untouched: nothing stepped (a composed objective checks each part too)
    with pytest.raises(ValueError, match=r"objective scalar returned shape"):
        visualize(lm, ["class:1"], objective=ActMax() + scalar, settings=small(), progress=_never)


@pytest.mark.parametrize("kw, fragment", [
    (dict(method="vitall"), "unknown method 'vitall'; valid: vital, actmax, fourier, maco, bnstats"),
    (dict(param="wavelet"), "unknown parametrization 'wavelet'; valid: fourier, maco, pixel"),
    (dict(method="actmax", options={"lr2": 1}), "unknown actmax options ['lr2']"),
    (dict(objective="maximize"), "unknown objective 'maximize'; valid: sort_match, actmax, bnstats, priors"),
    (dict(objective=3), "objective must be an Objective"),
])
def test_unknown_names_list_the_valid_ones(lm, refs, kw, fragment):
    with pytest.raises(ValueError) as exc:
        visualize(lm, ["class:1"], {"class:1": refs}, settings=small(), progress=_never, **kw)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("param", ["pixel", "fourier", "maco"])
def test_vital_runs_on_every_parametrization(lm, refs, tmp_path, param):
    res = visualize(lm, ["class:1", "channel:conv2:3"], {"class:1": refs, "channel:conv2:3": refs},
                    settings=small(), param=param, cache=DiskCache(str(tmp_path)))
    assert res.images.shape == (2, 3, 32, 32) and res.transparency.shape == (2, 1, 32, 32)
    assert res.images.min() >= 0 and res.images.max() <= 1 and torch.isfinite(res.losses).all()
    assert res.losses.shape == (2, 7) and res.param["name"] == param
    assert res.method == ("vital" if param == "pixel" else f"vital+{param}")
    # batched equals alone, on every parametrization
    alone = visualize(lm, ["channel:conv2:3"], {"channel:conv2:3": refs}, settings=small(), param=param,
                      cache=DiskCache(str(tmp_path)))
    diff = (alone.images[0] - res.images[1]).abs()
    # Up to rounding: convolutions (and maco's batched FFT) round by batch size, and Adam's first
    # steps turn a near-zero gradient's sign into a full step (with one thread a few maco pixels exceed 2e-3).
    assert diff.mean() < 5e-4 and diff.max() < 2e-2, (diff.mean(), diff.max())


def test_fourier_parametrization_renders_in_unit_range_and_keeps_final_size(lm):
    p = get_parametrization("fourier", decay_power=1.5)
    assert isinstance(p, Fourier) and p.decay_power == 1.5 and not p.per_stage
    with pytest.raises(ValueError, match="parametrization 'fourier'"):
        get_parametrization("fourier", sigma=2)
    g = torch.Generator().manual_seed(0)
    bufs = p.init(g, 16, 32, lm, None)
    img = p.render(bufs["p"], {}, lm)
    assert img.shape == (1, 3, 32, 32) and 0 <= img.min() and img.max() <= 1


def test_a_users_objective_raises_what_it_asks_for(lm):
    @objective(layers=["conv2"])
    def channel5(ctx):
        return -ctx.features["conv2"][:, 5].flatten(1).mean(1)

    s = small(stages=[(1.0, 25)], lr=0.05, flip=False, jitter=0.0)
    res = visualize(lm, ["class:0"], objective=channel5 + 0.01 * L2(), settings=s)
    assert res.method == "custom:channel5 + 0.01 * l2"
    assert res.losses[0, -5:].mean() < res.losses[0, :5].mean()
    x = lm.normalize(res.images)
    with torch.no_grad():
        f = lm.model.conv2(lm.model.act1(lm.model.conv1(x)))
        f0 = lm.model.conv2(lm.model.act1(lm.model.conv1(lm.normalize(torch.full_like(res.images, 0.5)))))
    assert f[:, 5].mean() > f0[:, 5].mean()


def test_a_registered_method_runs_through_visualize(lm):
    def build(settings, options, param, context):
        recipe = build_recipe("actmax", settings, param=param, options={"tv_l2": options["tv"]})
        recipe.method = "my-actmax"
        return recipe

    register_method("my-actmax", build, options={"tv": 1.0}, param="pixel")
    try:
        assert "my-actmax" in METHODS
        res = visualize(lm, ["class:2"], method="my-actmax", settings=small(), options={"tv": 2.0})
        assert res.method == "my-actmax" and res.settings.baseline["tv_l2"] == 2.0
        with pytest.raises(ValueError, match=r"unknown my-actmax options \['lr'\]"):
            visualize(lm, ["class:2"], method="my-actmax", settings=small(), options={"lr": 1.0})
    finally:
        METHODS.pop("my-actmax", None)


def test_refilled_slot_equals_a_fixed_batch(lm, refs, tmp_path):
    """A target that enters a slot after another finished gets the image it gets in a fixed batch."""
    s = small()
    recipe = build_recipe("actmax", s)
    eng = Engine(lm, recipe, seed=4, final_size=32)
    eng.setup([])
    from vital_fast.optim.targets import parse_target

    a, b, c = (parse_target(k) for k in ("class:1", "class:2", "class:3"))
    first, second = eng.new_slot(a), eng.new_slot(b)
    for _ in range(3):
        eng.tick([first, second])
    third = eng.new_slot(c)  # joins while the others are in their second stage
    while not third.done:
        eng.tick([sl for sl in (first, second, third) if not sl.done])
    fixed = visualize(lm, ["class:3"], method="actmax", settings=s, seed=4)
    # equal up to convolution rounding, which differs with the batch size on some CPUs' oneDNN kernels
    assert torch.allclose(eng.image(third), fixed.images[0], atol=2e-3)
    assert third.losses == pytest.approx(fixed.losses[0].tolist(), rel=1e-2, abs=1e-4)


def test_an_objective_by_name(lm):
    res = visualize(lm, ["class:2"], objective="actmax", settings=small())
    assert res.method == "custom:actmax" and res.losses.shape == (1, 7)


def test_objective_subclass_contract():
    class Bad(Objective):
        name = "bad"

    with pytest.raises(NotImplementedError):
        Bad()(None)


def test_cli_param(tmp_path, capsys):
    from vital_fast.cli.main import main

    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--param", "wavelet"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown parametrization 'wavelet'; valid: fourier, maco, pixel" in err
    assert not (tmp_path / "o").exists()
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--method", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown method 'nope'; valid: vital, actmax" in err


def test_vital_param_has_one_home_in_the_settings(lm, refs, tmp_path):
    """``param=NAME`` for VITAL is ``Settings.param``: the recorded settings say which image ran (issue 24), and the
    two ways to ask give the same images; a baseline's settings are left alone."""
    fast = small().replace(param="fourier")
    cache = DiskCache(str(tmp_path))
    asked = visualize(lm, ["class:1"], {"class:1": refs}, settings=fast, param="pixel", cache=cache, seed=3)
    set_ = visualize(lm, ["class:1"], {"class:1": refs}, settings=fast.replace(param="pixel"), cache=cache, seed=3)
    assert asked.settings.param == "pixel" and asked.param["name"] == "pixel" and asked.method == "vital"
    assert torch.equal(asked.images, set_.images)
    four = visualize(lm, ["class:1"], {"class:1": refs}, settings=small(), param="fourier", cache=cache, seed=3)
    assert four.settings.param == "fourier" and four.method == "vital+fourier"
    base = visualize(lm, ["class:1"], {"class:1": refs}, settings=small(), method="actmax", param="fourier",
                     cache=cache, seed=3)
    assert base.settings.param == small().param and base.method == "actmax+fourier"


def test_cli_param_recorded(tmp_path, capsys):
    """``--param fourier`` runs VITAL on a Fourier image and records ``vital+fourier``."""
    import shutil

    from vital_fast.cli.main import main
    from vital_fast.references.images import offline_photo_path

    (tmp_path / "img" / "967").mkdir(parents=True)
    shutil.copy(offline_photo_path("coffee"), tmp_path / "img" / "967" / "coffee.png")
    out = tmp_path / "o"
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images",
                 str(tmp_path / "img"), "--out", str(out), "--param", "fourier", "--size", "32", "--steps", "2",
                 "--cache", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "vital+fourier" and m["run"]["method"] == "vital+fourier"
    # the same folder with pixels is another run: refused, nothing lost
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images",
                 str(tmp_path / "img"), "--out", str(out), "--size", "32", "--steps", "2", "--resume",
                 "--cache", str(tmp_path / "c")])
    assert code == 2 and "vital+fourier" in capsys.readouterr().err


# --- mixed precision (Settings.amp, --amp) ---------------------------------------------------------

@pytest.mark.parametrize("amp, name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_amp_runs_the_network_in_half_and_keeps_the_image_float32(lm, refs, tmp_path, amp, name):
    ref = visualize(lm, ["class:1", "channel:conv2:3"], {"class:1": refs, "channel:conv2:3": refs},
                    settings=small(), cache=DiskCache(str(tmp_path)))
    half = visualize(lm, ["class:1", "channel:conv2:3"], {"class:1": refs, "channel:conv2:3": refs},
                     settings=small(amp=amp), cache=DiskCache(str(tmp_path)))
    assert ref.precision == "float32" and half.precision == name
    assert half.images.dtype == torch.float32 and half.losses.dtype == torch.float32
    assert torch.isfinite(half.losses).all()
    # the same optimization, rounded differently: the first step's losses agree to half precision
    assert torch.allclose(half.losses[:, 0], ref.losses[:, 0], rtol=0.05, atol=1e-3)
    assert half.settings.to_dict()["amp"] == amp and ref.settings.to_dict()["amp"] == "off"


def test_amp_choices_and_auto(monkeypatch):
    from vital_fast.optim import precision

    with pytest.raises(ValueError, match="unknown amp 'bf32'; valid: off, bf16, fp16, auto"):
        precision.resolve_amp("bf32", "cpu")
    assert precision.resolve_amp("off", "cpu") is None and precision.resolve_amp(None, "cpu") is None
    # auto: float32 on every CPU, AMX or not (measured: no end-to-end gain on lite0, see precision.py)
    assert precision.resolve_amp("auto", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_amp("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_amp("auto", "cuda") is torch.float16
    from vital_fast.optim import get_preset

    assert get_preset("fast").amp == "auto" and get_preset("paper").amp == "off"
    with pytest.raises(ValueError, match="unknown amp"):
        visualize(load_model(TinyNet().eval(), input_size=32, resize_size=32), ["class:1"], method="actmax",
                  settings=small(amp="bf32"), progress=_never)


@pytest.mark.parametrize("device, fragment", [
    ("cuda:7", "CUDA"), ("tpu", "not a torch device"), ("cpu", None),
])
def test_cli_device_and_amp_errors(tmp_path, capsys, device, fragment):
    from vital_fast.cli.main import main

    args = ["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(tmp_path),
            "--out", str(tmp_path / "o"), "--device", device, "--steps", "1"]
    if fragment is None:  # a valid device and an amp value argparse refuses
        args += ["--amp", "bf32"]
        fragment = "--amp"
    code = main(args)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("vital-fast: error")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "o").exists()


def test_channel_references_are_mined_from_a_pool(lm, tmp_path):
    """``pool=`` mines a channel target's references (what the CLI does); a bare folder is refused."""
    from vital_fast.references.images import load_images
    from vital_fast.references.mining import channel_reference_images, mine_topk
    from vital_fast.report.pngs import save_png, to_uint8

    g = torch.Generator().manual_seed(5)
    folder = tmp_path / "pool"
    folder.mkdir()
    for i in range(5):
        save_png(to_uint8(torch.rand(3, 40, 40, generator=g)), str(folder / f"{i}.png"))
    s = small(n_refs=3, channel_refs="image")
    cache = DiskCache(str(tmp_path / "c"))
    got = visualize(lm, ["channel:conv2:3"], pool=str(folder), settings=s, cache=cache)
    pool = load_images(str(folder))
    top = mine_topk(lm, "conv2", pool, [3], 3, 32, cache)
    refs = channel_reference_images(lm, top, pool, "image", 32)[3]
    assert list(got.references[0].names) == list(refs.names) and len(refs) == 3
    want = visualize(lm, ["channel:conv2:3"], {"channel:conv2:3": refs}, settings=s, cache=cache)
    assert torch.equal(got.images, want.images)
    with pytest.raises(ValueError, match=r"given the folder .* pass pool="):
        visualize(lm, ["channel:conv2:3"], {"channel:conv2:3": str(folder)}, settings=s, progress=_never)


def test_settings_param_auto_gives_each_kind_its_parametrization(lm, refs, tmp_path):
    """``Settings.param="auto"``: class targets on a Fourier image, channel targets on pixels, in one
    batch; each equals its own single-parametrization run."""
    cache = DiskCache(str(tmp_path))
    both = {"class:1": refs, "channel:conv2:3": refs}
    auto = visualize(lm, list(both), both, settings=small(param="auto"), cache=cache)
    four = visualize(lm, ["class:1"], both, settings=small(), param="fourier", cache=cache)
    pix = visualize(lm, ["channel:conv2:3"], both, settings=small(), cache=cache)
    assert torch.allclose(auto.images[0], four.images[0], atol=1e-4)
    assert torch.allclose(auto.images[1], pix.images[0], atol=1e-4)
    assert auto.method == "vital" and auto.settings.to_dict()["param"] == "auto"
    assert auto.param == {"per_kind": {"channel": {"name": "pixel", "init_std": 1.0},
                                       "class": {"name": "fourier", "decay_power": 1.0, "init_std": 0.01}}}
    # an explicit param= wins over the settings' choice, for every target
    forced = visualize(lm, list(both), both, settings=small(param="auto"), param="pixel", cache=cache)
    assert forced.param["name"] == "pixel"
    with pytest.raises(ValueError, match="unknown parametrization 'wavelet'"):
        visualize(lm, ["class:1"], both, settings=small(param="wavelet"), progress=_never)
