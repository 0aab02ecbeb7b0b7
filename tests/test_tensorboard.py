"""``--log tensorboard DIR``: each target's loss curve, image and references in TensorBoard event files; a
resumed run logs only what is new; bad input is one line before any work."""

from __future__ import annotations

import shutil
import sys

import pytest

from vital_fast.cli.main import main
from vital_fast.references.images import offline_photo_path

tb = pytest.importorskip("tensorboard", reason="the tensorboard extra")


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_images")
    (root / "967").mkdir()
    for n in ("coffee", "chelsea"):
        shutil.copy(offline_photo_path(n), root / "967" / f"{n}.png")
    return root


def test_visualize_logs_loss_curves_and_images_once(images, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "tb"
    args = ["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--target", "channel:_blocks.4:3",
            "--images", str(images), "--out", str(out), "--size", "64", "--steps", "3", "--batch", "1",
            "--cache", str(tmp_path / "cache"), "--log", "tensorboard", str(log)]
    assert main(args) == 0
    assert "logged 1 target(s)" in capsys.readouterr().err  # one batch at a time, as each finishes
    acc = _events(log)
    tags = acc.Tags()
    for key in ("class:967", "channel:_blocks.4:3"):
        curve = acc.Scalars(f"loss/run/{key}")
        assert [e.step for e in curve] == [0, 1, 2] and all(e.value > 0 for e in curve)
        assert f"image/run/{key}" in tags["images"] and f"references/run/{key}" in tags["images"]
        img = acc.Images(f"image/run/{key}")[0]
        assert img.width == 64 and img.height == 64
    # --resume with nothing left to do, and a second call: nothing logged twice
    assert main(args + ["--resume"]) == 0
    from vital_fast.report.tensorboard import log_run_folder

    assert log_run_folder(str(out), str(log)) == 0
    acc = _events(log)
    assert len(acc.Scalars("loss/run/class:967")) == 3


@pytest.mark.parametrize("log, fragment", [
    (["wandb", "DIR"], "unknown logger 'wandb'; valid: tensorboard"),
    (["tensorboard", "FILE"], "exists and is not a folder"),
])
def test_bad_log_arguments_exit_2_before_any_work(log, fragment, images, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    log = [str(tmp_path / "file") if a == "FILE" else str(tmp_path / "tb") if a == "DIR" else a for a in log]
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(images),
                 "--out", str(tmp_path / "run"), "--log", *log])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_tensorboard_names_the_extra(monkeypatch, images, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(images),
                 "--out", str(tmp_path / "run"), "--log", "tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    assert code == 2 and "vital_fast[tensorboard]" in err


def test_a_run_replaced_with_force_is_logged_again(images, tmp_path, capsys, monkeypatch):
    import vital_fast.results as results
    from vital_fast.report.tensorboard import RECORD

    out, log = tmp_path / "run", tmp_path / "tb"
    args = ["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images", str(images),
            "--out", str(out), "--size", "64", "--steps", "2", "--cache", str(tmp_path / "cache"),
            "--log", "tensorboard", str(log)]
    assert main(args) == 0
    capsys.readouterr()
    stamps = iter(["2026-12-05T10:00:01+0000", "2026-12-05T10:00:02+0000"])
    real = results.time.strftime
    monkeypatch.setattr(results.time, "strftime", lambda fmt, *a: next(stamps) if "%S" in fmt else real(fmt, *a))
    assert main(args + ["--force"]) == 0
    assert "logged 1 target(s)" in capsys.readouterr().err  # the new run: logged although the folder is the same
    import json

    assert len(json.loads((log / RECORD).read_text())["logged"]) == 2
