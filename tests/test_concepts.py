"""``vital-fast concept`` and :mod:`vital_fast.concepts`: a linear probe on a layer's pooled features.

Reddish images against bluish ones through the tiny network of test_optim: the probe separates them on the
held-out images, the saved direction acts on the raw features (its pooled score is the mean of the
per-position scores), the file loads as one direction with its accuracy, the same seed writes the same
file, and bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vital_fast.cli.main import main
from vital_fast.concepts import ConceptProbe, images_needed, split_counts, train_concept
from vital_fast.models import FeatureTaps, load_model
from vital_fast.optim.directions import load_directions
from vital_fast.references.images import load_image

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MODEL = "py:test_sweep:tiny_loaded"
LAYER = "conv3"


def _loaded():
    from test_optim import Tiny

    torch.manual_seed(0)
    return load_model(Tiny(), input_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _write_images(folder, n, reddish, seed, start=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.uniform(0.0, 0.35, size=(32, 32, 3))
        x[..., 0 if reddish else 2] += rng.uniform(0.45, 0.65)
        Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"{start + i:03d}.png"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept")
    pos, neg = str(root / "red"), str(root / "blue")
    _write_images(pos, 10, True, 1)
    _write_images(neg, 10, False, 2)
    return pos, neg, root


@pytest.fixture(scope="module")
def loaded():
    return _loaded()


def _pooled(loaded, folder):
    """Raw (unpooled) conv3 features and their spatial mean, per image of ``folder``."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    x = torch.stack([load_image(f) for f in files])
    with torch.no_grad():
        a = FeatureTaps(loaded.model, [LAYER], detach=True, stop_after=True).run(loaded.normalize(x))[LAYER]
    return a.double(), a.double().mean((2, 3))


def test_split_counts_and_needed():
    assert split_counts(10, 0.25) == (7, 3)
    assert split_counts(8, 0.25) == (6, 2)
    assert split_counts(5, 0.25) == (4, 1)
    assert images_needed(0.25) == 6
    assert images_needed(0.5) == 4
    assert images_needed(0.9) == 16  # 14.4 -> 14 held out, 2 left to train


def test_probe_separates_on_raw_features(data, loaded):
    pos, neg, _ = data
    probe = train_concept(loaded, LAYER, pos, neg, seed=0)
    assert isinstance(probe, ConceptProbe)
    assert probe.direction.shape == (16,) and probe.direction.dtype == torch.float32
    assert (probe.n_train, probe.n_test, probe.n_positive, probe.n_negative) == (14, 6, 10, 10)
    assert probe.accuracy == 1.0 and probe.train_accuracy == 1.0
    assert probe.layer == LAYER and probe.fingerprint == loaded.fingerprint
    w, b = probe.direction.double(), probe.bias
    for folder, sign in ((pos, 1), (neg, -1)):
        raw, pooled = _pooled(loaded, folder)
        score = pooled @ w + b
        assert bool((sign * score > 0).all()), score
        assert torch.allclose(probe.score(pooled), score)
        # the pooled score is the mean of the per-position scores w . a[:, y, x] + b (what a direction target sees)
        per_position = torch.einsum("c,bchw->bhw", w, raw) + b
        assert torch.allclose(per_position.mean((1, 2)), score, atol=1e-6)


def test_save_and_load(data, loaded, tmp_path):
    pos, neg, _ = data
    probe = train_concept(loaded, LAYER, pos, neg, holdout=0.3, seed=3)
    assert probe.n_test == 6  # 3 of each side
    path = probe.save(tmp_path / "c.pt")
    d = load_directions(path)
    assert d.matrix.shape == (1, 16)
    assert torch.equal(d.matrix[0], probe.direction)
    assert float(d.bias[0]) == probe.bias
    assert d.meta["accuracy"] == probe.accuracy and d.meta["kind"] == "probe"
    assert d.meta["layer"] == LAYER and d.meta["n_train"] == 14 and d.meta["n_test"] == 6
    assert d.meta["positive"] == pos and d.meta["negative"] == neg
    with pytest.raises(ValueError, match="exists"):
        probe.save(path, force=False)


