"""Reference images as a photo collection holds them: every Pillow mode converted to RGB (16-bit scaled,
not clipped to white), EXIF orientation applied, decompression bombs and truncated files skipped and
counted in the one warning; WordNet id folders resolved per root, never through os.environ."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vital_fast.references.images import class_image_folder, load_image, load_images


def _rgb(h=6, w=10, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def _save_modes(folder):
    """One tiny file per mode a photo collection may hold; returns {name: expected (3, H, W) or None}."""
    os.makedirs(folder, exist_ok=True)
    base = Image.fromarray(_rgb())
    gray = base.convert("L")
    made = {}
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "RGB"):
        ext = ".tif" if mode == "CMYK" else ".png"
        name = f"{mode}{ext}"
        base.convert(mode).save(os.path.join(folder, name))
        made[name] = mode
    ramp = (np.linspace(0, 65535, 60).reshape(6, 10)).astype(np.uint16)
    Image.fromarray(ramp).save(os.path.join(folder, "I16.png"))  # opens as I;16
    Image.fromarray(np.asarray(gray).astype(np.int32)).save(os.path.join(folder, "I.tif"))
    Image.fromarray(np.asarray(gray).astype(np.float32) / 255.0).save(os.path.join(folder, "F.tif"))
    made.update({"I16.png": "I;16", "I.tif": "I", "F.tif": "F"})
    return made


def test_every_mode_loads_as_rgb(tmp_path):
    made = _save_modes(tmp_path)
    for name, mode in made.items():
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode, (name, im.mode)
        x = load_image(str(tmp_path / name))
        assert x.shape == (3, 6, 10) and x.dtype == torch.float32, name
        assert float(x.min()) >= 0 and float(x.max()) <= 1, name
        if mode in ("1", "L", "LA", "I;16", "I", "F"):
            assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]), name  # gray replicated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        s = load_images(str(tmp_path))
    assert len(s) == len(made) and s.skipped == 0


def test_high_depth_gray_is_scaled_not_white(tmp_path):
    _save_modes(tmp_path)
    x16 = load_image(str(tmp_path / "I16.png"))
    ramp = torch.linspace(0, 1, 60).reshape(6, 10)
    assert torch.allclose(x16[0], ramp, atol=1e-4)  # by 65535: the ramp survives
    gray = torch.from_numpy(np.asarray(Image.fromarray(_rgb()).convert("L"), dtype=np.float32) / 255.0)
    for name in ("I.tif", "F.tif", "L.png"):
        assert torch.allclose(load_image(str(tmp_path / name))[0], gray, atol=1e-5), name


def test_single_grayscale_photo_is_a_usable_class_folder(tmp_path):
    (tmp_path / "285").mkdir()
    Image.fromarray(_rgb(8, 8)).convert("L").save(tmp_path / "285" / "cat.jpg")
    s = load_images(class_image_folder(str(tmp_path), 285))
    assert len(s) == 1 and s.images[0].shape == (3, 8, 8)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(tmp_path, orientation):
    path = tmp_path / "rotated.jpg"
    im = Image.fromarray(_rgb(6, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation  # rotated 90 degrees: a viewer shows it 10 high and 6 wide
    im.save(path, exif=exif.tobytes())
    assert load_image(str(path)).shape == (3, 10, 6)
    plain = tmp_path / "plain.jpg"
    im.save(plain)
    assert load_image(str(plain)).shape == (3, 6, 10)


# 80 pixels past a limit of 60: Pillow warns (DecompressionBombWarning); past twice 30: it raises
@pytest.mark.parametrize("limit", [60, 30])
def test_decompression_bomb_skipped_and_counted(tmp_path, monkeypatch, limit):
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "a_small.png")
    Image.fromarray(_rgb(4, 4, seed=1)).save(tmp_path / "b_small.png")
    Image.fromarray(_rgb(8, 10)).save(tmp_path / "big.png")  # 80 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 files.*big\.png") as rec:
        s = load_images(str(tmp_path))
    assert len(s) == 2 and s.skipped == 1 and all(not n.endswith("big.png") for n in s.names)
    assert not any(issubclass(w.category, Image.DecompressionBombWarning) for w in rec)
    with pytest.raises(ValueError, match="too large"):
        load_image(str(tmp_path / "big.png"))


def test_truncated_and_foreign_files_skipped(tmp_path):
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "good.png")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="skipped 2 of 3 files") as rec:
        s = load_images(str(tmp_path))
    assert len(s) == 1 and s.skipped == 2 and s.names[0].endswith("good.png")
    assert "not RGB" not in str(rec[0].message)
    with pytest.raises(ValueError, match="no usable image"), \
            pytest.warns(UserWarning, match="skipped 1 of 1"):
        load_images([str(tmp_path / "truncated.jpg")])


# ---------------------------------------------------------------------------------------------
# WordNet id folders
# ---------------------------------------------------------------------------------------------


def test_wnids_resolved_per_folder_never_through_environ(tmp_path, monkeypatch):
    monkeypatch.delenv("VITAL_FAST_WNIDS", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for root, ids in ((a, ["n001", "n002", "n003"]), (b, ["n101", "n102", "n103"])):
        root.mkdir()
        (root / "wnids.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            (root / i).mkdir()
    assert class_image_folder(str(a), 1) == str(a / "n002")
    assert class_image_folder(str(b), 1) == str(b / "n102")  # b's own mapping, not a's
    assert "VITAL_FAST_WNIDS" not in os.environ
    # an explicit mapping wins; a LOC_synset_mapping.txt (id, then names) works too
    (tmp_path / "map.txt").write_text("n101 tench\nn103 goldfish\n")
    assert class_image_folder(str(b), 1, wnids_file=str(tmp_path / "map.txt")) == str(b / "n103")
    # $VITAL_FAST_WNIDS only for a folder without its own file
    c = tmp_path / "c"
    (c / "n103").mkdir(parents=True)
    assert class_image_folder(str(c), 1) is None
    monkeypatch.setenv("VITAL_FAST_WNIDS", str(tmp_path / "map.txt"))
    assert class_image_folder(str(c), 1) == str(c / "n103")
    assert class_image_folder(str(a), 1) == str(a / "n002")
    monkeypatch.setenv("VITAL_FAST_WNIDS", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="VITAL_FAST_WNIDS.*missing.txt"):
        class_image_folder(str(c), 1)
    # an index folder needs no mapping at all
    (c / "7").mkdir()
    assert class_image_folder(str(c), 7) == str(c / "7")


def test_gather_references_two_folders_in_one_process(tmp_path, monkeypatch):
    from vital_fast.cli.jobs import gather_references
    from vital_fast.optim import Target, get_preset

    monkeypatch.delenv("VITAL_FAST_WNIDS", raising=False)
    found = {}
    for name, ids, seed in (("a", ["n001", "n002"], 0), ("b", ["n101", "n102"], 1)):
        root = tmp_path / name
        root.mkdir()
        (root / "wnids.txt").write_text("\n".join(ids) + "\n")
        (root / ids[1]).mkdir()
        Image.fromarray(_rgb(8, 8, seed)).save(root / ids[1] / f"{name}.png")
        refs = gather_references(None, [Target("class", 1)], str(root), get_preset("fast"), None)
        found[name] = refs["class:1"].names[0]
    assert found["a"].endswith(os.path.join("a", "n002", "a.png"))
    assert found["b"].endswith(os.path.join("b", "n102", "b.png"))
    assert "VITAL_FAST_WNIDS" not in os.environ


def test_imagenet_wnid_folders_without_a_mapping_file(tmp_path, monkeypatch):
    """ImageNet's own tree (1000 WordNet-id folders, no wnids.txt): class i is the i-th id in sorted
    order, ImageFolder's convention; a partial tree is not guessed at."""
    from vital_fast.references.images import class_image_folder, sorted_wnid_folders

    monkeypatch.delenv("VITAL_FAST_WNIDS", raising=False)
    ids = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    for wnid in reversed(ids):
        (tmp_path / wnid).mkdir()
    (tmp_path / "not_a_class").mkdir()
    assert sorted_wnid_folders(str(tmp_path)) == ids
    assert class_image_folder(str(tmp_path), 0) == str(tmp_path / ids[0])
    assert class_image_folder(str(tmp_path), 285) == str(tmp_path / ids[285])
    (tmp_path / ids[999]).rmdir()  # 999 folders: not ImageNet-1k's tree, no guess
    assert class_image_folder(str(tmp_path), 285) is None


