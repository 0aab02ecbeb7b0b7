"""Every setting from the command line (``--set NAME=VALUE``, ``--config FILE``), in a documented order
and recorded in the manifest; bad input exits 2 with one line and writes nothing. ``visualize(...,
progress=True)`` shows a tqdm bar, and runs without tqdm too."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from torch import nn

from vital_fast.cli.common import settings_from_args as _settings
from vital_fast.cli.main import build_parser, main
from vital_fast.models import load_model
from vital_fast.optim import Settings, get_preset, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, offline_photo_path, tensor_hash

SMALL = ["--size", "64", "--steps", "2", "--no-cache"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings-images")
    (root / "967").mkdir()
    shutil.copy(offline_photo_path("coffee"), root / "967" / "coffee.png")
    return root


def visualize_args(images, out, *extra):
    return ["visualize", "--model", "efficientnet-lite0", "--images", str(images), "--out", str(out),
            "--target", "class:967", *SMALL, *extra]


def parsed_settings(*extra, cmd=("visualize", "--model", "m", "--target", "class:1", "--images", ".", "--out", "o")):
    return _settings(build_parser().parse_args([*cmd, *extra]))


# ---------------------------------------------------------------------------------------------------
# Parsing and order, without a run


def test_set_parses_by_field_type():
    s = parsed_settings("--set", "lr=0.05", "--set", "warmup=3", "--set", "flip=no", "--set", "class_relevance=1",
                        "--set", "betas=[0.4, 0.8]", "--set", "stages=[[0.5, 3], [1, 5]]",
                        "--set", "lrp_composite=epsilon_plus")
    assert s.lr == 0.05 and isinstance(s.lr, float) and s.warmup == 3 and s.flip is False
    assert s.class_relevance is True and s.betas == (0.4, 0.8) and s.lrp_composite == "epsilon_plus"
    assert s.stages == [(0.5, 3), (1.0, 5)] and s.steps == 8


def test_order_preset_config_set_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = 0.01\nwarmup = 4\nlrp_every = 3\nstages = [[0.5, 10], [1.0, 30]]\n")
    # the config over the preset
    s = parsed_settings("--config", str(cfg))
    assert (s.lr, s.warmup, s.lrp_every, s.stages) == (0.01, 4, 3, [(0.5, 10), (1.0, 30)])
    assert s.n_refs == get_preset("fast").n_refs  # untouched fields keep the preset's
    # --set over the config, the later --set over the earlier one
    s = parsed_settings("--config", str(cfg), "--set", "lr=0.02", "--set", "lr=0.03")
    assert s.lr == 0.03 and s.warmup == 4
    # the dedicated flags over --set; --steps scales the stages the config gave
    s = parsed_settings("--config", str(cfg), "--set", "lrp_every=5", "--lrp-every", "2", "--steps", "4",
                        "--set", "channel_refs=image", "--channel-refs", "patch")
    assert s.lrp_every == 2 and s.channel_refs == "patch"
    assert s.stages == [(0.5, 1), (1.0, 3)] and s.steps == 4


def test_json_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rotate": 0, "flip": False, "betas": [0.5, 0.99], "n_refs": 4}))
    s = parsed_settings("--config", str(cfg))
    assert s.rotate == 0.0 and s.flip is False and s.betas == (0.5, 0.99) and s.n_refs == 4


def test_sweep_takes_set_and_config_too(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("quantiles = 64\n")
    s = parsed_settings("--config", str(cfg), "--set", "tv_l2=0.5",
                        cmd=("sweep", "--model", "m", "--layer", "x", "--images", ".", "--out", "o"))
    assert s.quantiles == 64 and s.tv_l2 == 0.5


# ---------------------------------------------------------------------------------------------------
# A real run records them; bad input exits 2 with one line and writes nothing


def test_set_and_config_land_in_the_manifest(images, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = 0.05\nflip = false\nn_refs = 1\nstages = [[1.0, 6]]\n")
    out = tmp_path / "run"
    code = main(visualize_args(images, out, "--config", str(cfg), "--set", "lr=0.07", "--set", "rotate=0"))
    err = capsys.readouterr().err
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    s = m["settings"]
    assert s["lr"] == 0.07 and s["flip"] is False and s["n_refs"] == 1 and s["rotate"] == 0.0
    assert [list(x) for x in s["stages"]] == [[1.0, 2]]  # --steps 2 scaled the config's stages
    assert m["run"]["settings"]["lr"] == 0.07
    assert all(len(t["losses"]) == 2 for t in m["targets"])


BAD = [
    (["--set", "nonsense=1"], ["unknown setting 'nonsense'", "valid:", "stages", "lr", "channel_refs"]),
    (["--set", "lr=fast"], ["lr", "float", "'fast'"]),
    (["--set", "warmup=2.5"], ["warmup", "int", "'2.5'"]),
    (["--set", "flip=perhaps"], ["flip", "bool", "'perhaps'"]),
    (["--set", "stages=[[1.0, 10]"], ["stages", "list of [float, int]"]),
    (["--set", "lr"], ["NAME=VALUE"]),
]


@pytest.mark.parametrize("extra, fragments", BAD, ids=[b[0][1] for b in BAD])
def test_bad_set_exits_2_in_one_line_writing_nothing(images, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    code = main(visualize_args(images, out, *extra))
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vital-fast: error:"), captured.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists() and captured.out == ""


@pytest.mark.parametrize("name, text, fragment", [
    ("bad.toml", "lr = \n", "not valid TOML"),
    ("bad.json", '{"lr": 0.1,}', "not valid JSON"),
    ("wrong.toml", 'lr = "fast"\n', "setting lr expects float, got 'fast'"),
    ("unknown.json", '{"learning_rate": 0.1}', "unknown setting 'learning_rate'; valid: stages"),
    ("list.json", "[1, 2]", "top level"),
    ("missing.toml", None, "no such file"),
])
def test_bad_config_exits_2_in_one_line_writing_nothing(images, tmp_path, capsys, name, text, fragment):
    cfg = tmp_path / name
    if text is not None:
        cfg.write_text(text)
    out = tmp_path / "run"
    code = main(visualize_args(images, out, "--config", str(cfg)))
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and str(cfg) in lines[0], captured.err
    assert not out.exists()


def test_toml_without_tomllib_or_tomli_says_what_to_do(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.9/3.10 without tomli
    monkeypatch.setitem(sys.modules, "tomli", None)
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = 0.1\n")
    code = main(visualize_args(images, tmp_path / "run", "--config", str(cfg)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "tomli" in lines[0] and "JSON" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_help_documents_the_order(capsys):
    assert main(["visualize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--set NAME=VALUE" in text and "--config FILE" in text
    assert "the preset, then --config, then each --set, then --steps" in text


# ---------------------------------------------------------------------------------------------------
# progress=True in the Python API


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.act1(self.conv1(x)))).flatten(1))


def _tiny_run(tmp_path, progress, method="vital"):
    torch.manual_seed(0)
    m = load_model(Tiny(), input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 32, generator=g) for _ in range(2)]
    refs = {"class:1": ImageSet(imgs, ["a", "b"], [tensor_hash(i) for i in imgs])}
    s = Settings(stages=[(1.0, 4)], lr=0.1, warmup=1, n_refs=2, quantiles=16)
    return visualize(m, ["class:1"], refs, settings=s, class_layers=[("conv1", 1.0), ("conv2", 1.0)],
                     cache=DiskCache(str(tmp_path / "cache")), progress=progress, method=method)


def test_progress_true_shows_a_tqdm_bar(tmp_path, capsys):
    pytest.importorskip("tqdm")
    res = _tiny_run(tmp_path, True)
    err = capsys.readouterr().err
    assert res.losses.shape == (1, 4)
    assert "visualize" in err and "4/4" in err and "100%" in err and "loss=" in err, err


def test_progress_true_without_tqdm_still_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # "not installed"
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    res = _tiny_run(tmp_path, True)
    err = capsys.readouterr().err
    assert res.losses.shape == (1, 4)
    assert "visualize: step 4/4 (100%)" in err, err


def test_progress_off_and_callable(tmp_path, capsys):
    _tiny_run(tmp_path, False)
    assert capsys.readouterr().err == ""
    seen = []
    _tiny_run(tmp_path, lambda step, total, losses: seen.append((step, total, tuple(losses.shape))))
    assert seen == [(4, 4, (1,))]  # at each read of the losses: every loss_every (10) steps and at the end
    with pytest.raises(TypeError, match="progress must be"):
        _tiny_run(tmp_path, "yes")


def test_progress_true_for_a_baseline(tmp_path, capsys):
    pytest.importorskip("tqdm")
    _tiny_run(tmp_path, True, method="fourier")
    err = capsys.readouterr().err
    assert "fourier" in err and "4/4" in err, err


def test_channel_relevance_flag_and_a_note_when_lrp_every_does_nothing(capsys):
    fast = parsed_settings()
    assert fast.channel_relevance is False and fast.channel_target_weight == 1.0 and fast.param == "fourier"
    parsed_settings("--lrp-every", "3")
    assert "--lrp-every 3 has no effect" in capsys.readouterr().err
    s = parsed_settings("--lrp-every", "3", "--channel-relevance")
    # relevance starts at the unit's layer: the fast preset's matched layers after it are left out, with a note
    assert s.channel_relevance is True and s.lrp_every == 3 and s.channel_later_weight == 0.0
    err = capsys.readouterr().err
    assert "--channel-relevance leaves out the matched layers after the unit" in err and "no effect" not in err
    paper = parsed_settings("--preset", "paper")
    assert paper.channel_relevance is True and paper.channel_target_weight == 0.0 and paper.param == "pixel"


@pytest.mark.parametrize("kw, msg", [
    (dict(param="foo"), "unknown parametrization 'foo'; valid: fourier, maco, pixel"),
    (dict(quantiles=0), "setting quantiles must be >= 2, got 0"),
    (dict(amp="fp8"), "unknown amp 'fp8'; valid: off, bf16, fp16, auto"),
    (dict(lr="a"), "setting lr expects float, got 'a'"),
    (dict(lr=0.0), "setting lr must be > 0"),
    (dict(flip=1), "setting flip expects bool, got 1"),
    (dict(stages=[(1.0, 0)]), "setting stages needs scales > 0 and steps >= 0"),
    (dict(betas=(0.5, 1.0)), r"setting betas must be two numbers in \[0, 1\)"),
    (dict(lrp_composite="zplus"), "setting lrp_composite must be one of paper, epsilon_plus, epsilon_plus_flat"),
])
def test_settings_refuse_every_invalid_field_at_construction(kw, msg):
    """The API checks what the CLI checks, with the same declarations (one place: vital_fast.optim.presets)."""
    from vital_fast.optim import Settings

    with pytest.raises(ValueError, match=msg):
        Settings(**kw)
    with pytest.raises(ValueError, match=msg):
        Settings().replace(**kw)
