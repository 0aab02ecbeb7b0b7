"""Baselines and metrics: the baselines run in the same engine with the same outputs (batched equals
sequential, bad input stops before any step); the metrics give known answers (identical sets have a
Fréchet distance of 0, a set of the reference images is classified as the judge classifies them, an
image matched against itself has W2 0 and activation ratio 1); bad input gives "n/a" and a message,
never a crash that loses the other metrics; the ``evaluate`` command writes its files and exits 0/2."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from vital_fast.evaluate.baselines import BASELINES, BaselineSettings, baseline_options, run_baseline
from vital_fast.evaluate.metrics import (
    NA,
    compare_runs,
    evaluate_run,
    frechet_distance,
    judge_for,
    load_run,
    topk_hits,
)
from vital_fast.models import load_model
from vital_fast.optim import Settings, visualize
from vital_fast.references.images import load_images
from vital_fast.report.pngs import save_png, to_uint8
from vital_fast.results import read_manifest, save_result


class TinyBN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.act3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def tiny(classes: int = 10, seed: int = 0, bn: bool = True):
    torch.manual_seed(seed)
    net = TinyBN(classes)
    with torch.no_grad():  # BN statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    if not bn:
        net.bn1, net.bn2 = nn.Identity(), nn.Identity()
    return load_model(net, input_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), family="generic")


def small(**kw) -> Settings:
    base = dict(stages=[(0.5, 2), (1.0, 3)], lr=0.1, warmup=1, n_refs=3, ref_crops=4, quantiles=16, jitter=0.1,
                flip=True)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """32x32 PNG reference images (so that the metrics' preprocessing is the identity for the tiny model)."""
    root = tmp_path_factory.mktemp("refs")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(6):
        img = torch.rand(3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(img[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
        p = str(root / f"ref{i}.png")
        save_png(to_uint8(img), p)
        paths.append(p)
    return paths


TARGETS = ["class:1", "class:7", "channel:conv3:5", "channel:conv2:3"]


def refs_for(paths, targets=TARGETS):
    return {t: load_images([paths[i % len(paths)]]) for i, t in enumerate(targets)}


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_outputs_and_dispatch(method, photo_dir):
    m = tiny()
    res = visualize(m, TARGETS, refs_for(photo_dir), settings=small(), seed=3, method=method)
    B = len(TARGETS)
    assert res.images.shape == (B, 3, 32, 32) and res.images.min() >= 0 and res.images.max() <= 1
    assert res.transparency.shape == (B, 1, 32, 32)
    torch.testing.assert_close(res.transparency.flatten(1).amax(1), torch.ones(B))
    assert res.losses.shape == (B, 5) and torch.isfinite(res.losses).all()
    assert isinstance(res.settings, BaselineSettings) and res.settings.method == method
    assert res.settings.stages == small().stages and res.settings.baseline["lr"] == baseline_options(method)["lr"]
    assert res.seeds == [res.targets[i].seed(3) for i in range(B)]
    assert not any(p.requires_grad for p in m.model.parameters())
    for mod in m.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_batched_equals_sequential(method, photo_dir):
    """Each element has its own seed, generator and loss: one batch gives the images of single runs.

    (Reductions over a batch of another size round differently in the last bits, and Adam makes
    pixel differences of those where a gradient nearly cancels: images are compared to 1e-3.)"""
    m = tiny()
    refs = refs_for(photo_dir)
    with torch.backends.mkldnn.flags(enabled=False):
        batched = visualize(m, TARGETS, refs, settings=small(), seed=5, method=method)
        for i in (0, 2):  # a class and a channel target
            t = TARGETS[i]
            single = visualize(m, [t], {t: refs[t]}, settings=small(), seed=5, method=method)
            torch.testing.assert_close(single.images[0], batched.images[i], rtol=0, atol=1e-3, msg=t)
            torch.testing.assert_close(single.losses[0], batched.losses[i], rtol=1e-4, atol=1e-5, msg=t)


@pytest.mark.parametrize("method", ["actmax", "fourier"])
def test_baseline_raises_the_objective(method):
    m = tiny()
    res = run_baseline(m, ["class:3"], method=method, settings=Settings(stages=[(1.0, 30)], warmup=2, jitter=0.0))
    # losses are the negative logit (plus priors): they fall
    assert float(res.losses[0, -5:].mean()) < float(res.losses[0, :5].mean())


def test_baseline_bad_input_before_any_step(photo_dir):
    m = tiny()
    calls = []
    prog = lambda *a: calls.append(a)  # noqa: E731
    with pytest.raises(ValueError, match="unknown method"):
        visualize(m, ["class:1"], settings=small(), method="deepdream")
    with pytest.raises(ValueError, match="unknown actmax options"):
        run_baseline(m, ["class:1"], method="actmax", settings=small(), options={"lr2": 1})
    with pytest.raises(ValueError, match="no reference images for target class:1"):
        run_baseline(m, ["class:1"], method="maco", settings=small(), progress=prog)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        run_baseline(tiny(bn=False), ["class:1"], method="bnstats", settings=small(), progress=prog)
    with pytest.raises(ValueError, match="10 classes"):
        run_baseline(m, ["class:10"], method="fourier", settings=small(), progress=prog)
    with pytest.raises(ValueError, match="conv9"):
        run_baseline(m, ["channel:conv9:0"], method="actmax", settings=small(), progress=prog)
    assert not calls


# ------------------------------------------------------------------------------------------------
# Metrics with known answers
# ------------------------------------------------------------------------------------------------


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 40))  # N < D: rank-deficient covariances
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = rng.normal(size=40)
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)
    # agrees with the usual scipy sqrtm computation where that is well conditioned (N > D)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(a, b, method="sqrtm"), rel=1e-6)
    # closed form in 1-D: FD(z, 3z) = (μ - 3μ)² + σ² + 9σ² - 2·3σ² = 4μ² + 4σ²
    z = rng.normal(size=(500, 1)) + 0.5
    assert frechet_distance(z, 3 * z) == pytest.approx(4 * float(z.mean()) ** 2 + 4 * float(z.var(ddof=1)), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, x[:, :3])


def test_topk_hits_and_default_judge():
    h = topk_hits(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), [1, 2], ks=(1, 2))
    assert h[1].tolist() == [True, False] and h[2].tolist() == [True, True]
    assert judge_for("efficientnet-lite0", 1000) == "efficientnet-lite2"
    assert judge_for("efficientnet-lite2", 1000) == "efficientnet-lite0"
    assert judge_for("Tiny", 10) is None


