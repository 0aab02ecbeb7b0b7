"""Bulk sweeps on a tiny CNN: a target's result does not depend on its batch, slot or rank; a sweep
killed with SIGKILL and resumed equals an uninterrupted one; two torchrun ranks (gloo, CPU) write
one complete folder; bad input leaves the folder untouched.

The CLI runs in subprocesses with ``--model py:test_sweep:tiny_loaded`` (this module on PYTHONPATH).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vital_fast.cli.main import main
from vital_fast.models import load_model
from vital_fast.optim import Settings, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import list_image_files, load_images
from vital_fast.references.mining import channel_reference_images, mine_topk
from vital_fast.sweep import parse_index_spec, read_index, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = [("conv1", 1.0), ("conv2", 1.0), ("conv3", 1.0)]
N_TARGETS = 18  # conv3 has 16 channels, plus classes 0-1
VOLATILE = ("timings", "rank")
pytestmark = pytest.mark.filterwarnings("ignore:relevance_maps:UserWarning")


def tiny_loaded():
    from test_optim import Tiny

    torch.manual_seed(0)
    return load_model(Tiny(), input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def small_settings(**kw):
    base = dict(stages=[(0.5, 3), (1.0, 5)], lr=0.1, warmup=2, n_refs=3, ref_crops=4, quantiles=32, jitter=0.1,
                flip=True)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The subprocesses run with OMP_NUM_THREADS=1; so does this process here (results do not depend
    # on it, but on a busy 2-core machine OpenMP barriers make 2 threads far slower than 1).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("sweep_images")
    g = np.random.default_rng(0)
    for sub in ("0", "1", "pool"):
        (root / sub).mkdir()
        for i in range(4):
            Image.fromarray((g.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / sub / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep_cache")


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli_args(images, out, cache, *extra):
    return ["sweep", "--model", "py:test_sweep:tiny_loaded", "--layer", "conv3", "--classes", "0-1", "--images",
            str(images), "--out", str(out), "--size", "32", "--steps", "8", "--batch", "4", "--seed", "5",
            "--exact", "--cache", str(cache), *extra]


def snapshot(folder):
    """Every file under a folder with its bytes' hash and mtime."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def results(folder):
    """key -> (record without volatile fields, bytes of each image file)."""
    m = json.loads((folder / "manifest.json").read_text())
    out = {}
    for t in m["targets"]:
        rec = {k: v for k, v in t.items() if k not in VOLATILE}
        files = {n: (folder / p).read_bytes() for n, p in t["files"].items()}
        out[t["key"]] = (rec, files)
    return m, out


def index_lines(folder):
    """Every complete, parseable index line of every rank (a torn line left by a crash is skipped)."""
    lines = []
    for p in sorted(folder.glob("index-rank*.jsonl")):
        for l in p.read_text().split("\n")[:-1]:
            try:
                lines.append(json.loads(l))
            except json.JSONDecodeError:
                pass
    return lines


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, images, cache_dir):
    """An uninterrupted single-process sweep: the yardstick for resume and torchrun."""
    out = tmp_path_factory.mktemp("sweep_ref") / "ref"
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    code = main(cli_args(images, out, cache_dir))
    assert code == 0
    m, res = results(out)
    assert m["sweep"]["complete"] and len(res) == N_TARGETS
    return out


# --------------------------------------------------------------------------------------------


def test_parse_index_spec():
    assert parse_index_spec("all", 4, "c") == [0, 1, 2, 3]
    assert parse_index_spec("0-2,5, 7-8", 10, "c") == [0, 1, 2, 5, 7, 8]
    assert parse_index_spec([3, 1, 3], 4, "c") == [1, 3]
    for bad, frag in [("0-99", "outside"), ("3-1", "bad range"), ("x", "bad range"), ("", "no indices")]:
        with pytest.raises(ValueError, match=frag):
            parse_index_spec(bad, 10, "c")


