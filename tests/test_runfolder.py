"""Run folders refuse what would corrupt them: a folder in use, another run's folder, a folder that is not
a run, an unreadable manifest, an unwritable --out; --force replaces a whole run; slugs never collide."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vital_fast.cli.main import main
from vital_fast.optim.targets import Target
from vital_fast.references.images import offline_photo_path
from vital_fast.runfolder import FolderLock, clear_run, identity_diff, lock_holder, prepare_run_folder, run_identity

SMALL = ["--size", "64", "--steps", "2", "--no-cache"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock's files aside)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f not in (".lock", ".lock.holder"):
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("rf-images")
    (root / "967").mkdir()
    shutil.copy(offline_photo_path("coffee"), root / "967" / "coffee.png")
    (root / "282").mkdir()
    shutil.copy(offline_photo_path("chelsea"), root / "282" / "chelsea.png")
    return root


def visualize_args(images, out, *extra, targets=("class:967", "class:282")):
    args = ["visualize", "--model", "efficientnet-lite0", "--images", str(images), "--out", str(out), *SMALL]
    for t in targets:
        args += ["--target", t]
    return args + list(extra)


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("rf-runs") / "run"
    old = os.umask(0o022)
    try:
        assert main(visualize_args(images, out)) == 0
    finally:
        os.umask(old)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_a_finished_run_records_its_identity_and_steps(finished_run):
    m = json.loads((finished_run / "manifest.json").read_text())
    assert m["run"]["seed"] == 0 and m["run"]["model"] == "efficientnet-lite0" and m["run"]["size"] == 64
    assert all(len(t["losses"]) == 2 for t in m["targets"])  # --steps 2 runs 2 steps


def test_run_files_are_readable_by_others(finished_run):
    """A shared gallery: under umask 022 every file is 0644 and every folder 0755, as with plain open()."""
    for root, dirs, files in os.walk(finished_run):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o755, d
        for f in files:
            if f != ".lock":
                assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o644, f


@pytest.mark.parametrize("extra, fragment", [
    (["--seed", "1"], "seed: 0 there, 1 here"),
    (["--steps", "3"], "settings"),
    (["--method", "actmax"], "method"),
    (["--preset", "paper"], "preset"),
])
def test_resume_refuses_a_different_run(run_copy, images, capsys, extra, fragment):
    before = snapshot(run_copy)
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume", *extra), capsys)
    assert code == 2 and fragment in err and "different run" in err, err
    assert snapshot(run_copy) == before


def test_resume_of_the_same_run_adds_targets(run_copy, images, capsys):
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume", targets=("class:967", "class:282")), capsys)
    assert code == 0 and "already finished" in err, err


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, images, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("my own page")
    for flag in ("--resume", "--force"):
        code, _, err = run_cli(visualize_args(images, out, flag), capsys)
        assert code == 2 and "not a vital_fast run folder" in err, err
        assert (out / "index.html").read_text() == "my own page" and sorted(os.listdir(out)) == ["index.html"]


def test_resume_refuses_an_unreadable_manifest(run_copy, images, capsys):
    p = run_copy / "manifest.json"
    p.write_bytes(p.read_bytes()[:200])  # truncated
    before = snapshot(run_copy)
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume"), capsys)
    assert code == 2 and "manifest" in err, err
    assert snapshot(run_copy) == before


def test_force_replaces_the_whole_run(run_copy, images, capsys):
    (run_copy / "notes.txt").write_text("the user's")
    code, _, err = run_cli(visualize_args(images, run_copy, "--force", "--seed", "5", targets=("class:967",)), capsys)
    assert code == 0, err
    m = json.loads((run_copy / "manifest.json").read_text())
    assert [t["key"] for t in m["targets"]] == ["class:967"] and m["seed"] == 5
    assert os.listdir(run_copy / "targets") == [Target("class", 967).slug]
    assert (run_copy / "notes.txt").read_text() == "the user's"


def test_a_folder_in_use_is_refused(run_copy, images, capsys, tmp_path):
    before = snapshot(run_copy)
    lock = FolderLock()
    lock.take(str(run_copy))
    try:
        code, _, err = run_cli(visualize_args(images, run_copy, "--resume"), capsys)
        assert code == 2 and "in use by another run" in err, err
        code, _, err = run_cli(visualize_args(images, run_copy, "--force"), capsys)
        assert code == 2 and "in use by another run" in err, err
        # an empty folder being written by another run is refused too
        fresh = tmp_path / "fresh"
        other = FolderLock()
        other.take(str(fresh))
        try:
            code, _, err = run_cli(visualize_args(images, fresh), capsys)
            assert code == 2 and "in use" in err, err
        finally:
            other.release()
    finally:
        lock.release()
    assert snapshot(run_copy) == before


def test_save_result_refuses_another_runs_folder(run_copy):
    from vital_fast.models import load_model
    from vital_fast.optim import visualize
    from vital_fast.optim.presets import get_preset
    from vital_fast.references.cache import DiskCache
    from vital_fast.results import save_result

    loaded = load_model("efficientnet-lite0")
    settings = get_preset("fast").replace(stages=[(1.0, 1)], warmup=1)
    res = visualize(loaded, ["class:967"], {"class:967": offline_photo_path("coffee")}, settings=settings, seed=3,
                    size=64, cache=DiskCache(enabled=False))
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="different run"):
        save_result(res, str(run_copy), seed=3)
    assert snapshot(run_copy) == before


def test_unwritable_out_is_found_before_any_work(images, capsys, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    code, _, err = run_cli(visualize_args(images, f / "sub"), capsys)
    assert code == 2 and "not a folder" in err, err
    code, _, err = run_cli(visualize_args(images, "/proc/vital-fast-out"), capsys)
    assert code == 2 and "cannot be written" in err, err


@pytest.mark.parametrize("extra, fragment", [(["--size", "0"], "--size"), (["--steps", "0"], "--steps")])
def test_bad_size_and_steps(images, tmp_path, capsys, extra, fragment):
    code, _, err = run_cli(visualize_args(images, tmp_path / "o", *extra), capsys)
    assert code == 2 and fragment in err and not (tmp_path / "o").exists(), err


def test_one_step_is_one_step(images, tmp_path, capsys):
    code, _, err = run_cli(visualize_args(images, tmp_path / "o", "--steps", "1", targets=("class:967",)), capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert len(m["targets"][0]["losses"]) == 1


def test_slugs_of_distinct_layers_differ():
    names = ["a/b", "a_b", "a b", "a:b", "a__b", "_blocks.10"]
    slugs = {Target("channel", 3, n).slug for n in names}
    assert len(slugs) == len(names)
    assert all("/" not in s and s not in (".", "..") for s in slugs)
    assert Target("channel", 3, "_blocks.10").slug == "channel___blocks.10__3"  # existing folders keep their names


def test_identity_diff_names_the_field():
    a = run_identity(model="m", fingerprint="f", method="vital", seed=0, settings={"lr": 0.1}, size=None, preset="fast")
    b = run_identity(model="m", fingerprint="g", method="vital", seed=0, settings={"lr": 0.2}, size=None, preset="fast")
    d = identity_diff(a, b)
    assert any("model weights" in x for x in d) and any("lr: 0.1 there, 0.2 here" in x for x in d)


def test_identity_diff_passes_a_setting_added_since_at_its_default():
    """A folder written before a setting existed lacks it: at its default it is no difference (the old run ran as the
    default does), anywhere else it is one."""
    from vital_fast.optim import get_preset

    new = get_preset("fast").to_dict()
    old = {k: v for k, v in new.items() if k not in ("channel_later_stages", "channel_later_layers")}
    ident = lambda s: run_identity(model="m", fingerprint="f", method="vital", seed=0, settings=s, size=None,
                                   preset="fast")
    assert identity_diff(ident(old), ident(new)) == []
    d = identity_diff(ident(old), ident(dict(new, channel_later_stages=1)))
    assert d and "channel_later_stages: None there, 1 here" in d[0]
    assert identity_diff(ident(new), ident(old))  # a setting the newer folder holds and this run lacks


# A second process that tries to take the lock of FOLDER: through FolderLock, or the way a lock library
# that opens the lock file with O_TRUNC (filelock's UnixFileLock before 3.30) tries it.
_SECOND = """
import fcntl, os, sys
from vital_fast.runfolder import FolderLock
folder, how = sys.argv[1], sys.argv[2]
if how == "truncating":
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_TRUNC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit("refused")
    sys.exit("taken")
