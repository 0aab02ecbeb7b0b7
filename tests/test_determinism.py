"""The same command and seed give the same image, whatever the thread timing and the batch.

Reported: one single-target command run four times gave three different images (up to 19/255 per
pixel); a target alone and in a batch differed by up to 26/255. Cause: PyTorch sends the small
float32 convolutions of a *one-element* CPU batch (the pointwise convolutions of late EfficientNet
blocks) to its native ``_slow_conv2d`` path, whose multi-threaded MKL GEMMs sum in an order set by
the thread schedule; batches of two or more go to oneDNN. Measured here before the fix: one
target at 2 against 3 threads, and alone against in a batch, differed by up to 253/255 after the
fast preset's 150 steps, and the batch check below differed by up to 111/255 (class) and 177/255
(channel). One-element CPU batches now run padded to two (``vital_fast/models/batching.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vital_fast.models.batching import pad_batch, unpad
from vital_fast.references.images import offline_photo_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pad_batch_only_pads_one_element_cpu_batches():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    xp = pad_batch(x)
    assert xp.shape[0] == 2 and torch.equal(xp[0], xp[1])
    xp.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the copy carries no gradient back
    y = torch.randn(3, 3, 4, 4)
    assert pad_batch(y) is y
    out = unpad({"a": torch.zeros(2, 5), "b": torch.zeros(7, 2)}, 1, 2)
    assert out["a"].shape == (1, 5) and out["b"].shape == (7, 2)


def _env():
    """Two threads, this checkout first on the path, the backend chosen as by default."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "2"
    # Idle threads sleep instead of spinning: on a busy 2-core machine spinning makes a 2-thread run
    # ten times slower (45 s against 5 s here). Only the timing changes, never the arithmetic.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("VITAL_FAST_BACKEND", None)
    return env


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_same_visualize_command_gives_byte_identical_images(tmp_path):
    """Three runs of one single-target command in separate processes (so with different thread
    timings), two threads each: byte-identical images (about 15 s on 2 cores)."""
    images = tmp_path / "images"
    (images / "967").mkdir(parents=True)
    shutil.copy(offline_photo_path("coffee"), images / "967" / "coffee.png")
    env = _env()
    digests = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        cmd = [sys.executable, "-m", "vital_fast", "visualize", "--model", "efficientnet-lite0",
               "--target", "class:967", "--images", str(images), "--out", str(out),
               "--steps", "16", "--size", "64", "--seed", "3", "--no-cache"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        pngs = sorted(p for p in os.listdir(out / "targets" / "class__967") if p.endswith(".png"))
        assert "image.png" in pngs
        digests.append({p: _digest(out / "targets" / "class__967" / p) for p in pngs})
    assert digests[0] == digests[1] == digests[2]


_ALONE_AND_IN_A_BATCH = """
import torch
from vital_fast.models import load_model
from vital_fast.optim import visualize
from vital_fast.optim.presets import get_preset
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import load_images, offline_photo_path

lite0 = load_model("efficientnet-lite0")
refs = {"class:967": load_images([offline_photo_path("coffee")]),
        "channel:_blocks.4:5": load_images([offline_photo_path("rocket"), offline_photo_path("china")])}
kw = dict(settings=get_preset("fast").replace(stages=[(0.5, 6), (1.0, 6)], warmup=2), seed=1, size=64,
          cache=DiskCache(enabled=False))
alone = {k: visualize(lite0, [k], {k: refs[k]}, **kw).images[0] for k in refs}
both = visualize(lite0, list(refs), refs, **kw).images
for i, k in enumerate(refs):
    print(k, "equal" if torch.equal(alone[k], both[i]) else
          f"differ by up to {float((alone[k] - both[i]).abs().max()) * 255:.2f}/255")
"""


@pytest.mark.slow
def test_a_target_alone_equals_the_target_in_a_batch():
    """A class target and a channel target, each alone and both in one batch, on two threads: the
    same images, bit for bit (every network call runs with two elements either way, so oneDNN
    takes the same algorithms on any CPU). About 15 s on 2 cores."""
    res = subprocess.run([sys.executable, "-c", _ALONE_AND_IN_A_BATCH], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines == ["class:967 equal", "channel:_blocks.4:5 equal"], res.stdout
