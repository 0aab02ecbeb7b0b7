"""The command-line tool: exit codes, one-line errors, nothing written on bad input, an end-to-end
run whose manifest lists every file, and the gallery rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vital_fast.cli.main import main
from vital_fast.references.images import offline_photo_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cmd", [[], ["demo"], ["layers"], ["visualize"], ["report"], ["compare"], ["bench"], ["sweep"]])
def test_help(cmd, capsys):
    code, out, err = run_cli(cmd + ["--help"], capsys)
    assert code == 0 and "usage" in (out + err).lower()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "967").mkdir()
    shutil.copy(offline_photo_path("coffee"), root / "967" / "coffee.png")
    # A file name that must be escaped in the gallery, and an unreadable file that is skipped.
    shutil.copy(offline_photo_path("chelsea"), root / "967" / "<b>cat&'\".png")
    (root / "967" / "broken.jpg").write_bytes(b"not an image")
    (root / "pool").mkdir()
    for n in ("rocket", "china", "flower"):
        shutil.copy(offline_photo_path(n), root / "pool" / f"{n}{os.path.splitext(offline_photo_path(n))[1]}")
    return root


@pytest.mark.parametrize("args, fragment", [
    (["layers", "resnet9000"], "resnet9000"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", "/nonexistent", "--out", "OUT"], "no such folder"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "klass:1", "--images", "IMG", "--out", "OUT"], "valid forms"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", "IMG", "--out", "OUT", "--preset", "slow"], "unknown preset"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "channel:_blocks.99:1", "--images", "IMG", "--out", "OUT"], "_blocks.9"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "channel:_blocks.15:999", "--images", "IMG", "--out", "OUT"], "has 320 channels"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "class:5", "--images", "IMG", "--out", "OUT"], "no reference images for class:5"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", "IMG", "--out", "OUT", "--lrp-every", "0"], "--lrp-every must be >= 1"),
    (["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", "IMG", "--out", "OUT", "--workers", "-1"], "--workers must be >= 0"),
    (["report", "IMG"], "not a vital_fast run folder"),
])
def test_bad_input_exit_2_one_line_nothing_written(args, fragment, capsys, tmp_path, image_folder):
    out_dir = tmp_path / "out"
    args = [str(out_dir) if a == "OUT" else str(image_folder) if a == "IMG" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("vital-fast: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_existing_output_is_not_overwritten(capsys, tmp_path, image_folder):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images",
                            str(image_folder), "--out", str(out_dir)], capsys)
    assert code == 2 and "--force" in err and (out_dir / "mine.txt").read_text() == "keep me"


def test_layers_lists_shapes(capsys):
    code, out, _ = run_cli(["layers", "efficientnet-lite0"], capsys)
    assert code == 0 and "_blocks.15" in out and "(320, 7, 7)" in out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, image_folder):
    out_dir = tmp_path_factory.mktemp("run") / "r"
    cache = tmp_path_factory.mktemp("cache")
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--target",
                 "channel:_blocks.4:3", "--images", str(image_folder), "--out", str(out_dir), "--size", "64",
                 "--steps", "4", "--batch", "2", "--cache", str(cache)])
    assert code == 0
    return out_dir


def test_visualize_end_to_end(small_run):
    m = json.loads((small_run / "manifest.json").read_text())
    assert m["model"]["name"] == "efficientnet-lite0" and len(m["model"]["fingerprint"]) >= 16
    assert sorted(t["key"] for t in m["targets"]) == ["channel:_blocks.4:3", "class:967"]
    for t in m["targets"]:
        assert len(t["losses"]) == 4
        for rel in t["files"].values():
            assert (small_run / rel).is_file()
    assert (small_run / "index.html").is_file()
    page = (small_run / "index.html").read_text()
    assert "<b>cat" not in page and "&lt;b&gt;cat" in page  # file names are escaped


def test_resume_skips_finished_targets(small_run, capsys, image_folder):
    code, _, err = run_cli(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images",
                            str(image_folder), "--out", str(small_run), "--resume", "--size", "64", "--steps", "4"],
                           capsys)
    assert code == 0 and "already finished" in err


def test_report_and_compare(small_run, capsys, tmp_path):
    code, out, _ = run_cli(["report", str(small_run)], capsys)
    assert code == 0 and out.strip().endswith("index.html")
    other = tmp_path / "copy"
    shutil.copytree(small_run, other)
    code, out, err = run_cli(["compare", str(small_run), str(other), "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(rep["targets"]) == 2 and all(abs(t["distance"]) < 1e-5 for t in rep["targets"])


def _chromium_dom(url: str, tmp_path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,3000", "--virtual-time-budget=4000",
           "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_gallery_index_filter_is_numeric(small_run, tmp_path):
    """The index filter takes numbers and ranges (3 must not match 30-39 or 967) and is pre-filled from the URL hash."""
    import re

    base = (small_run / "index.html").as_uri()
    for spec, shown in [("3", 1), ("967", 1), ("0-2", 0), ("1-5,900-999", 2), ("", 2)]:
        dom = _chromium_dom(f"{base}#index={spec}", tmp_path)
        info = re.search(r'id="info">([^<]*)<', dom)
        assert info and info.group(1) == f"{shown} of 2 targets", (spec, info and info.group(1))
    dom = _chromium_dom(f"{base}#index=abc", tmp_path)
    assert re.search(r'id="idx"[^>]*class="bad"', dom), "an invalid index spec is marked"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_gallery_renders_in_headless_chromium(small_run, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,6000", "--virtual-time-budget=8000",
           "--enable-logging=stderr", "--v=0", "--dump-dom", (small_run / "index.html").as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = res.stdout
    assert 'data-images-total="' in dom, res.stderr[-2000:]
    import re

    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert total >= 6 and loaded == total, (loaded, total)
    assert 'data-js-errors="0"' in dom
    console = [l for l in res.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not [l for l in console if "error" in l.lower() or "Uncaught" in l], console