try:
    FolderLock().take(folder)
except ValueError as exc:
    sys.exit(str(exc))
print("taken")
"""


def _second(folder, how="folderlock"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SECOND, str(folder), how], capture_output=True, text=True,
                       timeout=300, env=env)
    return r.returncode, r.stdout + r.stderr


def test_a_second_process_cannot_take_a_held_lock_and_leaves_the_holder_described(tmp_path):
    out = tmp_path / "run"
    lock = FolderLock()
    lock.take(str(out))
    try:
        holder = (out / ".lock.holder").read_text()
        assert holder.startswith(f"pid {os.getpid()} on ") and lock_holder(str(out)) == holder.strip()
        code, text = _second(out)
        assert code == 1 and f"{out} is in use by another run ({holder.strip()})" in text, text
        assert "wait for it to finish or use another --out" in text
        if os.name == "posix":
            code, text = _second(out, "truncating")  # wipes .lock, not the description beside it
            assert code == 1 and "refused" in text, text
        assert (out / ".lock.holder").read_text() == holder
        # the same process, through another FolderLock, is refused alike (never reentrant)
        with pytest.raises(ValueError, match="in use by another run .pid "):
            FolderLock().take(str(out))
        assert (out / ".lock.holder").read_text() == holder
    finally:
        lock.release()
    assert sorted(os.listdir(out)) == [".lock"]  # released: no description left
    code, text = _second(out)
    assert code == 0 and "taken" in text, text  # free again for another process


def test_a_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    code, text = _second(out)  # takes the lock and exits without releasing it
    assert code == 0, text
    stale = (out / ".lock.holder").read_text()
    lock = FolderLock()
    lock.take(str(out))  # the kernel dropped the dead process's lock; its stale description is replaced
    try:
        now = (out / ".lock.holder").read_text()
        assert now.startswith(f"pid {os.getpid()} ") and now != stale
    finally:
        lock.release()


def test_the_holder_description_is_no_user_file_and_survives_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ident = run_identity(model="m", fingerprint="f", method="vital", seed=0, settings={}, size=None, preset=None)
    lock = prepare_run_folder(str(out), ident, resume=False, force=False)  # an empty folder is ours to write
    try:
        (out / "manifest.json").write_text(json.dumps({"tool": "vital_fast", "run": ident, "targets": []}))
        (out / "targets").mkdir()
        (out / "notes.txt").write_text("the user's")
        holder = (out / ".lock.holder").read_text()
        clear_run(str(out))  # what --force removes: never the lock nor its holder's description
        assert sorted(os.listdir(out)) == [".lock", ".lock.holder", "notes.txt"]
        assert (out / ".lock.holder").read_text() == holder
    finally:
        lock.release()
    lock = prepare_run_folder(str(out / "fresh"), ident, resume=False, force=False)  # made, locked, still empty
    lock.release()


def test_resume_and_force_together_are_refused(run_copy, images, capsys):
    """--resume keeps finished targets, --force deletes them: together, one line and nothing touched (force used
    to win silently)."""
    before = snapshot(run_copy)
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume", "--force"), capsys)
    assert code == 2 and "--resume and --force contradict each other" in err, err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("damage", ["image deleted", "record corrupt"])
def test_resume_redoes_a_target_whose_files_are_damaged(run_copy, images, capsys, damage):
    """--resume trusted the manifest: a finished target whose image.png was deleted, or whose result.json is
    corrupt, was never redone."""
    import json as _json

    m = _json.loads((run_copy / "manifest.json").read_text())
    slug = next(t["slug"] for t in m["targets"] if t["key"] == "class:282")
    tdir = run_copy / "targets" / slug
    if damage == "image deleted":
        (tdir / "image.png").unlink()
    else:
        (tdir / "result.json").write_text("{not json")
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume"), capsys)
    assert code == 0 and "missing or unreadable files and are redone: class:282" in err, err
    assert (tdir / "image.png").is_file() and _json.loads((tdir / "result.json").read_text())["key"] == "class:282"
    keys = [t["key"] for t in _json.loads((run_copy / "manifest.json").read_text())["targets"]]
    assert sorted(keys) == ["class:282", "class:967"]


def test_a_run_of_an_older_identity_version_is_refused_naming_both(run_copy, images, capsys):
    """One version number instead of per-field shims: a folder written before identities had one (version 1) is
    neither resumed nor added to; the message names the versions and how to rerun."""
    from vital_fast.runfolder import IDENTITY_VERSION

    m = json.loads((run_copy / "manifest.json").read_text())
    assert m["run"]["version"] == IDENTITY_VERSION and m["run"]["settings"]["loss_every"] == 10  # every field
    del m["run"]["version"]
    (run_copy / "manifest.json").write_text(json.dumps(m))
    before = snapshot(run_copy)
    code, _, err = run_cli(visualize_args(images, run_copy, "--resume"), capsys)
    assert code == 2 and "version 1" in err and f"version {IDENTITY_VERSION}" in err and "new --out" in err
    assert snapshot(run_copy) == before
