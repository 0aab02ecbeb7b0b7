"""Results on disk: files and manifest, atomic target folders, merge on a second save."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vital_fast import results
from vital_fast.optim import Settings, Target, VisualizationResult
from vital_fast.references.images import ImageSet


def fake_result(keys=("class:1", "channel:conv2:3")):
    targets = [Target("class", 1) if k.startswith("class") else Target("channel", 3, "conv2") for k in keys]
    B = len(targets)
    return VisualizationResult(
        targets=targets, images=torch.rand(B, 3, 16, 16), transparency=torch.rand(B, 1, 16, 16),
        losses=torch.rand(B, 5), settings=Settings(stages=[(1.0, 5)]), seeds=list(range(B)),
        references=[ImageSet([torch.rand(3, 20, 30)], ["a.png"], ["h"]) for _ in targets],
        layers=[[("conv1", 1.0)] for _ in targets], timings={"total_s": 1.0}, model_name="tiny", fingerprint="abc",
    )


def test_save_writes_every_file_listed_in_the_manifest(tmp_path):
    out = str(tmp_path / "run")
    m = results.save_result(fake_result(), out, seed=0)
    assert m["tool"] == "vital_fast" and m["model"] == {"name": "tiny", "fingerprint": "abc"}
    assert len(m["targets"]) == 2
    for t in m["targets"]:
        for rel in t["files"].values():
            assert os.path.isfile(os.path.join(out, rel)), rel
    assert json.load(open(os.path.join(out, "manifest.json")))["targets"][0]["losses"]
    from PIL import Image

    assert Image.open(os.path.join(out, m["targets"][0]["files"]["image_rgba"])).mode == "RGBA"
    # A second save of one target replaces it and keeps the other.
    m2 = results.save_result(fake_result(("class:1",)), out, seed=0)
    assert [t["key"] for t in m2["targets"]] == ["class:1", "channel:conv2:3"]
    assert not [f for f in os.listdir(os.path.join(out, "targets")) if f.startswith(".")]


def test_interrupted_target_write_leaves_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls = {"n": 0}
    real = results.save_png

    def flaky(arr, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(arr, path)

    monkeypatch.setattr(results, "save_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        results.save_result(fake_result(), out, seed=0)
    tdir = os.path.join(out, "targets")
    assert os.listdir(tdir) == []  # no half-written target, no temp folder
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ValueError, match="not a vital_fast run folder"):
        results.read_manifest(str(tmp_path))
