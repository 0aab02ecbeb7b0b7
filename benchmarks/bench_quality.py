"""What the optimizer's options cost or buy in quality, on efficientnet-lite0 with offline photographs.

    python -m benchmarks.bench_quality [--only class|channel] [--seeds 0 1 2] [--params pixel fourier] [--afc]

Class targets (the demo's six classes): top-1 / top-5 of the visualizations by lite0 itself and by
efficientnet-lite2 as an independent judge, for the `fast` preset, the `fast` preset without its
robustness transforms (flip, zoom, rotation), the `fast` schedule doubled in length, and the `fast`
preset with class relevance (features weighted by LRP relevance from the class logit); with
``--seeds`` each row sums the hits of one run per seed.

Channel targets (four channels of `_blocks.10`, references mined from the offline photographs): the
target channel's spatial-max activation on the visualization relative to its mean on the top-k real
references, for full-image references (the paper's code) against patches at the unit (the paper's
text), and for relevance every step (`lrp_every=1`, the paper) against every 4 steps; with the seconds
per target-step of each. With ``--afc``, also the model-observer 2-AFC of the channel visualizations
by efficientnet-lite2 (:mod:`vital_fast.evaluate.afc`: is a visualization closer, in the judge's
penultimate features, to its own channel's references than to another channel's; 4 channels give 12
trials, so its 95 % interval is wide).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from vital_fast.cli.demo import DEMO_CLASSES, DEMO_LAYER
from vital_fast.evaluate.afc import afc_of_images
from vital_fast.models import FeatureTaps, load_model
from vital_fast.optim import get_preset, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import load_images, offline_class_photos, offline_photo_paths
from vital_fast.references.mining import channel_reference_images, mine_topk


def judge_top(loaded, images, classes):
    x = F.interpolate(images, size=(loaded.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        top = loaded.model(loaded.normalize(x)).topk(5, dim=-1).indices
    return (sum(int(top[i, 0]) == c for i, c in enumerate(classes)), sum(c in top[i].tolist() for i, c in enumerate(classes)))


def class_rows(model, judge, cache, seeds=(0,)):
    photos = offline_class_photos()
    refs = {f"class:{c}": load_images(photos[c]) for c in DEMO_CLASSES}
    fast = get_preset("fast")
    variants = {
        "fast": fast,
        "fast without flip/zoom/rotation": fast.replace(flip=False, scale=0.0, rotate=0.0),
        "fast, twice the steps": fast.replace(stages=[(s, 2 * n) for s, n in fast.stages]),
        "fast, class relevance": fast.replace(class_relevance=True),
    }
    n = len(DEMO_CLASSES) * len(seeds)
    print(f"| class targets ({len(DEMO_CLASSES)} x {len(seeds)} seeds) | lite0 top-1 | lite0 top-5 | lite2 top-1 | "
          "lite2 top-5 | s per target-step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in variants.items():
        tot, spt = [0, 0, 0, 0], []
        for seed in seeds:
            res = visualize(model, list(refs), refs, settings=s, seed=seed, cache=cache)
            hits = judge_top(model, res.images, DEMO_CLASSES) + judge_top(judge, res.images, DEMO_CLASSES)
            tot = [a + b for a, b in zip(tot, hits)]
            spt.append(res.timings["s_per_target_step"])
        print(f"| {name} | " + " | ".join(f"{h}/{n}" for h in tot) + f" | {sum(spt) / len(spt):.3f} |", flush=True)


def channel_rows(model, cache, n_channels=4, k=3, params=("settings",), judge=None):
    pool = load_images(offline_photo_paths())
    size = model.input_size
    top = mine_topk(model, DEMO_LAYER, pool, None, k, size, cache)
    chans = sorted(top.channels[i] for i in top.mean_score.topk(n_channels).indices.tolist())
    top = mine_topk(model, DEMO_LAYER, pool, chans, k, size, cache)
    fast = get_preset("fast")
    # the relevance-weighted loss of the paper (the fast preset's unit targets match without relevance)
    rel = fast.replace(channel_relevance=True, channel_target_weight=0.0, channel_later_weight=0.0)
    variants = {
        "fast preset (patches, no relevance, unit's layer matched)": ("patch", fast),
        "image references, lrp_every=1": ("image", rel.replace(channel_refs="image")),
        "patch references, lrp_every=1": ("patch", rel.replace(channel_refs="patch")),
        "image references, lrp_every=4": ("image", rel.replace(channel_refs="image", lrp_every=4)),
    }
    # "settings": each variant's own parametrization (the fast preset's Fourier image, pixels for the others)
    variants = {(f"{name}, {p}" if p != "settings" else name): (mode, s if p != "settings" else
                                                                 (s if s is fast else s.replace(param="pixel")),
                                                                 None if p == "settings" else p)
                for p in params for name, (mode, s) in variants.items()}
    print("| channel targets (4 of _blocks.10) | activation / mean top-k activation | s per target-step |"
          + (" 2-AFC (lite2 judge), 95 % CI |" if judge is not None else ""))
    print("|---|---:|---:|" + ("---:|" if judge is not None else ""))
    for name, (mode, s, param) in variants.items():
        per = channel_reference_images(model, top, pool, mode, size)
        targets = [f"channel:{DEMO_LAYER}:{c}" for c in chans]
        res = visualize(model, targets, {t: per[c] for t, c in zip(targets, chans)}, settings=s, seed=0, cache=cache,
                        param=param)
        with torch.no_grad(), FeatureTaps(model.model, [DEMO_LAYER], stop_after=True) as taps:
            a = taps.run(model.normalize(res.images))[DEMO_LAYER]
        got = a[torch.arange(len(chans)), torch.tensor(chans)].flatten(1).amax(1)
        rel = (got / top.mean_score.clamp_min(1e-6)).tolist()
        afc = ""
        if judge is not None:
            r = afc_of_images(judge, list(res.images), [per[c].images for c in chans])
            afc = (f" {100 * r['accuracy']:.0f} % [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] "
                   f"of {r['n_trials']} |")
        print(f"| {name} | {sum(rel) / len(rel):.2f} ({', '.join(f'{r:.2f}' for r in rel)}) | "
              f"{res.timings['s_per_target_step']:.3f} |" + afc, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["class", "channel"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="class targets: one run per seed, counts summed")
    ap.add_argument("--params", nargs="+", default=["settings"], help="channel targets: parametrizations to compare "
                    "(pixel, fourier, maco); each variant once per parametrization (default: each variant's own)")
    ap.add_argument("--afc", action="store_true", help="channel targets: add the 2-AFC by efficientnet-lite2")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model("efficientnet-lite0")
    cache = DiskCache()
    t0 = time.time()
    judge = load_model("efficientnet-lite2") if a.only in (None, "class") or a.afc else None
    if a.only in (None, "class"):
        class_rows(model, judge, cache, a.seeds)
    if a.only in (None, "channel"):
        channel_rows(model, cache, params=a.params, judge=judge if a.afc else None)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
