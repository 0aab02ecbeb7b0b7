"""Class names from the model's own metadata (never ImageNet's put on another label space), and
``--images py:MODULE:NAME``: a torch Dataset as the mining pool from the command line."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from vital_fast.cli.main import main
from vital_fast.cli.jobs import labels_for
from vital_fast.models import load_model
from vital_fast.models.labels import check_labels, class_label, imagenet_labels, read_labels
from vital_fast.optim import Target

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _thousand():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))


def test_names_come_from_the_weights_metadata():
    pytest.importorskip("efficientnet_lite_pytorch")
    lite = load_model("efficientnet-lite0", weights="random")
    assert lite.class_names is not None and len(lite.class_names) == 1000
    assert lite.class_label(285) == imagenet_labels()[285]
    from torchvision.models import get_model_weights

    rn = load_model("torchvision:resnet18", weights="random")
    assert list(rn.class_names) == list(get_model_weights("resnet18").DEFAULT.meta["categories"])
    assert labels_for(rn, [Target("class", 1)])["class:1"] == f"1 {rn.class_names[1]}"


def test_a_module_with_1000_outputs_gets_no_imagenet_names():
    lm = load_model(_thousand())
    assert lm.num_classes == 1000 and lm.class_names is None
    assert labels_for(lm, [Target("class", 285), Target("channel", 2, "0")]) == {
        "class:285": "class:285", "channel:0:2": "0 channel 2"}
    assert lm.class_label(285) == "class 285"


def test_user_labels_list_and_files(tmp_path):
    names = [f"thing {i}" for i in range(1000)]
    lm = load_model(_thousand(), labels=names)
    assert lm.class_names[7] == "thing 7" and labels_for(lm, [Target("class", 7)])["class:7"] == "7 thing 7"
    txt = tmp_path / "names.txt"
    txt.write_text("\n".join(names) + "\n\n")
    assert load_model(_thousand(), labels=str(txt)).class_names == tuple(names)
    js = tmp_path / "names.json"
    js.write_text(json.dumps(names))
    assert read_labels(js) == names
    with pytest.raises(ValueError, match="3 labels for a model with 1000 outputs"):
        load_model(_thousand(), labels=["a", "b", "c"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no class names"):
        read_labels(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text('{"0": "x"}')
    with pytest.raises(ValueError, match="JSON list"):
        read_labels(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such file"):
        check_labels(str(tmp_path / "missing.txt"), 10)
    with pytest.raises(ValueError, match="strings"):
        check_labels([1, 2], None)
    assert class_label(None, 3) == "class 3" and class_label(["a"], 5) == "class 5"


DATASET_PY = '''
import torch

class Photos(torch.utils.data.Dataset):
    fingerprint = "photos-v1"

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 40, 48, generator=g), i

def make():
    return Photos()

class Bad(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.rand(40, 48, 3)
'''


@pytest.fixture()
def dataset_file(tmp_path):
    p = tmp_path / "mydata.py"
    p.write_text(DATASET_PY)
    return p


def _cli(tmp_path, *extra):
    return ["visualize", "--model", "py:test_sweep:tiny_loaded", "--size", "32", "--steps", "2", "--batch", "2",
            "--set", "n_refs=3", "--set", "ref_crops=2", "--set", "quantiles=16", "--no-cache", "--workers", "0",
            *extra]


def test_cli_mines_channels_from_a_dataset(tmp_path, dataset_file):
    out = tmp_path / "run"
    rc = main(_cli(tmp_path, "--images", f"py:{dataset_file}:make", "--target", "channel:conv3:1",
                   "--target", "channel:conv3:4", "--out", str(out)))
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [t["key"] for t in m["targets"]] == ["channel:conv3:1", "channel:conv3:4"]
    assert all(t["label"] == f"conv3 channel {t['index']}" for t in m["targets"])


def test_cli_labels_file_names_class_targets(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "3").mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((g.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / "3" / f"{i}.png")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"tool {i}" for i in range(10)))
    out = tmp_path / "run"
    assert main(_cli(tmp_path, "--images", str(root), "--target", "class:3", "--labels", str(names),
                     "--out", str(out))) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["targets"][0]["label"] == "3 tool 3"
    assert all(p[1] == f"tool {p[0]}" for p in m["targets"][0]["predictions"])


@pytest.mark.parametrize("spec, needle", [
    ("py:no_such_module_xyz:make", "cannot import no_such_module_xyz"),
    ("py:{f}:nothing", "has no attribute 'nothing'"),
    ("py:{f}", "expected py:MODULE:NAME"),
    ("py:{f}:Bad", "must be (3, H, W)"),
])
def test_cli_bad_dataset_specs_fail_in_one_line(tmp_path, dataset_file, capsys, spec, needle):
    out = tmp_path / "run"
    spec = spec.format(f=dataset_file)
    rc = main(_cli(tmp_path, "--images", spec, "--target", "channel:conv3:1", "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert not out.exists()


def test_cli_wrong_label_count_and_class_target_on_a_dataset(tmp_path, dataset_file, capsys):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    rc = main(_cli(tmp_path, "--images", f"py:{dataset_file}:make", "--target", "channel:conv3:1", "--labels",
                   str(names), "--out", str(tmp_path / "r1")))
    assert rc == 2 and "2 labels for a model with 10 outputs" in capsys.readouterr().err
    rc = main(_cli(tmp_path, "--images", f"py:{dataset_file}:make", "--target", "class:3",
                   "--out", str(tmp_path / "r2")))
    assert rc == 2 and "class targets need a folder" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def test_missing_class_folders_say_what_to_do(tmp_path):
    from vital_fast.references.images import class_image_folder, missing_class_message

    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01443537").mkdir()
    # two WordNet-id folders: their order says nothing, but each id names its ImageNet-1k class (timm's table)
    assert class_image_folder(str(tmp_path), 1) == (str(tmp_path / "n01443537") if _has_timm() else None)
    msg = missing_class_message(str(tmp_path), 5)
    assert ("ImageNet-1k's class 5 is n01496331" in msg if _has_timm() else "not ImageNet-1k's 1,000" in msg)
    assert "wnids.txt" in msg
    (tmp_path / "wnids.txt").write_text("n01440764\nn01443537\nn09999999\n")
    assert class_image_folder(str(tmp_path), 1) == str(tmp_path / "n01443537")
    assert "maps it to the WordNet id n09999999, but there is no folder" in missing_class_message(str(tmp_path), 2)
    assert "lists 3 classes (0-2); class 7 is not among them" in missing_class_message(str(tmp_path), 7)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "expected a subfolder" in missing_class_message(str(empty), 4)