def test_target_independent_of_batch_slot_and_neighbours(tmp_path, images, cache_dir):
    """Refill with a multi-resolution schedule and early stop: each target equals its own single-target
    sweep and a single-target ``visualize`` with the same seed, bit for bit (oneDNN off)."""
    m = tiny_loaded()
    cache = DiskCache(str(cache_dir))
    # the early-stopping test runs every loss_every of a target's own steps, whatever its neighbours do
    s = small_settings(stages=[(0.5, 3), (1.0, 21)], loss_every=2)
    kw = dict(settings=s, seed=3, cache=cache, class_layers=LAYERS, exact=True, early_stop=0.05,
              early_stop_window=3)
    big = run_sweep(m, str(images), str(tmp_path / "big"), layer="conv3", channels="0-6", classes=[1], batch=3, **kw)
    recs = big.manifest["targets"]
    steps = {r["key"]: r["metrics"]["steps"] for r in recs}
    assert len(recs) == 8 and big.manifest["sweep"]["complete"]
    assert any(r["stopped_early"] for r in recs) and len(set(steps.values())) > 1, steps
    # refill: fewer ticks than slot-steps / batch would need with fixed batches waiting for the slowest
    fixed = run_sweep(m, str(images), str(tmp_path / "fixed"), layer="conv3", channels="0-6", classes=[1], batch=3,
                      refill=False, **kw)
    assert big.timings["ticks"] < fixed.timings["ticks"]
    assert big.timings["slot_steps"] == fixed.timings["slot_steps"] == sum(steps.values())
    pool = load_images(list_image_files(str(images)))
    top = mine_topk(m, "conv3", pool, [4], 3, 32, cache)
    refs = {"channel:conv3:4": channel_reference_images(m, top, pool, "image", 32)[4],
            "class:1": load_images(str(images / "1"))}
    for key in ("channel:conv3:4", "class:1"):
        kind = key.split(":")[0]
        one = run_sweep(m, str(images), str(tmp_path / kind), layer="conv3" if kind == "channel" else None,
                        channels=[4] if kind == "channel" else None, classes=[1] if kind == "class" else None,
                        batch=2, **kw)
        a = next(r for r in recs if r["key"] == key)
        b = one.manifest["targets"][0]
        assert (a["losses"], a["final_loss"], a["seed"]) == (b["losses"], b["final_loss"], b["seed"])
        for f in ("image", "image_rgba"):
            assert (tmp_path / "big" / a["files"][f]).read_bytes() == (tmp_path / kind / b["files"][f]).read_bytes()
        if not a["stopped_early"]:  # visualize has no early stop
            with torch.backends.mkldnn.flags(enabled=False):
                v = visualize(m, [key], {key: refs[key]}, settings=s, seed=3, class_layers=LAYERS, cache=cache)
            assert float(v.losses[0, -1]) == a["final_loss"]
            from vital_fast.report.pngs import to_uint8

            from PIL import Image

            with Image.open(tmp_path / "big" / a["files"]["image"]) as im:
                assert np.array_equal(np.asarray(im), to_uint8(v.images[0]))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, images, cache_dir, reference_run):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vital_fast", *cli_args(images, out, cache_dir)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if len(index_lines(out)) >= 5 if out.exists() else False:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stderr.close()
    before = index_lines(out)
    assert 5 <= len(before) < N_TARGETS, len(before)
    kept = {r["key"]: snapshot(out / "targets" / r["slug"]) for r in before}
    code = main(cli_args(images, out, cache_dir, "--resume"))
    assert code == 0
    lines = index_lines(out)
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == N_TARGETS  # none redone, none lost, none twice
    for r in before:  # finished targets were not rewritten
        assert snapshot(out / "targets" / r["slug"]) == kept[r["key"]]
    m, got = results(out)
    _, ref = results(reference_run)
    assert m["sweep"]["complete"] and sorted(got) == sorted(ref)
    for k in ref:
        assert got[k] == ref[k], k
    assert sorted(os.listdir(out / "targets")) == sorted(r["slug"] for r in lines)  # no debris
    assert (out / "index.html").is_file()


def test_resume_trusts_only_indexed_complete_targets(tmp_path, images, cache_dir, reference_run):
    out = tmp_path / "torn"
    shutil.copytree(reference_run, out)
    idx = out / "index-rank0.jsonl"
    lines = idx.read_text().splitlines()
    dropped = json.loads(lines[3])["key"]        # folder written, index line lost (crash in between)
    gone = json.loads(lines[7])                  # index line present, folder lost
    idx.write_text("\n".join(lines[:3] + lines[4:]) + "\n" + lines[3][:40])  # plus a torn last line
    shutil.rmtree(out / "targets" / gone["slug"])
    (out / "targets" / ".tmp-debris").mkdir()
    assert len(read_index(str(out))) == N_TARGETS - 2
    code = main(cli_args(images, out, cache_dir, "--resume"))
    assert code == 0
    lines = index_lines(out)
    assert sorted(r["key"] for r in lines[-2:]) == sorted([dropped, gone["key"]])
    _, got = results(out)
    _, ref = results(reference_run)
    assert got == ref
    assert not (out / "targets" / ".tmp-debris").exists()


def test_torchrun_two_ranks(tmp_path, images, cache_dir, reference_run):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "dist"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vital_fast",
           *cli_args(images, out, cache_dir, "--batch", "3")]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {p.name: [json.loads(l) for l in p.read_text().splitlines()] for p in out.glob("index-rank*.jsonl")}
    assert sorted(lines) == ["index-rank0.jsonl", "index-rank1.jsonl"]
    assert all(len(v) > 0 for v in lines.values()), {k: len(v) for k, v in lines.items()}  # both ranks worked
    keys = [rec["key"] for v in lines.values() for rec in v]
    assert len(keys) == len(set(keys)) == N_TARGETS
    m, got = results(out)
    _, ref = results(reference_run)
    assert m["sweep"]["complete"] and m["sweep"]["ranks"] == 2
    assert got == ref
    page = (out / "index.html").read_text()
    assert page.count('class="card"') == N_TARGETS and 'data-metric="' in page


