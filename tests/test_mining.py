"""Top-k mining over lazy pools (folders, files, datasets): the same top-k as mining an in-memory set,
damaged files skipped and counted, bad input stopped before any work, the cache keyed by the pool's
fingerprint and never left half-written by an interrupted pass."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from vital_fast.models import FeatureTaps, load_model
from vital_fast.references import mining
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_images, offline_photo_paths, tensor_hash
from vital_fast.references.mining import channel_reference_images, mine_topk, print_progress
from vital_fast.references.pool import ImagePool, as_image


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)  # no ReLU after: continuous scores, no ties
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.act1(self.conv1(x)))).flatten(1))


def net():
    torch.manual_seed(0)
    return load_model(Net(), input_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 images in WordNet-id folders: crops of the offline photographs in RGB, gray, CMYK, RGBA."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pool")
    g = np.random.default_rng(0)
    photos = offline_photo_paths()
    for i in range(20):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            x0, y0 = int(g.integers(0, w // 3)), int(g.integers(0, h // 3))
            im = im.crop((x0, y0, x0 + w // 2, y0 + h // 2))
            im = im.resize((int(g.integers(40, 70)), int(g.integers(40, 70))))
        sub = root / f"n0{1440764 + i % 3}"
        sub.mkdir(exist_ok=True)
        mode, ext = [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png")][i % 4]
        im.convert(mode).save(sub / f"img{i:03d}.{ext}")
    return root


def files_of(root):
    from vital_fast.references.images import list_image_files

    return list_image_files(str(root))


def today_topk(loaded, layer, pool: ImageSet, k, size, batch=8):
    """Mining as it was: the full (N, C) score matrix of an in-memory set, then topk over the images."""
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    from vital_fast.references.images import resize_center_crop

    scores, locs = [], []
    with torch.no_grad(), FeatureTaps(loaded.model, [layer], detach=True, stop_after=True) as taps:
        for i in range(0, len(pool), batch):
            x = torch.stack([resize_center_crop(im, size, resize) for im in pool.images[i:i + batch]])
            a = taps.run(loaded.normalize(x))[layer].float()
            grid = tuple(a.shape[2:])
            s, arg = a.flatten(2).max(dim=2)
            scores.append(s)
            locs.append(torch.stack([arg // grid[-1], arg % grid[-1]], dim=-1))
    score, loc = torch.cat(scores), torch.cat(locs)
    top_s, top_i = score.topk(k, dim=0)
    loc = loc[top_i, torch.arange(score.shape[1])[None, :]]
    return top_i.T, top_s.T, loc.permute(1, 0, 2), grid


@pytest.mark.parametrize("workers, batch", [(0, 8), (2, 3)])
def test_same_topk_and_references_as_in_memory(folder, workers, batch):
    m = net()
    files = files_of(folder)
    mem = load_images(files)
    idx, score, loc, grid = today_topk(m, "conv2", mem, 4, 32, batch)
    pool = ImagePool.from_folder(str(folder), workers=workers)
    lazy = mine_topk(m, "conv2", pool, None, 4, 32, batch=batch)
    inmem = mine_topk(m, "conv2", mem, None, 4, 32, batch=batch)
    for top in (lazy, inmem):
        assert top.grid == grid and top.channels == list(range(12))
        assert torch.equal(top.index, idx) and torch.equal(top.score, score) and torch.equal(top.loc, loc)
    assert torch.equal(lazy.mean_score, inmem.mean_score)
    sub = mine_topk(m, "conv2", pool, [7, 2], 4, 32, batch=batch)
    sel = lazy.select([7, 2])
    assert torch.equal(sub.index, sel.index) and torch.equal(sub.mean_score, sel.mean_score)
    for mode in ("image", "patch"):
        a = channel_reference_images(m, sub, pool, mode, 32)
        b = channel_reference_images(m, sub, mem, mode, 32)
        for c in (7, 2):
            assert a[c].names == b[c].names and a[c].hashes == b[c].hashes
            assert all(torch.equal(x, y) for x, y in zip(a[c].images, b[c].images))


def test_dataset_pool_equals_files(folder):
    m = net()
    mem = load_images(files_of(folder))

    class Pairs(torch.utils.data.Dataset):  # (image, label), as torchvision's ImageFolder gives
        def __len__(self):
            return len(mem)

        def __getitem__(self, i):
            return mem.images[i], i % 3

    want = mine_topk(m, "conv2", mem, None, 3, 32)
    for workers in (0, 2):
        got = mine_topk(m, "conv2", ImagePool.from_dataset(Pairs(), workers=workers), None, 3, 32)
        assert torch.equal(got.index, want.index) and torch.equal(got.score, want.score)
    assert torch.equal(as_image((torch.full((1, 4, 5), 255, dtype=torch.uint8), 0), "x"), torch.ones(3, 4, 5))


def test_damaged_files_skipped_and_counted(folder, tmp_path):
    m = net()
    root = tmp_path / "damaged"
    shutil.copytree(folder, root)
    good = files_of(root)
    (root / "n01440764" / "zz_garbage.jpg").write_bytes(b"not an image")
    data = open(good[1], "rb").read()
    (root / "n01440765" / "zz_truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match=r"skipped 2 of 22 images .*first: .*zz_garbage"):
        top = mine_topk(m, "conv2", ImagePool.from_folder(str(root), workers=2), None, 3, 32, batch=4)
    pool = ImagePool.from_folder(str(root))
    want = mine_topk(m, "conv2", load_images(good), None, 3, 32, batch=4)
    names = [[pool.names[i] for i in row] for row in top.index.tolist()]
    assert names == [[good[i] for i in row] for row in want.index.tolist()]
    assert torch.equal(top.score, want.score)


def test_fewer_readable_images_than_k(tmp_path, folder):
    root = tmp_path / "few"
    root.mkdir()
    shutil.copy(files_of(folder)[0], root / "a.jpg")
    (root / "b.jpg").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        top = mine_topk(net(), "conv2", str(root), [0, 1], 2, 32)
    assert top.index.shape == (2, 1) and top.index.tolist() == [[0], [0]]


def test_bad_input_stops_before_any_work(tmp_path, monkeypatch, folder):
    def no_work(*a, **k):
        raise AssertionError("mining started")

    monkeypatch.setattr(mining, "_stream_topk", no_work)
    m = net()
    broken = tmp_path / "broken"
    (broken / "n01440764").mkdir(parents=True)
    for i in range(3):
        (broken / "n01440764" / f"{i}.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=f"no usable image among the 3 in {broken}"):
        mine_topk(m, "conv2", ImagePool.from_folder(str(broken)), None, 2, 32)
    with pytest.raises(ValueError, match="no image files under"):
        ImagePool.from_folder(str(tmp_path), recursive=False)
    with pytest.raises(ValueError, match="no such file: .*missing.jpg"):
        ImagePool.from_files([files_of(folder)[0], str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match=r"has 12 channels .*\[12\]"):
        mine_topk(m, "conv2", str(folder), [3, 12], 2, 32)

    class Wrong(torch.utils.data.Dataset):
        def __init__(self, item):
            self.item = item

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return self.item

    for item, msg in (("a string", r"item 0: expected an image .*got str"),
                      (torch.rand(32, 32, 3), r"item 0: .*must be \(3, H, W\).*\(32, 32, 3\)"),
                      (torch.randn(3, 32, 32) * 3, r"item 0: image values must lie in \[0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            mine_topk(m, "conv2", Wrong(item), None, 2, 32)


def test_dataset_wrong_item_mid_pass_names_it_and_raising_item_is_skipped():
    m = net()
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, 40, 40, generator=g) for _ in range(10)]

    class Odd(torch.utils.data.Dataset):
        def __init__(self, bad):
            self.bad = bad

        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            if i == 6:
                if self.bad == "raise":
                    raise OSError("damaged")
                return np.zeros((4, 4))
            return imgs[i]

    with pytest.raises(ValueError, match=r"item 6: an image array must be \(H, W, 3\) uint8"):
        mine_topk(m, "conv2", Odd("type"), None, 2, 32)
    with pytest.warns(UserWarning, match=r"skipped 1 of 10 .*item 6: OSError: damaged"):
        top = mine_topk(m, "conv2", Odd("raise"), None, 2, 32, workers=2, batch=3)
    assert 6 not in top.index.tolist()


def test_cache_keyed_by_fingerprint_and_interrupt_leaves_no_entry(folder, tmp_path, monkeypatch):
    m = net()
    root = tmp_path / "pool"
    shutil.copytree(folder, root)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copy2: same sizes and modification times
    a, b = ImagePool.from_folder(str(root)), ImagePool.from_folder(str(moved))
    assert a.fingerprint == b.fingerprint
    cache = DiskCache(str(tmp_path / "cache"))

    calls = []

    def interrupt(done, total, rate):
        calls.append(done)
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mine_topk(m, "conv2", a, None, 3, 32, cache, progress=interrupt)
    mine_dir = tmp_path / "cache" / "mine"
    assert calls and (not mine_dir.is_dir() or not os.listdir(mine_dir))  # no entry, no temporary file
    clean = mine_topk(m, "conv2", a, None, 3, 32, cache)
    assert len(os.listdir(tmp_path / "cache" / "mine")) == 1 and cache.misses == 2
    real = mining._stream_topk
    monkeypatch.setattr(mining, "_stream_topk", lambda *a, **k: pytest.fail("recomputed"))
    again = mine_topk(m, "conv2", b, [0, 5], 3, 32, cache)  # a copy of the tree: the same entry
    assert cache.hits == 1 and torch.equal(again.index, clean.select([0, 5]).index)
    monkeypatch.setattr(mining, "_stream_topk", real)
    f = files_of(moved)[0]
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))  # touched: mined again
    mine_topk(m, "conv2", ImagePool.from_folder(str(moved)), None, 3, 32, cache)
    assert cache.misses == 3 and len(os.listdir(tmp_path / "cache" / "mine")) == 2


def test_in_memory_set_keeps_content_key(tmp_path):
    m = net()
    g = torch.Generator().manual_seed(2)
    imgs = [torch.rand(3, 36, 36, generator=g) for _ in range(5)]
    cache = DiskCache(str(tmp_path))
    one = mine_topk(m, "conv2", ImageSet(imgs, list("abcde"), [tensor_hash(i) for i in imgs]), None, 2, 32, cache)
    two = mine_topk(m, "conv2", ImageSet(imgs, list("vwxyz"), [tensor_hash(i) for i in imgs]), None, 2, 32, cache)
    assert cache.hits == 1 and torch.equal(one.index, two.index)
    # The same weights under another normalization are another scorer: mined again, not served stale.
    other = dataclasses.replace(m, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mine_topk(other, "conv2", ImageSet(imgs, list("abcde"), [tensor_hash(i) for i in imgs]), None, 2, 32, cache)
    assert cache.hits == 1 and cache.misses == 2


def test_progress_reports_rate(folder, capsys):
    seen = []
    mine_topk(net(), "conv2", str(folder), None, 2, 32, progress=lambda d, t, r: seen.append((d, t, r)))
    assert seen[-1][:2] == (20, 20) and all(r > 0 for _, _, r in seen)
    quiet = print_progress("mining", every=60.0)
    quiet(10, 20, 5.0), quiet(20, 20, 5.0)
    loud = print_progress("mining", every=0.0)
    loud(20, 20, 12.5)
    assert capsys.readouterr().err == "mining: 20/20 images, 12.5 images/s\n"


def test_workers_default(monkeypatch):
    from vital_fast.references.pool import default_workers

    monkeypatch.setenv("VITAL_FAST_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("VITAL_FAST_WORKERS", "many")
    with pytest.raises(ValueError, match="VITAL_FAST_WORKERS"):
        default_workers()
    monkeypatch.delenv("VITAL_FAST_WORKERS")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 1 <= default_workers() <= 8