def _cli(pos, neg, out, *extra):
    return main(["concept", "--model", MODEL, "--layer", LAYER, "--positive", pos, "--negative", neg,
                 "--out", str(out), *extra])


def test_cli_writes_a_loadable_deterministic_file(data, tmp_path, capsys):
    pos, neg, _ = data
    a, b = tmp_path / "a.pt", tmp_path / "sub" / "b.pt"
    assert _cli(pos, neg, a, "--seed", "7") == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert str(a) in line and "held-out accuracy 1.000" in line and f"direction:{LAYER}:{a}:0" in line
    assert "vital-fast visualize --model py:test_sweep:tiny_loaded" in line
    d = load_directions(a)
    assert d.matrix.shape == (1, 16) and d.meta["accuracy"] == 1.0 and d.meta["model"]
    assert _cli(pos, neg, b, "--seed", "7") == 0
    assert a.read_bytes() == b.read_bytes()
    # --force replaces; without it the file is left alone
    before = a.read_bytes()
    assert _cli(pos, neg, a, "--seed", "8") == 2
    assert a.read_bytes() == before
    assert _cli(pos, neg, a, "--seed", "8", "--force") == 0
    assert load_directions(a).meta["seed"] == 8


def test_cli_skips_unreadable_images(data, tmp_path, capsys):
    pos, neg, root = data
    mixed = tmp_path / "mixed"
    _write_images(str(mixed), 6, True, 5)
    (mixed / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 of 7"):
        assert _cli(str(mixed), neg, tmp_path / "m.pt") == 0
    d = load_directions(tmp_path / "m.pt")
    assert d.meta["n_positive"] == 6


def _bad_cases(pos, neg, root):
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    for i in range(6):
        (broken / f"{i}.png").write_bytes(b"garbage")
    few = root / "few"
    _write_images(str(few), 3, True, 9)
    five = root / "five"
    _write_images(str(five), 5, True, 10)
    mostly_broken = root / "mostly_broken"
    _write_images(str(mostly_broken), 3, True, 11)
    for i in range(4):
        (mostly_broken / f"x{i}.png").write_bytes(b"garbage")
    return {
        "missing": ((str(root / "nope"), neg), [], "no such folder"),
        "no-images": ((str(empty), neg), [], "no image files"),
        "unreadable": ((pos, str(broken)), [], "no usable image"),
        "bad-layer": ((pos, neg), ["--layer", "conv9"], "unknown layer 'conv9'"),
        "too-few": ((str(few), neg), [], r"3 image file\(s\).*at least 6"),
        "held-out-too-small": ((str(five), neg), [], r"5 image file\(s\).*at least 6 per side"),
        "too-few-readable": ((str(mostly_broken), neg), [], r"3 readable image\(s\) of 7.*at least 6"),
        "holdout-range": ((pos, neg), ["--holdout", "1.5"], "--holdout"),
        "same-folder": ((pos, pos), [], "same folder"),
    }


CASES = ["missing", "no-images", "unreadable", "bad-layer", "too-few", "held-out-too-small", "too-few-readable",
         "holdout-range", "same-folder"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input_exits_2_and_writes_nothing(data, tmp_path, capsys, case):
    import re

    pos, neg, root = data
    (p, n), extra, pattern = _bad_cases(pos, neg, tmp_path)[case]
    out = tmp_path / "out" / "c.pt"
    args = ["concept", "--model", MODEL, "--layer", LAYER, "--positive", p, "--negative", n, "--out", str(out)]
    if extra and extra[0] == "--layer":
        args[args.index("--layer") + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vital-fast: error:"), err
    assert re.search(pattern, err), err
    assert not out.exists() and not out.parent.exists()


def test_cli_existing_out_is_kept(data, tmp_path, capsys):
    pos, neg, _ = data
    out = tmp_path / "c.pt"
    out.write_bytes(b"precious")
    assert _cli(pos, neg, out) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_token_layers_pool_over_tokens(data):
    """A (B, N, C) token layer (channel_dim_of == -1) is averaged over its tokens."""
    from torch import nn

    from vital_fast.concepts import pooled_features
    from vital_fast.references.pool import ImagePool

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_proj = nn.Conv2d(3, 8, 8, stride=8)
            self.mix = nn.Linear(8, 6)

        def forward(self, x):
            return self.mix(self.conv_proj(x).flatten(2).transpose(1, 2)).mean(1)

    torch.manual_seed(0)
    vit = load_model(Tokens(), input_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, family="vit")
    assert vit.channel_dim_of("mix") == -1
    pos, neg, _ = data
    feats = pooled_features(vit, "mix", ImagePool.from_folder(pos))
    files = sorted(os.path.join(pos, f) for f in os.listdir(pos))
    x = torch.stack([load_image(f) for f in files])
    with torch.no_grad():
        tokens = FeatureTaps(vit.model, ["mix"], detach=True).run(vit.normalize(x))
    assert feats.shape == (10, 6)
    assert torch.allclose(feats, tokens["mix"].double().mean(1), atol=1e-6)
    probe = train_concept(vit, "mix", pos, neg)
    assert probe.direction.shape == (6,) and probe.accuracy >= 0.8


def test_one_token_probes_record_their_token_and_are_visualized_there(data, tmp_path, capsys):
    """--tokens cls|T on a token layer: the probe reads that token; its file records it and the direction target
    it gives is read at that token (loc (T, 0)); on a convolutional layer, or past the last token: one line."""
    import transformers

    from vital_fast.concepts import pooled_features
    from vital_fast.optim.targets import parse_target
    from vital_fast.references.pool import ImagePool

    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    vit = load_model(f"hf:{folder}")
    pos, neg, _ = data
    pool = ImagePool.from_folder(pos)
    mean, cls, third = (pooled_features(vit, "vit.layers.1", pool, tokens=t) for t in ("mean", "cls", 3))
    x = torch.cat([b for _, b in pool.batches(32, 32, 16, 0, mode=vit.interpolation)])
    with torch.no_grad():
        a = FeatureTaps(vit.model, ["vit.layers.1"], detach=True).run(vit.normalize(x))["vit.layers.1"].double()
    assert torch.allclose(cls, a[:, 0], atol=1e-5) and torch.allclose(third, a[:, 3], atol=1e-5)
    assert torch.allclose(mean, a.mean(1), atol=1e-5)
    patches = pooled_features(vit, "vit.layers.1", pool, tokens="patches")  # the CLS token left out
    assert torch.allclose(patches, a[:, 1:].mean(1), atol=1e-5)
    out = tmp_path / "cls.pt"
    code = main(["concept", "--model", f"hf:{folder}", "--layer", "vit.layers.1", "--positive", str(pos),
                 "--negative", str(neg), "--out", str(out), "--tokens", "cls"])
    assert code == 0, capsys.readouterr().err
    assert load_directions(str(out)).meta["token"] == 0
    t = parse_target(f"direction:vit.layers.1:{out}")
    assert t.loc == (0, 0) and t.key.endswith("@0,0")
    assert parse_target(t.key) == t
    out_p = tmp_path / "patches.pt"
    assert main(["concept", "--model", f"hf:{folder}", "--layer", "vit.layers.1", "--positive", str(pos),
                 "--negative", str(neg), "--out", str(out_p), "--tokens", "patches"]) == 0
    capsys.readouterr()
    import vital_fast as vf

    r = vf.visualize(vit, [f"direction:vit.layers.1:{out_p}"], pool=str(pos), steps=1, size=32,
                     settings=vf.get_preset("fast").replace(n_refs=2))
    assert r.targets[0].layer == "vit.layers.1.patches" and torch.isfinite(r.losses).all()
    for tokens, fragment in (("cls", "not tokens"), ("-1", "--tokens must be")):
        layer = "_blocks.4" if tokens == "cls" else "vit.layers.1"
        model = "efficientnet-lite0" if tokens == "cls" else f"hf:{folder}"
        code = main(["concept", "--model", model, "--layer", layer, "--positive", str(pos), "--negative", str(neg),
                     "--out", str(tmp_path / "x.pt"), "--tokens", tokens])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and "Traceback" not in err, err
