"""The method works: class visualizations made with the `fast` preset, on efficientnet-lite0 with real
photographs that ship in installed packages as references, are recognized by the model itself and by
efficientnet-lite2 as an independent judge.

One optimization is chaotic: a last-bit difference in any convolution (another CPU's oneDNN
kernels, another thread count) gives a different image after 150 steps, so a single seed is one
random draw (seed 0 scored lite0 top-1 2 of 6 on one Intel machine and passed on the machine that
made the test). The hits are therefore summed over three seeds and held to thresholds with a
margin measured over nine draws on an Intel Xeon (AVX-512): seeds 0-5 on 2 threads and seeds 0-2
on 1 thread (a different convolution path):

    lite0 top-1 per seed (of 6):   2 5 5 4 3 3 | 3 5 3     seeds 0-2: 12 and 11 of 18
    lite0 top-5 per seed (of 6):   6 in every draw          seeds 0-2: 18 of 18
    judge top-1 per seed (of 4):   3 3 3 4 3 3 | 4 3 3     seeds 0-2: 9 and 10 of 12

(About 2.5 minutes on 2 CPU cores.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vital_fast.cli.demo import DEMO_CLASSES
from vital_fast.models import load_model
from vital_fast.optim import visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import load_images, offline_class_photos

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)


def top5(loaded, images):
    x = F.interpolate(images, size=(loaded.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        return loaded.model(loaded.normalize(x)).topk(5, dim=-1).indices


def test_fast_preset_visualizations_are_recognized(tmp_path):
    model, judge = load_model("efficientnet-lite0"), load_model("efficientnet-lite2")
    photos = offline_class_photos()
    refs = {f"class:{c}": load_images(photos[c]) for c in DEMO_CLASSES}
    classes = list(DEMO_CLASSES)
    # The judge is held to the classes it recognizes in the reference photographs themselves
    # (lite2 calls the tiger-cat photo an Egyptian cat and the daisy photo a honeycomb).
    ref_imgs = torch.stack([judge.resize_crop(refs[f"class:{c}"].images[0]) for c in classes])
    judge_on_refs = top5(judge, ref_imgs)[:, 0].tolist()
    fair = [i for i, c in enumerate(classes) if judge_on_refs[i] == c]
    assert len(fair) >= 3, f"the judge recognizes only {len(fair)} reference photographs: {judge_on_refs}"
    own_top1 = own_top5 = judge_top1 = 0
    lines = []
    for seed in SEEDS:
        res = visualize(model, list(refs), refs, preset="fast", seed=seed, cache=DiskCache(str(tmp_path)))
        own, jud = top5(model, res.images), top5(judge, res.images)
        own_top1 += sum(int(own[i, 0]) == c for i, c in enumerate(classes))
        own_top5 += sum(c in own[i].tolist() for i, c in enumerate(classes))
        judge_top1 += sum(int(jud[i, 0]) == classes[i] for i in fair)
        lines.append(f"seed {seed}: own top-1 {own[:, 0].tolist()}, judge top-1 {jud[:, 0].tolist()}")
    n = len(SEEDS) * len(classes)
    msg = (f"own top-1 {own_top1}/{n}, own top-5 {own_top5}/{n}, "
           f"judge top-1 {judge_top1}/{len(SEEDS) * len(fair)} on the classes it recognizes in the "
           f"photographs {[classes[i] for i in fair]}; classes {classes}; " + "; ".join(lines))
    # Measured (seeds 0-2): top-5 18/18, top-1 11-12/18, judge 9-10/12. Chance is 1 in 1000.
    assert own_top5 >= n - 3, msg
    assert own_top1 * 3 >= n, msg  # at least a third (6 of 18)
    assert judge_top1 * 2 > len(SEEDS) * len(fair), msg  # more than half (7 of 12)
