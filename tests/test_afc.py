"""The model-observer 2-AFC of unit targets: known answers on synthetic features (separable sets are
always told apart, identical reference sets are a coin flip, the Wilson interval's known values), and a
run folder made by the CLI evaluated end to end (the summary, the tables, "n/a" with a message for one
unit target or a judge without features, the other metrics kept)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from vital_fast.evaluate.afc import (
    AFCUnavailable,
    judge_features,
    pool_afc,
    run_afc,
    two_afc,
    unit_targets,
    wilson_interval,
)
from vital_fast.evaluate.metrics import NA, RunData, compare_runs, evaluate_run
from vital_fast.models import load_model
from vital_fast.report.metrics_io import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

pytestmark = pytest.mark.usefixtures("one_thread")


def judge():
    from test_evaluate import tiny  # a TinyBN with other weights than the visualized model: a cheap judge

    return tiny(seed=1)


def model():
    from test_sweep import tiny_loaded  # the visualized model (the run's manifest names it "Tiny", not a spec)

    return tiny_loaded()


# ------------------------------------------------------------------------------------------------
# Numbers with known answers
# ------------------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson_interval(8, 10, z=2.576)  # 99 %: wider
    assert lo < 0.4902 and hi > 0.9433
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def _check_ci(r):
    assert 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0


def test_two_afc_separable_sets():
    g = np.random.default_rng(0)
    n, d = 5, 16
    basis = np.eye(d)[:n] * 5
    vis = [basis[i] + 0.1 * g.normal(size=d) for i in range(n)]
    refs = [basis[i] + 0.1 * g.normal(size=(4, d)) for i in range(n)]
    r = two_afc(vis, refs)
    assert r["accuracy"] == 1.0 and r["n_targets"] == n and r["n_trials"] == n * (n - 1) == r["n_correct"]
    assert r["per_target"] == [1.0] * n
    _check_ci(r)
    assert r["ci_high"] == 1.0 and r["ci_low"] == pytest.approx(wilson_interval(20, 20)[0])
    # torch tensors, a (D,) reference set of one image, and the swapped assignment: always wrong
    r = two_afc([torch.tensor(v) for v in vis], [torch.tensor(x.mean(0)) for x in refs])
    assert r["accuracy"] == 1.0
    r = two_afc([vis[1], vis[0]], refs[:2])
    assert r["accuracy"] == 0.0 and r["n_trials"] == 2
    _check_ci(r)


def test_two_afc_identical_references_are_chance():
    g = np.random.default_rng(1)
    same = g.normal(size=(6, 32))
    vis = list(g.normal(size=(7, 32)))
    r = two_afc(vis, [same] * 7)  # every trial a tie: half correct
    assert r["accuracy"] == 0.5 and r["per_target"] == [0.5] * 7 and r["n_trials"] == 42
    _check_ci(r)
    assert r["ci_low"] < 0.5 < r["ci_high"]
    # unrelated random features: chance on average (one run's spread is ~0.065 with 20 targets)
    accs = []
    for seed in range(20):
        g = np.random.default_rng(seed)
        r = two_afc(list(g.normal(size=(20, 64))), list(g.normal(size=(20, 8, 64))))
        assert r["n_trials"] == 380
        _check_ci(r)
        accs.append(r["accuracy"])
    assert abs(np.mean(accs) - 0.5) < 0.05


def test_two_afc_bad_input():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match="at least two"):
        two_afc([x[0]], [x])
    with pytest.raises(ValueError, match="reference sets"):
        two_afc([x[0], x[1]], [x])
    with pytest.raises(ValueError, match=r"\(K >= 1, 4\)"):
        two_afc([x[0], x[1]], [x, np.ones((2, 5))])
    with pytest.raises(ValueError, match=r"\(K >= 1, 4\)"):
        two_afc([x[0], x[1]], [x, np.ones((0, 4))])
    with pytest.raises(ValueError, match="finite"):
        two_afc([x[0], x[1] * np.nan], [x, x])


def test_pool_afc():
    p = pool_afc([{"afc": 1.0, "afc_trials": 6}, {"afc": 0.5, "afc_trials": 2}, {"afc": NA, "afc_trials": NA}])
    assert p["afc"] == 0.875 and p["afc_trials"] == 8 and p["afc_ci"] == list(wilson_interval(7, 8))
    assert pool_afc([{"afc": NA}, {}]) == {}


def test_unit_targets_are_every_kind_but_class():
    ts = [{"key": "class:1", "kind": "class"}, {"key": "c", "kind": "channel"}, {"key": "d", "kind": "direction"},
          {"key": "n", "kind": "neuron"}]
    assert [t["key"] for t in unit_targets(ts)] == ["c", "d", "n"]


def test_run_afc_in_memory_leaves_out_targets_without_references():
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(3, 32, 32, generator=g)  # noqa: E731
    kinds = ["channel", "direction", "neuron", "channel"]
    targets = [{"key": f"{k}:{i}", "kind": k, "layer": "conv3", "index": i} for i, k in enumerate(kinds)]
    targets.append({"key": "class:1", "kind": "class", "index": 1})
    images = {t["key"]: img() for t in targets}
    refs = {t["key"]: [img(), img()] for t in targets}
    refs["channel:3"] = []
    rd = RunData("mem", {"targets": targets}, targets, images, refs)
    j = judge()
    r = run_afc(rd, j)
    assert r["keys"] == ["channel:0", "direction:1", "neuron:2"] and r["n_trials"] == 6
    assert any("left out of the 2-AFC" in m for m in r["messages"])
    # the same number from the features directly
    vis = judge_features(j, [images[k] for k in r["keys"]], "vis")
    ref = [judge_features(j, refs[k], "ref") for k in r["keys"]]
    assert r["accuracy"] == two_afc(list(vis), ref)["accuracy"]
    rd.references = {"channel:0": refs["channel:0"]}
    with pytest.raises(AFCUnavailable, match="with reference images, got 1: n/a"):
        run_afc(rd, j)


def test_markdown_hides_the_2afc_columns_without_values():
    md = markdown_table([{"method": "a", "afc": NA}])
    assert "2-AFC" not in md
    md = markdown_table([{"method": "a", "afc": 0.75, "afc_ci": [0.5, 0.9], "afc_trials": 12}, {"method": "b"}])
    assert "2-AFC (judge)" in md and "75.0 %" in md and "[50.0, 90.0] %" in md and "| 12 |" in md


# ------------------------------------------------------------------------------------------------
# A run folder from the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from PIL import Image

    from vital_fast.cli.main import main

    root = tmp_path_factory.mktemp("afc")
    folder = root / "images"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((g.random((36, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = {}
    for name, chans in (("three", (1, 2, 5)), ("one", (1,))):
        path = str(root / name)
        targets = [a for c in chans for a in ("--target", f"channel:conv3:{c}")]
        code = main(["visualize", "--model", "py:test_sweep:tiny_loaded", "--images", str(folder), *targets,
                     "--size", "32", "--steps", "2", "--no-cache", "--workers", "0", "--set", "n_refs=3",
                     "--out", path])
        assert code == 0
        out[name] = path
    return out


def test_evaluate_run_has_the_2afc(runs):
    met = evaluate_run(runs["three"], model=model(), judge=judge())
    s = met["summary"]
    assert isinstance(s["afc"], float) and s["afc_trials"] == 6 and s["afc_targets"] == 3
    lo, hi = s["afc_ci"]
    assert 0.0 <= lo <= s["afc"] <= hi <= 1.0
    accs = [met["targets"][f"channel:conv3:{c}"]["afc"] for c in (1, 2, 5)]
    assert s["afc"] == pytest.approx(np.mean(accs))
    assert not any("2-AFC" in m for m in met["messages"])
    # the files: metrics.md and .csv, the manifest's summary for the gallery
    md = open(os.path.join(runs["three"], "metrics.md"), encoding="utf-8").read()
    assert "2-AFC (judge)" in md and "2-AFC 95 % CI" in md
    assert "afc" in open(os.path.join(runs["three"], "metrics.csv"), encoding="utf-8").readline().split(",")
    man = json.load(open(os.path.join(runs["three"], "manifest.json"), encoding="utf-8"))
    assert man["metrics"]["summary"]["afc_trials"] == 6
    # the comparison table: the column where a run has unit targets; pooled over the runs of a row
    rows, md = compare_runs([runs["three"], runs["one"]], judge=judge(), write=False)
    assert "2-AFC (judge)" in md and rows[0]["afc"] == pytest.approx(s["afc"]) and rows[0]["afc_trials"] == 6


def test_one_unit_target_is_na_with_a_note(runs):
    met = evaluate_run(runs["one"], model=model(), judge=judge(), write=False)
    s = met["summary"]
    assert s["afc"] == NA and s["afc_ci"] == NA and "afc" not in met["targets"]["channel:conv3:1"]
    assert "2-AFC needs at least two channel/unit targets, got 1: n/a" in s["notes"]
    assert isinstance(s["w2"], float) and isinstance(s["act_ratio"], float)  # the other metrics are kept
    assert "2-AFC" not in markdown_table([s])


def test_judge_without_features_is_na_with_a_note(runs):
    torch.manual_seed(0)
    featureless = load_model(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                             input_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    met = evaluate_run(runs["three"], model=model(), judge=featureless, write=False)
    s = met["summary"]
    assert s["afc"] == NA and any("no nn.Linear" in m and "2-AFC is n/a" in m for m in met["messages"])
    assert isinstance(s["w2"], float) and isinstance(s["act_ratio"], float)
    # and no judge at all: nothing to compute, no 2-AFC message
    met = evaluate_run(runs["three"], model=model(), judge=None, write=False)
    assert met["summary"]["afc"] == NA and not any("2-AFC" in m for m in met["messages"])


def test_max_min_afc_counts_closer_to_max_and_ties_as_half():
    from vital_fast.evaluate.afc import max_min_afc

    e = np.eye(3)
    vis = [e[0], e[1], e[2]]
    maxs = [e[:1], e[1:2], e[0:1]]  # the third visualization is closer to its min references
    mins = [e[1:2], e[2:3], e[2:3]]
    r = max_min_afc(vis, maxs, mins)
    assert r["n_trials"] == 3 and r["per_target"] == [1.0, 1.0, 0.0]
    assert r["accuracy"] == pytest.approx(2 / 3) and r["ci_low"] < 2 / 3 < r["ci_high"]
    tie = max_min_afc([e[0]], [e[1:2]], [e[2:3]])
    assert tie["n_correct"] == 0.5
    with pytest.raises(ValueError, match="as many"):
        max_min_afc(vis, maxs[:2], mins)
    with pytest.raises(ValueError, match="finite"):
        max_min_afc([np.full(3, np.nan)], [e[:1]], [e[1:2]])
    with pytest.raises(ValueError, match=r"\(K >= 1, 3\)"):
        max_min_afc([e[0]], [np.ones((1, 4))], [e[1:2]])
