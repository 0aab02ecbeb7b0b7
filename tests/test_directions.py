"""Direction and neuron targets: a one-hot direction is the channel it names (references, relevance and
image), directions and neurons run end to end through visualize, the CLI and sweeps, and bad directions
fail before any work in one line."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from vital_fast.cli.main import main
from vital_fast.optim import Settings, Target, visualize
from vital_fast.optim.directions import Direction, load_directions, save_directions
from vital_fast.optim.targets import direction_target, parse_target
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, tensor_hash
from vital_fast.references.mining import Units, mine_topk

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from test_optim import tiny_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:relevance_maps:UserWarning"), pytest.mark.usefixtures("one_thread")]


def _pool(n=10):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 40, 48, generator=g) for _ in range(n)]
    return ImageSet(imgs, [f"img{i}" for i in range(n)], [tensor_hash(x) for x in imgs])


def _settings(**kw):
    base = dict(stages=[(0.5, 2), (1.0, 3)], lr=0.1, warmup=1, n_refs=3, ref_crops=2, quantiles=16, jitter=0.1)
    base.update(kw)
    return Settings(**base)


def test_a_one_hot_direction_is_the_channel_it_names():
    lm = tiny_model()
    pool = _pool()
    onehot = torch.zeros(16)
    onehot[5] = 1.0
    d = direction_target("conv3", onehot)
    ch = Target("channel", 5, "conv3")
    assert d.canonical() == ch and d.seed(3) == ch.seed(3)
    # references: mining by projection picks the same images, scores and locations
    a = mine_topk(lm, "conv3", pool, [5], 4, 32)
    b = mine_topk(lm, "conv3", pool, [0], 4, 32, units=Units(onehot[None], torch.zeros(1)))
    assert torch.equal(a.index, b.index) and torch.equal(a.score, b.score) and torch.equal(a.loc, b.loc)
    # the image (references mined, relevance-weighted prototypes, relevance every step)
    s = _settings()
    ra = visualize(lm, [ch], pool=pool, settings=s, seed=3, size=32, cache=DiskCache(enabled=False))
    rb = visualize(lm, [d], pool=pool, settings=s, seed=3, size=32, cache=DiskCache(enabled=False))
    assert ra.references[0].names == rb.references[0].names
    assert torch.equal(ra.losses, rb.losses)
    assert torch.equal(ra.images, rb.images)


def test_directions_and_neurons_run_with_actmax_and_vital():
    lm = tiny_model()
    pool = _pool()
    g = torch.Generator().manual_seed(1)
    d = direction_target("conv3", torch.randn(16, generator=g), bias=0.5)
    n = parse_target("neuron:conv3:2:3:4")
    for method in ("vital", "actmax"):
        r = visualize(lm, [d, n, "channel:conv3:1"], pool=pool, settings=_settings(), seed=0, size=32,
                      cache=DiskCache(enabled=False), method=method)
        assert r.images.shape == (3, 3, 32, 32) and bool(torch.isfinite(r.losses).all())
    # a neuron's references: images ranked by the channel at that one location
    from vital_fast.references.units import mine_unit_references

    refs = mine_unit_references(lm, [n], pool, 3, mode="patch", size=32, cache=DiskCache(enabled=False))
    assert len(refs[n.key]) == 3 and all("#patch(3, 4)" in nm for nm in refs[n.key].names)


def test_direction_files_and_bad_input(tmp_path):
    m = torch.randn(4, 16)
    p = save_directions(tmp_path / "sae.pt", m, torch.arange(4.0), accuracy=0.9, layer="conv3")
    dirs = load_directions(p)
    assert dirs.matrix.shape == (4, 16) and dirs.meta["accuracy"] == 0.9 and float(dirs.bias[2]) == 2.0
    t = parse_target(f"direction:conv3:{p}:2")
    assert t.key == f"direction:conv3:{p}:2" and torch.equal(t.direction.vector, m[2])
    assert t.record()["direction"]["probe_accuracy"] == 0.9 and t.label().startswith("conv3 direction sae.pt:2")
    torch.save({"W_dec": m[:1]}, tmp_path / "one.pt")
    assert parse_target(f"direction:conv3:{tmp_path / 'one.pt'}").index == 0
    with pytest.raises(ValueError, match="holds 4 direction"):
        parse_target(f"direction:conv3:{p}")
    with pytest.raises(ValueError, match="row 7 is out of range"):
        parse_target(f"direction:conv3:{p}:7")
    torch.save({"note": "x"}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no tensor"):
        load_directions(tmp_path / "empty.pt")
    bad = m.clone()
    bad[1, 3] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        load_directions(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="not found"):
        load_directions(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="all zeros"):
        Direction.of(torch.zeros(3))
    from vital_fast.models.facts import check_targets

    with pytest.raises(ValueError, match="the direction has 5 values but layer 'conv3' has 16 channels"):
        check_targets(tiny_model(), [direction_target("conv3", torch.ones(5))])
    with pytest.raises(ValueError, match="outside layer 'conv3'"):
        check_targets(tiny_model(), [parse_target("neuron:conv3:2:9:0")])


def _images(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((g.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def _cli(*extra):
    return ["--size", "32", "--steps", "2", "--batch", "4", "--set", "n_refs=3", "--set", "ref_crops=2",
            "--set", "quantiles=16", "--no-cache", "--workers", "0", *extra]


def test_cli_direction_and_neuron_targets(tmp_path, capsys):
    p = save_directions(tmp_path / "probe.pt", torch.randn(16), torch.tensor([0.1]), accuracy=0.875, n_test=8)
    out = tmp_path / "run"
    rc = main(["visualize", "--model", "py:test_sweep:tiny_loaded", "--images", str(_images(tmp_path)),
               "--target", f"direction:conv3:{p}", "--target", "neuron:conv3:1:2:2", "--out", str(out), *_cli()])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    d, n = m["targets"]
    assert d["kind"] == "direction" and d["direction"]["probe_accuracy"] == 0.875 and n["loc"] == [2, 2]
    assert "activation_ratio" in d and len(d["references"]) == 3
    page = next((out / "pages").glob("direction*.html")).read_text()
    assert "probe: accuracy" in page or "linear probe: accuracy" in page
    rc = main(["visualize", "--model", "py:test_sweep:tiny_loaded", "--images", str(tmp_path / "imgs"),
               "--target", f"direction:conv3:{tmp_path / 'nope.pt'}", "--out", str(tmp_path / "r2"), *_cli()])
    assert rc == 2 and "direction file not found" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_sweep_over_direction_rows(tmp_path, capsys):
    p = save_directions(tmp_path / "sae.pt", torch.randn(5, 16))
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "py:test_sweep:tiny_loaded", "--layer", "conv3", "--directions", str(p),
            "--images", str(_images(tmp_path)), "--out", str(out), *_cli()]
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(t["key"] for t in m["targets"]) == [f"direction:conv3:{p}:{r}" for r in range(5)]
    assert main(args + ["--resume"]) == 0  # nothing left to do
    assert "already finished" in capsys.readouterr().err
    torch.save(torch.randn(5, 7), tmp_path / "wrong.pt")
    rc = main(["sweep", "--model", "py:test_sweep:tiny_loaded", "--layer", "conv3", "--directions",
               str(tmp_path / "wrong.pt"), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "s2"), *_cli()])
    assert rc == 2 and "7 values but layer 'conv3' has 16 channels" in capsys.readouterr().err


def test_direction_slugs_stay_distinct_for_paths():
    v = torch.ones(4)
    a = Target("direction", 0, "conv3", direction=Direction.of(v, source="/a/b.pt"))
    b = Target("direction", 0, "conv3", direction=Direction.of(v, source="/a_b.pt"))
    c = Target("direction", 0, "conv3", direction=Direction.of(v, source="sae.pt"))
    assert a.slug != b.slug and "/" not in a.slug
    assert c.slug == "direction__conv3__sae.pt__0"
    assert Target("channel", 3, "_blocks.10").slug == "channel___blocks.10__3"


class _Pickled:
    """A class torch's weights-only loader does not know."""


def test_a_garbage_or_pickled_direction_file_says_what_it_is(tmp_path):
    """A garbage file gave `KeyError: 101`; a pickled one torch's sentence about loading it unsafely, cut off."""
    from vital_fast.optim.directions import load_directions

    text = tmp_path / "text.pt"
    text.write_text("hello world\n")
    with pytest.raises(ValueError, match=r"text.pt: not a torch.save or .safetensors file of directions"):
        load_directions(text)

    pickled = tmp_path / "pickled.pt"
    torch.save({"directions": torch.randn(2, 4), "extra": _Pickled()}, pickled)
    with pytest.raises(ValueError, match="holds pickled Python objects, not just tensors; such files are refused") as e:
        load_directions(pickled)
    assert "weights_only" not in str(e.value) and "Re-running" not in str(e.value)