@pytest.mark.parametrize("extra, fragment", [
    (["--channels", "10-20"], "has 16 channels"),
    (["--layer", "fc"], "no spatial channels"),
    (["--layer", "conv9"], "conv9"),
    (["--classes", "7-12"], "outside the valid range 0-9"),
    (["--channels", "1x"], "bad range"),
])
def test_bad_targets_exit_2_nothing_written(tmp_path, images, cache_dir, extra, fragment, capsys):
    out = tmp_path / "o"
    code = main(cli_args(images, out, cache_dir, *extra))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("vital-fast: error")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


def test_folder_of_another_sweep_or_in_use_is_untouched(tmp_path, images, cache_dir, reference_run, capsys):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    before = snapshot(out)
    cases = [
        (["--seed", "6", "--resume"], "different sweep (seed: 5 there, 6 here)"),
        (["--layer", "conv2", "--resume"], "different sweep"),
        (["--steps", "9", "--resume"], "settings stages"),
        ([], "exists and is not empty"),
    ]
    for extra, fragment in cases:
        code = main(cli_args(images, out, cache_dir) + extra)  # a repeated option: the last value wins
        err = capsys.readouterr().err
        assert code == 2 and fragment in err, (extra, err)
        assert snapshot(out) == before
    # another sweep holds the lock: refused, nothing touched
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(cli_args(images, out, cache_dir, "--resume"))
        err = capsys.readouterr().err
        assert code == 2 and "in use by another run" in err, err
        assert snapshot(out) == before
    finally:
        os.close(fd)
    # a plain visualize run folder is not a sweep
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({"tool": "vital_fast", "targets": []}))
    code = main(cli_args(images, tmp_path / "plain", cache_dir, "--resume"))
    assert code == 2 and "not a sweep folder" in capsys.readouterr().err


def test_class_relevance_in_a_sweep_equals_visualize(tmp_path, images, cache_dir):
    """With ``class_relevance`` a swept class target is relevance-weighted from its logit, exactly as
    ``visualize`` does it (bit for bit with oneDNN off)."""
    from vital_fast.report.pngs import to_uint8

    from PIL import Image

    m = tiny_loaded()
    cache = DiskCache(str(cache_dir))
    s = small_settings(stages=[(1.0, 5)], class_relevance=True)
    out = run_sweep(m, str(images), str(tmp_path / "crel"), classes=[1], batch=2, settings=s, seed=3, cache=cache,
                    class_layers=LAYERS, exact=True)
    rec = out.manifest["targets"][0]
    with torch.backends.mkldnn.flags(enabled=False):
        v = visualize(m, ["class:1"], {"class:1": load_images(str(images / "1"))}, settings=s, seed=3,
                      class_layers=LAYERS, cache=cache)
        plain = visualize(m, ["class:1"], {"class:1": load_images(str(images / "1"))},
                          settings=s.replace(class_relevance=False), seed=3, class_layers=LAYERS, cache=cache)
    assert float(v.losses[0, -1]) == rec["final_loss"] != float(plain.losses[0, -1])
    with Image.open(tmp_path / "crel" / rec["files"]["image"]) as im:
        assert np.array_equal(np.asarray(im), to_uint8(v.images[0]))


def test_wnid_class_folders_resolved_per_images_folder(tmp_path, monkeypatch):
    """Two image folders with different wnids.txt, swept in one process: each resolves class 1 by its
    own file (the mapping was once put in os.environ, where the second sweep read the first's)."""
    from PIL import Image

    monkeypatch.delenv("VITAL_FAST_WNIDS", raising=False)
    m = tiny_loaded()
    refs = {}
    for name, ids in (("a", ["n001", "n002"]), ("b", ["n101", "n102"])):
        root = tmp_path / name
        (root / ids[1]).mkdir(parents=True)
        (root / "wnids.txt").write_text("\n".join(ids) + "\n")
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(root / ids[1] / f"{name}.png")
        out = run_sweep(m, str(root), str(tmp_path / f"out-{name}"), classes=[1], batch=1,
                        settings=small_settings(stages=[(1.0, 1)]), cache=DiskCache(enabled=False),
                        class_layers=LAYERS)
        refs[name] = out.manifest["targets"][0]["references"]
    assert refs == {"a": [str(tmp_path / "a" / "n002" / "a.png")], "b": [str(tmp_path / "b" / "n102" / "b.png")]}
    assert "VITAL_FAST_WNIDS" not in os.environ


@pytest.mark.parametrize("batch", [2, 8])
def test_sweep_steady_state_reads_the_device_once_every_ten_steps(tmp_path, images, cache_dir, batch):
    """A sweep's step, like visualize's, leaves its losses on the device and reads them every
    ``loss_every`` (10) steps; finished targets' writes cancel between the two runs compared."""
    from vital_fast.counting import steady_state_counts

    m = tiny_loaded()
    cache = DiskCache(str(cache_dir))
    runs = []

    def run(n):
        runs.append(n)
        run_sweep(m, str(images), str(tmp_path / f"s{len(runs)}"), layer="conv3", channels=f"0-{batch - 1}",
                  settings=small_settings(stages=[(1.0, n)]), seed=1, cache=cache, class_layers=LAYERS, batch=batch)

    c = steady_state_counts(run, 20, [m.model])
    assert c["reads"] <= 0.1, c
