"""Where users work: a result that shows itself in a notebook, the one-call API, and the CLI's --version and
did-you-mean."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch

import vital_fast
from _util import tiny_loaded, tiny_refs
from vital_fast.cli.main import main


@pytest.fixture(scope="module")
def result():
    refs = tiny_refs()
    return vital_fast.visualize(tiny_loaded(), ["class:1", "class:3"], {"class:1": refs, "class:3": refs},
                                steps=3, progress=False)


def test_repr_html_shows_every_image_label_and_reference(result):
    from PIL import Image

    h = result._repr_html_()
    for t in ("class:1", "class:3"):
        assert f"<b>{t}</b>" in h
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', h)
    assert len(uris) == 2 + 2 * 3  # an image per target and its three references
    for u in uris:
        assert Image.open(io.BytesIO(base64.b64decode(u))).size[0] > 0
    assert "final loss" in h and "3 steps" in h
    # what the model says of each image: its top prediction (a class target)
    for t in ("class:1", "class:3"):
        idx, name, prob = result.annotations[t]["predictions"][0]
        assert 0 <= prob <= 1
    assert h.count("model: ") == 2


def test_repr_html_of_unit_targets_shows_their_activation():
    import vital_fast as vf
    from vital_fast.references.images import offline_photo_path

    lite = vf.load_model("efficientnet-lite0")
    photos = [offline_photo_path("coffee"), offline_photo_path("chelsea")]
    r = vf.visualize(lite, "channel:_blocks.4:3", photos, steps=1, size=64, progress=False)
    assert "activation_ratio" in r.annotations["channel:_blocks.4:3"]
    assert "x its references" in r._repr_html_()


def test_repr_is_short_and_show_and_save_work(result, tmp_path):
    r = repr(result)
    assert len(r) < 300 and "tensor(" not in r and "class:1" in r
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    fig = result.show()
    assert len([a for a in fig.axes if a.get_title()]) == 2
    index = result.save(str(tmp_path / "run"))
    assert index.endswith("index.html") and (tmp_path / "run" / "manifest.json").is_file()


def test_one_call_with_a_single_target_a_single_source_and_steps(tmp_path):
    res = vital_fast.visualize(tiny_loaded(), "class:2", tiny_refs(), steps=4, progress=False)
    assert [t.key for t in res.targets] == ["class:2"] and res.losses.shape == (1, 4)
    assert vital_fast.get_preset("fast").with_steps(4).steps == 4
    with pytest.raises(ValueError, match="a single reference source is for one target, got 2 targets"):
        vital_fast.visualize(tiny_loaded(), ["class:1", "class:2"], tiny_refs(), steps=2)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1, got 0"):
        vital_fast.visualize(tiny_loaded(), "class:2", tiny_refs(), steps=0)


def test_a_channel_target_without_references_is_told_about_pool():
    with pytest.raises(ValueError, match=r"pass references=\{'channel:conv2:1': \.\.\.\} or pool=\.\.\."):
        vital_fast.visualize(tiny_loaded(), "channel:conv2:1", steps=2)


def test_cli_version_and_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        from vital_fast.cli.main import build_parser

        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vital_fast {vital_fast.__version__} (torch {torch.__version__}") and "backends:" in out
    assert main(["--version"]) == 0
    assert main(["visualise"]) == 2
    assert "did you mean 'visualize'?" in capsys.readouterr().err


def test_help_texts_are_true_to_what_runs(capsys):
    """Stale texts the issue found: --param said VITAL defaults to pixels (fast: Fourier), --random-weights said
    torchvision only, --model omitted timm:NAME; --verbose worked only before the subcommand."""
    from vital_fast.cli.main import build_parser
    from vital_fast.optim.presets import get_preset

    v = build_parser()._subparsers._group_actions[0].choices["visualize"]
    helps = {a.option_strings[0]: a.help for a in v._actions if a.option_strings}
    assert "fourier for fast" in helps["--param"] and get_preset("fast").param == "fourier"
    assert "pixel for paper" in helps["--param"] and get_preset("paper").param == "pixel"
    assert "timm" in helps["--random-weights"] and "timm:NAME" in helps["--model"]
    args = build_parser().parse_args(["visualize", "--model", "m", "--target", "class:1", "--images", "i", "--out", "o",
                                      "--verbose"])
    assert args.cmd == "visualize"


def test_bad_input_of_the_one_call_is_one_line(result, monkeypatch):
    """A reference path that does not exist, and show() without matplotlib: one line naming the problem (and the
    extra that installs the missing package)."""
    import sys

    with pytest.raises((ValueError, FileNotFoundError)) as e:
        vital_fast.visualize(tiny_loaded(), "class:2", "/no/such/photos", steps=1)
    assert "/no/such/photos" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib \(or vital_fast\[demo\]\)"):
        result.show()


def test_did_you_mean_for_options(capsys):
    assert main(["visualize", "--model", "m", "--target", "class:1", "--images", ".", "--out", "o",
                 "--stpes", "3"]) == 2
    assert "--stpes -> --steps" in capsys.readouterr().err
