"""The reference cache: entries validated on read (shape, dtype, finite values, the key's settings); a
bad entry is dropped with a warning naming it, recomputed and rewritten, never trusted or fatal; atomic
writes get the permissions of a plain open()."""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch
from torch import nn

from vital_fast.models import load_model
from vital_fast.optim import Settings, visualize
from vital_fast.files import atomic_write_bytes
from vital_fast.references.cache import DiskCache, cache_key, check_tensor
from vital_fast.references.images import ImageSet, tensor_hash
from vital_fast.references.mining import mine_topk


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


LAYERS = [("conv1", 1.0), ("conv2", 1.0)]


def tiny_model():
    torch.manual_seed(0)
    return load_model(Tiny(), input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def images(seed: int, n: int = 3, size: int = 36) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    return ImageSet(imgs, [f"img{seed}-{i}" for i in range(n)], [tensor_hash(i) for i in imgs])


SETTINGS = Settings(stages=[(0.5, 2), (1.0, 2)], lr=0.1, warmup=1, n_refs=3, ref_crops=3, quantiles=16,
                    jitter=0.1, flip=False)


def entries(root, kind):
    d = os.path.join(root, kind)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def rewrite(path, change):
    """Rewrite a stored entry's value in place (key and settings kept), as a bad writer would."""
    entry = torch.load(path, weights_only=True)
    entry["value"] = change(entry["value"])
    torch.save(entry, path)


def nan_protos(val):
    val["prototypes"] = {l: torch.full_like(p, float("nan")) for l, p in val["prototypes"].items()}
    return val


def extra_channel(val):  # sorted, finite, float: only the channel count is wrong
    val["prototypes"] = {l: torch.cat([p, p[:1]]) for l, p in val["prototypes"].items()}
    if val.get("importance"):
        val["importance"] = {l: torch.cat([w, w[:1]]) for l, w in val["importance"].items()}
    return val


# ---------------------------------------------------------------------------------------------
# DiskCache.get_or_compute
# ---------------------------------------------------------------------------------------------


def _finite(v):
    check_tensor(v, "value", shape=(2, None))


def test_nan_entry_dropped_recomputed_rewritten(tmp_path):
    cache = DiskCache(str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3)

    parts = {"a": 1}
    assert torch.equal(cache.get_or_compute("k", parts, compute, _finite), torch.ones(2, 3))
    (path,) = entries(tmp_path, "k")
    rewrite(path, lambda v: v * float("nan"))
    with pytest.warns(UserWarning, match=rf"dropping entry {path}.*NaN"):
        assert torch.equal(cache.get_or_compute("k", parts, compute, _finite), torch.ones(2, 3))
    assert len(calls) == 2 and cache.misses == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry is good: a silent hit
        assert torch.equal(cache.get_or_compute("k", parts, compute, _finite), torch.ones(2, 3))
    assert len(calls) == 2 and cache.hits == 1


@pytest.mark.parametrize("bad, reason", [
    (torch.ones(3, 3), r"shape \(3, 3\), expected \(2, \*\)"),
    (torch.ones(2, 3, dtype=torch.int64), "dtype torch.int64"),
    ({"not": "a tensor"}, "not a tensor"),
])
def test_wrong_shape_or_dtype_entry_recomputed(tmp_path, bad, reason):
    cache = DiskCache(str(tmp_path))
    cache.get_or_compute("k", {"a": 1}, lambda: torch.ones(2, 3), _finite)
    (path,) = entries(tmp_path, "k")
    rewrite(path, lambda v: bad)
    with pytest.warns(UserWarning, match=reason):
        out = cache.get_or_compute("k", {"a": 1}, lambda: torch.zeros(2, 3), _finite)
    assert torch.equal(out, torch.zeros(2, 3))
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.zeros(2, 3))


def test_entry_with_other_settings_dropped(tmp_path):
    cache = DiskCache(str(tmp_path))
    cache.get_or_compute("k", {"q": 16}, lambda: torch.ones(2, 3))
    (path,) = entries(tmp_path, "k")
    entry = torch.load(path, weights_only=True)
    assert '"q": 16' in entry["parts"]  # the key's settings are stored beside the value
    entry["parts"] = entry["parts"].replace('"q": 16', '"q": 32')
    torch.save(entry, path)
    with pytest.warns(UserWarning, match="stored settings differ"):
        assert torch.equal(cache.get_or_compute("k", {"q": 16}, lambda: torch.zeros(2, 3)), torch.zeros(2, 3))
    # an entry written before the settings were stored (no "parts") is still read, and validated
    torch.save({"key": cache_key({"kind": "k", "q": 8}), "value": torch.ones(2, 3)},
               os.path.join(tmp_path, "k", cache_key({"kind": "k", "q": 8}) + ".pt"))
    old = cache.get_or_compute("k", {"q": 8}, lambda: torch.zeros(2, 3), _finite)
    assert torch.equal(old, torch.ones(2, 3))


