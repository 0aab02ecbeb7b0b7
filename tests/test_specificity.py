"""Specificity and copying (issue 26): known answers on arrays, and both metrics in a run's evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from vital_fast.evaluate.specificity import copy_index, specificity


def test_specificity_of_a_diagonal_and_of_a_texture():
    own = np.array([[5.0, 1.0, 1.0], [1.0, 4.0, 2.0], [1.0, 1.0, 3.0]])  # each image drives its own unit most
    frac, med, ratios = specificity(own)
    assert frac == 1.0 and np.allclose(ratios, [5.0, 4.0, 1.5]) and med == 4.0  # column j: unit j
    texture = np.array([[5.0, 1.0], [6.0, 2.0]])  # image 1 drives unit 0 harder than unit 0's own image
    frac, med, ratios = specificity(texture)
    assert frac == 0.5 and np.allclose(ratios, [5 / 6, 2.0])
    neg = np.array([[1.0, 2.0], [-2.0, -3.0]])  # unit 0's strongest other drive is negative: no ratio
    _, _, ratios = specificity(neg)
    assert np.isnan(ratios[0]) and ratios[1] == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="at least 2 units"):
        specificity(np.ones((1, 1)))
    with_nan = own.copy()
    with_nan[0, 1] = np.nan  # a NaN drive is no trial: the rest still all won
    frac, _, ratios = specificity(with_nan)
    assert frac == 1.0 and np.isfinite(ratios).all()


def test_copy_index_of_a_copy_and_of_a_blend():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(6, 32)) + 3.0  # references alike but distinct
    assert copy_index(refs[2], refs) > 1.0  # the image is one of them: closer than they are to each other
    blend = refs.mean(0)
    far = -refs.mean(0)
    assert copy_index(far, refs) < 0 < copy_index(blend, refs)
    with pytest.raises(ValueError, match="at least 2"):
        copy_index(refs[0], refs[:1])


def test_a_run_of_channel_targets_gets_specificity_and_copy(tmp_path):
    import vital_fast as vf
    from vital_fast.evaluate.metrics import evaluate_run
    from vital_fast.references.images import offline_photo_path

    lite = vf.load_model("efficientnet-lite0")
    pool = [offline_photo_path(n) for n in ("coffee", "chelsea", "rocket", "astronaut", "china")]
    targets = [f"channel:_blocks.4:{c}" for c in (1, 3, 5)]
    r = vf.visualize(lite, targets, pool=pool, steps=2, size=64, settings=vf.get_preset("fast").replace(n_refs=3))
    r.save(str(tmp_path / "run"))
    m = evaluate_run(str(tmp_path / "run"), judge="efficientnet-lite0", write=False)
    s = m["summary"]
    assert 0.0 <= s["specificity"] <= 1.0 and isinstance(s["spec_ratio"], float) and isinstance(s["copy"], float)
    assert all("copy" in m["targets"][t] and "spec_ratio" in m["targets"][t] for t in targets)