def make_run(path, m, photo_dir, targets, seed=0, method="actmax", images_are_refs=False):
    refs = refs_for(photo_dir, targets)
    res = run_baseline(m, targets, refs, method=method, settings=small(), seed=seed)
    save_result(res, str(path), seed=seed, extra={"method": method, "preset": "test"})
    if images_are_refs:  # the visualizations are the reference images themselves
        for t in read_manifest(str(path))["targets"]:
            shutil.copy(t["references"][0], os.path.join(str(path), t["files"]["image"]))
    return str(path)


def test_metrics_of_the_references_themselves(tmp_path, photo_dir):
    """Images that are the references: accuracy is what the judge says of them, FD 0, W2 0, ratio 1."""
    m, judge = tiny(), tiny(seed=1)
    targets = ["class:1", "class:7", "class:2", "class:4", "channel:conv3:5"]
    run = make_run(tmp_path / "run", m, photo_dir, targets, images_are_refs=True)
    met = evaluate_run(run, model=m, judge=judge)
    s = met["summary"]
    imgs = torch.stack([load_images([photo_dir[i]]).images[0] for i in range(4)])
    labels = [1, 7, 2, 4]
    with torch.no_grad():
        pj = judge.model(judge.normalize(imgs)).argmax(1).tolist()
        pm = m.model(m.normalize(imgs)).argmax(1).tolist()
    assert s["judge_top1"] == pytest.approx(np.mean([p == c for p, c in zip(pj, labels)]))
    assert s["model_top1"] == pytest.approx(np.mean([p == c for p, c in zip(pm, labels)]))
    assert [met["targets"][f"class:{c}"]["judge_pred"] for c in labels] == pj
    assert s["ref_judge_top1"] == s["judge_top1"]
    assert s["fid"] == pytest.approx(0.0, abs=1e-6)
    assert s["w2"] == pytest.approx(0.0, abs=1e-9)
    assert met["targets"]["channel:conv3:5"]["act_ratio"] == pytest.approx(1.0)
    assert met["targets"]["channel:conv3:5"]["primary"] == pytest.approx(1.0)
    # files, manifest (atomically rewritten) and gallery
    for f in ("metrics.json", "metrics.md", "metrics.csv", "index.html"):
        assert os.path.isfile(os.path.join(run, f)), f
    man = read_manifest(run)
    assert man["metrics"]["summary"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert all("primary" in t["metrics"] for t in man["targets"])
    html = open(os.path.join(run, "index.html"), encoding="utf-8").read()
    assert 'class="metrics"' in html and "judge_top1" in html


def test_metrics_bad_input_keeps_the_rest(tmp_path, photo_dir):
    m = tiny()
    # only channel targets: no accuracy, no FID, but W2 and activation ratio
    run = make_run(tmp_path / "chan", m, photo_dir, ["channel:conv3:5", "channel:conv2:3"])
    met = evaluate_run(run, model=m, judge=tiny(seed=1))
    assert met["summary"]["model_top1"] == NA and met["summary"]["fid"] == NA
    assert isinstance(met["summary"]["w2"], float) and isinstance(met["summary"]["act_ratio"], float)
    assert any("no class targets" in x for x in met["messages"])
    # a judge with another label space: no judge accuracy, FID still computed
    run = make_run(tmp_path / "cls", m, photo_dir, ["class:1", "class:3", "class:4"])
    met = evaluate_run(run, model=m, judge=tiny(classes=5, seed=2))
    assert met["summary"]["judge_top1"] == NA and isinstance(met["summary"]["fid"], float)
    assert isinstance(met["summary"]["model_top1"], float)
    assert any("label spaces" in x for x in met["messages"])
    # one class target: too few images for a Fréchet distance
    run = make_run(tmp_path / "one", m, photo_dir, ["class:1", "channel:conv3:2"])
    met = evaluate_run(run, model=m, judge=tiny(seed=1))
    assert met["summary"]["fid"] == NA and any("at least 2" in x for x in met["messages"])
    assert isinstance(met["summary"]["judge_top1"], float)
    # the model as its own judge: computed, with a warning
    met = evaluate_run(run, model=m, judge=m, write=False)
    assert any("not an independent measure" in x for x in met["messages"])
    # reference files gone, and a model that cannot be loaded by name: judge metrics remain
    man = read_manifest(run)
    for t in man["targets"]:
        t["references"] = ["/nonexistent/a.png"]
    with open(os.path.join(run, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(man, fh)
    met = evaluate_run(run, judge=tiny(seed=1))
    assert any("could not be loaded" in x for x in met["messages"])
    assert any("were not found" in x for x in met["messages"])
    assert isinstance(met["summary"]["judge_top1"], float) and met["summary"]["w2"] == NA
    with pytest.raises(ValueError, match="not a vital_fast run folder"):
        load_run(str(tmp_path))


def test_compare_rows_and_diversity(tmp_path, photo_dir):
    m, judge = tiny(), tiny(seed=1)
    targets = ["class:1", "class:7"]
    runs = [make_run(tmp_path / f"a{s}", m, photo_dir, targets, seed=s) for s in (0, 1)]
    runs.append(make_run(tmp_path / "f", m, photo_dir, targets, method="fourier"))
    same = make_run(tmp_path / "same", m, photo_dir, targets, method="maco")
    rows, md = compare_runs(runs, model=m, judge=judge, out=str(tmp_path / "cmp"))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"actmax (2 runs)", "fourier"}
    assert 0 < by["actmax (2 runs)"]["diversity"] <= 2 and by["fourier"]["diversity"] == NA
    assert md.count("\n") == len(rows) + 1 and "judge top-1" in md
    assert os.path.isfile(tmp_path / "cmp" / "compare.csv")
    # two runs with the same images (same seed copied): diversity 0
    twin = str(tmp_path / "twin")
    shutil.copytree(same, twin)
    man = read_manifest(twin)
    man["seed"] = 99
    with open(os.path.join(twin, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(man, fh)
    rows, _ = compare_runs([same, twin], model=m, judge=judge, write=False)
    assert rows[0]["diversity"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    from vital_fast.cli.main import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lite_runs(tmp_path_factory):
    """Two tiny runs of efficientnet-lite0 (64 px, 3 steps) with offline photographs as references."""
    from vital_fast.references.images import offline_class_photos

    lm = load_model("efficientnet-lite0")
    photos = offline_class_photos()
    refs = {f"class:{c}": load_images(photos[c]) for c in (967, 282)}
    root = tmp_path_factory.mktemp("lite")
    out = []
    for method in ("vital", "fourier"):
        res = visualize(lm, list(refs), refs, settings=small(stages=[(1.0, 3)], ref_crops=0, n_refs=1), size=64,
                        method=method)
        path = str(root / method)
        save_result(res, path, seed=0, extra={"method": method})
        out.append(path)
    return out


def test_cli_evaluate_and_compare(lite_runs, capsys, tmp_path):
    code, out, err = run_cli(["evaluate", lite_runs[0], "--fid-crops", "1"], capsys)
    assert code == 0, err
    assert "judge top-1" in out and "| vital |" in out
    met = json.load(open(os.path.join(lite_runs[0], "metrics.json"), encoding="utf-8"))
    assert met["judge"] == "efficientnet-lite2" and isinstance(met["summary"]["fid"], float)
    assert isinstance(met["summary"]["model_top5"], float)
    code, out, err = run_cli(["evaluate", "--compare", *lite_runs, "--judge", "none", "--out", str(tmp_path / "cmp"),
                              "--no-write"], capsys)
    assert code == 0, err
    assert "| vital |" in out and "| fourier |" in out
    assert os.path.isfile(tmp_path / "cmp" / "compare.md")


@pytest.mark.parametrize("args, fragment", [
    (["evaluate"], "give a run folder"),
    (["evaluate", "/nonexistent/run"], "no such run folder"),
    (["evaluate", "RUN", "--judge", "resnet9000"], "resnet9000"),
    (["evaluate", "RUN", "--out", "X"], "--out is for --compare"),
])
def test_cli_evaluate_bad_input_exit_2(args, fragment, lite_runs, capsys):
    args = [lite_runs[1] if a == "RUN" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("vital-fast: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_cli_evaluate_help(capsys):
    code, out, err = run_cli(["evaluate", "--help"], capsys)
    assert code == 0 and "--compare" in out + err
