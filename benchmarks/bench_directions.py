"""Direction targets against channel targets on efficientnet-lite0, with offline photographs.

    python -m benchmarks.bench_directions [--layer _blocks.10] [--crops 8] [--channels 4] [--random 4]
                                          [--steps N] [--seed 0] [--threads 2]

The pool: ``--crops`` random crops of each offline photograph, in memory: those of the Python packages
(:func:`offline_photo_paths`) and, when Debian's wallpaper packages are installed, their photographs too (the pool of
:mod:`benchmarks.bench_channels`, 46 photographs). The targets, all with VITAL's ``fast`` preset (``--steps`` scales it), at ``--layer``:

* ``--channels`` channels picked by a rule fixed in advance: the largest mean top-k activation over the pool;
* ``--random`` random directions (Gaussian, unit length, seeded);
* one probe direction: ``vital_fast.concepts.train_concept`` on the crops of the cat photograph
  (``chelsea``) against as many crops of the others, its held-out accuracy printed.

Per group: the unit's mean activation on its visualization over its mean on its top-k references
(:func:`vital_fast.models.predict.channel_activation_ratio`), and the model-observer 2-AFC by
efficientnet-lite2 (:mod:`vital_fast.evaluate.afc`) within the group and over all targets together, with
95 % Wilson intervals; and seconds per target-step.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.bench_channels import build_pool
from vital_fast.cli.demo import DEMO_LAYER
from vital_fast.evaluate.afc import afc_of_images
from vital_fast.models import load_model
from vital_fast.optim import get_preset, visualize
from vital_fast.optim.targets import Target, direction_target
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_images, offline_photo_paths, random_resized_crops, tensor_hash
from vital_fast.references.mining import mine_topk
from vital_fast.references.pool import ImagePool
from vital_fast.models.predict import channel_activation_ratio


def crops_of(paths, n, size, seed):
    g = torch.Generator().manual_seed(seed)
    photos = load_images(list(paths))
    imgs, names = [], []
    for img, name in zip(photos.images, photos.names):
        for j, c in enumerate(random_resized_crops(img, size, n, g)):
            imgs.append(c)
            names.append(f"{name}#crop{j}")
    return ImageSet(imgs, names, [tensor_hash(x) for x in imgs])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", default=DEMO_LAYER)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--random", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model("efficientnet-lite0")
    judge = load_model("efficientnet-lite2")
    cache = DiskCache(enabled=False)
    s = get_preset("fast")
    if a.steps:
        from vital_fast.cli.common import scaled_stages

        s = s.replace(**scaled_stages(s, a.steps))
    size = model.input_size
    paths = offline_photo_paths()
    pool, n_photos = build_pool(size + 32, a.crops, a.seed)
    k = min(s.n_refs, len(pool))

    top = mine_topk(model, a.layer, pool, None, k, size, cache)
    chans = sorted(top.channels[i] for i in top.mean_score.topk(a.channels).indices.tolist())
    C = len(top.channels)
    g = torch.Generator().manual_seed(a.seed)
    rand = [direction_target(a.layer, v / v.norm(), row=i, source="random")
            for i, v in enumerate(torch.randn(a.random, C, generator=g))]

    from vital_fast.concepts import train_concept

    cat = [p for p in paths if "chelsea" in p]
    others = [p for p in paths if "chelsea" not in p]
    pos = crops_of(cat, a.crops, size + 32, a.seed + 1)
    neg_all = crops_of(others, max(1, a.crops // len(others) + 1), size + 32, a.seed + 2)
    neg = neg_all.subset(range(min(len(neg_all), len(pos))))
    probe = train_concept(model, a.layer, ImagePool.from_imageset(pos), ImagePool.from_imageset(neg), seed=a.seed)
    probe_t = direction_target(a.layer, probe.direction, bias=probe.bias, source="probe(chelsea)")
    groups = {
        f"{len(chans)} channels (most active over the pool)": [Target("channel", c, a.layer) for c in chans],
        f"{len(rand)} random directions": rand,
        f"1 probe direction (cat vs other photos; held-out accuracy {probe.accuracy:.2f} on {probe.n_test})": [probe_t],
    }
    targets = [t for ts in groups.values() for t in ts]
    print(f"efficientnet-lite0 {a.layer}: pool of {len(pool)} crops of {n_photos} photographs, top-{k} references, "
          f"fast preset ({s.steps} steps), seed {a.seed}, {a.threads} threads", file=sys.stderr)
    res = visualize(model, targets, pool=pool, settings=s, seed=a.seed, size=size, cache=cache)
    refs = {t.key: r for t, r in zip(res.targets, res.references)}
    img = {t.key: res.images[i] for i, t in enumerate(res.targets)}

    def afc(ts):
        if len(ts) < 2:
            return "n/a (one target)"
        r = afc_of_images(judge, [img[t.key] for t in ts], [refs[t.key].images for t in ts])
        return f"{100 * r['accuracy']:.0f} % [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] of {r['n_trials']}"

    print("| targets | activation / mean on references | 2-AFC within the group (lite2 judge, 95 % CI) |")
    print("|---|---:|---:|")
    for name, ts in groups.items():
        rel = [channel_activation_ratio(model, a.layer, t.index if t.kind == "channel" else t, img[t.key],
                                        refs[t.key].images) for t in ts]
        rel = [r for r in rel if r is not None]
        mean = sum(rel) / len(rel) if rel else float("nan")
        print(f"| {name} | {mean:.2f} ({', '.join(f'{r:.2f}' for r in rel)}) | {afc(ts)} |")
    print(f"| all {len(targets)} together | | {afc(targets)} |")
    print(f"\n{res.timings['s_per_target_step']:.3f} s per target-step (batch of {len(targets)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