def test_broken_symlinks_in_a_folder_are_skipped_with_a_warning(tmp_path):
    """A dangling or looping symbolic link stopped the whole run (exit 2), while unreadable files were skipped."""
    import warnings

    from PIL import Image

    from vital_fast.references.images import load_images
    from vital_fast.references.pool import as_pool

    (tmp_path / "1").mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "1" / "a.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "1" / "dangling.png")
    os.symlink("loop.png", tmp_path / "1" / "loop.png")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert len(load_images(str(tmp_path / "1"))) == 1
        assert len(as_pool(str(tmp_path))) == 1
    msgs = [str(x.message) for x in w]
    assert any("skipped 2 broken symbolic links (dangling or looping" in m for m in msgs), msgs


def test_a_subset_of_imagenet_wordnet_folders_resolves_without_a_wnids_file(tmp_path):
    """Eight WordNet-id folders of ImageNet-1k classes were refused without a wnids.txt; each id names its class
    whatever the other folders are (the table ships with timm's ImageNetInfo)."""
    pytest.importorskip("timm")
    from vital_fast.references.images import missing_class_message

    for wnid in ("n02124075", "n07920052", "n01440764"):  # Egyptian cat (285), espresso (967), tench (0)
        (tmp_path / wnid).mkdir()
    assert class_image_folder(str(tmp_path), 285) == str(tmp_path / "n02124075")
    assert class_image_folder(str(tmp_path), 967) == str(tmp_path / "n07920052")
    assert class_image_folder(str(tmp_path), 1) is None
    msg = missing_class_message(str(tmp_path), 1)
    assert "ImageNet-1k's class 1 is n01443537" in msg and "no folder" in msg