def test_validator_reasons_and_bad_computed_values(tmp_path):
    cache = DiskCache(str(tmp_path))
    cache.get_or_compute("k", {}, lambda: 1)
    with pytest.warns(UserWarning, match="too small"):
        assert cache.get_or_compute("k", {}, lambda: 2, lambda v: None if v > 1 else "too small") == 2
    with pytest.warns(UserWarning, match="not storing"):  # never written, never trusted later
        assert cache.get_or_compute("n", {}, lambda: torch.tensor([float("nan"), 0.0]),
                                    lambda v: check_tensor(v, "v")).isnan().any()
    assert entries(tmp_path, "n") == []


# ---------------------------------------------------------------------------------------------
# The references of a run: bad entries recomputed, the run equals a clean one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, reason", [(nan_protos, "NaN"), (extra_channel, "shape")])
def test_bad_reference_entries_give_the_clean_run(tmp_path, damage, reason):
    m = tiny_model()
    targets = ["class:1", "channel:conv2:3"]
    refs = {"class:1": images(1), "channel:conv2:3": images(2)}
    cache = DiskCache(str(tmp_path / "cache"))
    with torch.backends.mkldnn.flags(enabled=False):
        clean = visualize(m, targets, refs, settings=SETTINGS, seed=0, class_layers=LAYERS, cache=cache)
        stored = entries(cache.dir, "class_ref") + entries(cache.dir, "channel_ref")
        assert len(stored) == 4  # two targets at two resolutions
        for p in stored:
            rewrite(p, damage)
        with pytest.warns(UserWarning, match=f"dropping entry .*{reason}") as rec:
            again = visualize(m, targets, refs, settings=SETTINGS, seed=0, class_layers=LAYERS, cache=cache)
        dropped = {str(w.message).split("dropping entry ")[1].split(" ")[0] for w in rec
                   if "dropping entry" in str(w.message)}
        assert dropped == set(stored)
        for a, b in zip(clean.images, again.images):
            assert torch.equal(a, b)
        # the rewritten entries are good again: the third run hits them all, silently
        hits = cache.hits
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            third = visualize(m, targets, refs, settings=SETTINGS, seed=0, class_layers=LAYERS, cache=cache)
        assert not [w for w in rec if "vital_fast cache" in str(w.message)]
        assert cache.hits == hits + 4
        assert all(torch.equal(a, b) for a, b in zip(clean.images, third.images))


def test_bad_mining_entry_recomputed(tmp_path):
    m = tiny_model()
    pool = images(3, n=5)
    cache = DiskCache(str(tmp_path))
    clean = mine_topk(m, "conv2", pool, [1, 3], 2, 32, cache)
    (path,) = entries(tmp_path, "mine")

    def wrong_channels(v):  # as if mined from another model: 15 channels
        return dict(v, score=v["score"][:15], index=v["index"][:15], loc=v["loc"][:15])

    # the entry holds each channel's running top-k: (channels, k) scores and image indices
    for damage, reason in ((wrong_channels, r"scores has shape \(15, 2\), expected \(16, 2\)"),
                           (lambda v: dict(v, score=v["score"] * float("nan")), "NaN"),
                           (lambda v: dict(v, loc=v["loc"] + 100), "outside"),
                           (lambda v: dict(v, index=v["index"] + 5), "outside the pool")):
        rewrite(path, damage)
        with pytest.warns(UserWarning, match=reason):
            top = mine_topk(m, "conv2", pool, [1, 3], 2, 32, cache)
        assert torch.equal(top.index, clean.index) and torch.equal(top.score, clean.score)


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = tmp_path / "sub" / "manifest.json"
        atomic_write_bytes(str(path), b"{}")
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        atomic_write_bytes(str(path), b"{ }")  # a rewrite too
        assert stat.S_IMODE(os.stat(path).st_mode) == mode and path.read_bytes() == b"{ }"
        assert os.listdir(path.parent) == ["manifest.json"]  # no temporary file left
    finally:
        os.umask(old)


def test_prototype_cache_key_names_the_thread_count(tmp_path):
    """Features round differently at another thread count; an entry made at one count changed the images of a run
    at another (up to 11/255), so --no-cache and a cached run differed. The key names the count now."""
    from _util import tiny_loaded, tiny_refs
    from vital_fast.optim import Settings, visualize
    from vital_fast.references.cache import DiskCache

    lm = tiny_loaded()
    cache = DiskCache(str(tmp_path))
    s = Settings(stages=[(1.0, 1)], n_refs=3, quantiles=8)
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            visualize(lm, ["class:1"], {"class:1": tiny_refs()}, settings=s, cache=cache, progress=False)
    finally:
        torch.set_num_threads(old)
    entries = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(entries) == 2, entries
