"""VITAL against the baselines on the offline demo's class targets, with equal step budgets.

    python -m benchmarks.bench_methods [--methods vital actmax fourier maco bnstats] [--preset fast]
                                       [--out runs/bench-methods] [--threads 2] [--judge efficientnet-lite2]

efficientnet-lite0 with its ImageNet weights; the six classes of ``vital-fast demo`` (espresso,
tiger cat, missile, moped, daisy, palace) with the photographs that ship in installed packages as
references (``offline_class_photos()``); every method runs the preset's stages (``fast``: 60 steps
at half resolution, then 90 at full) with seed 0, all six targets in one batch. Each method's run
folder is written under ``--out``; then every run is evaluated (:mod:`vital_fast.evaluate.metrics`,
judge efficientnet-lite2) and one table is printed: accuracy by the model and by the judge, the
Fréchet distance to the reference photographs in the judge's features, the sort-matching W2 at
the matched layers, and the wall time per target (reference preparation included; the prototype
cache is off, so VITAL pays for its prototypes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from vital_fast.cli.demo import DEMO_CLASSES
from vital_fast.cli.jobs import labels_for
from vital_fast.evaluate.baselines import METHODS, baseline_options
from vital_fast.evaluate.metrics import compare_runs, markdown_table
from vital_fast.models import load_model
from vital_fast.optim import Target, get_preset, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import load_images, offline_class_photos
from vital_fast.results import save_result

COLUMNS = [
    ("method", "method", "s"), ("wall_s_per_target", "s / target", ".1f"),
    ("model_top1", "lite0 top-1", "%"), ("model_top5", "lite0 top-5", "%"),
    ("judge_top1", "judge top-1", "%"), ("judge_top5", "judge top-5", "%"),
    ("judge_top1_rec", "judge top-1, refs recognized", "%"), ("fid", "FID (judge) ↓", ".1f"), ("w2", "W2 ↓", ".3g"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--preset", default="fast")
    p.add_argument("--out", default=os.path.join("runs", "bench-methods"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", default="efficientnet-lite2")
    p.add_argument("--reuse", action="store_true", help="evaluate existing run folders under --out; do not re-run")
    p.add_argument("--no-eval", action="store_true", help="only make the runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model("efficientnet-lite0")
    photos = offline_class_photos()
    targets = [Target("class", c) for c in DEMO_CLASSES]
    refs = {t.key: load_images(photos[t.index], what=f"photographs of {t.key}") for t in targets}
    settings = get_preset(args.preset)
    labels = labels_for(targets)
    print(f"efficientnet-lite0, {len(targets)} class targets, preset {args.preset} "
          f"({settings.steps} steps: {settings.stages}), seed {args.seed}, {args.threads} threads", file=sys.stderr)
    runs, wall = [], {}
    for m in args.methods:
        out = os.path.join(args.out, m)
        runs.append(out)
        if args.reuse and os.path.isfile(os.path.join(out, "manifest.json")):
            continue
        if os.path.isdir(out):
            shutil.rmtree(out)
        t0 = time.perf_counter()
        res = visualize(loaded, targets, refs, settings=settings, seed=args.seed, method=m,
                        cache=DiskCache(enabled=False))
        wall[m] = (time.perf_counter() - t0) / len(targets)
        save_result(res, out, labels=labels, seed=args.seed,
                    extra={"preset": args.preset, "method": m, "bench_wall_s_per_target": wall[m]})
        print(f"{m:8s} {wall[m]:6.1f} s / target  -> {out}", file=sys.stderr)
    if args.no_eval:
        return 0
    rows, _ = compare_runs(runs, judge=args.judge, out=args.out)
    for r, run in zip(rows, runs):
        import json

        with open(os.path.join(run, "manifest.json"), encoding="utf-8") as fh:
            r["wall_s_per_target"] = json.load(fh).get("bench_wall_s_per_target", r.get("s_per_target"))
    print(markdown_table(rows, COLUMNS))
    print("\nsettings:", file=sys.stderr)
    print(f"  vital: {settings.to_dict()}", file=sys.stderr)
    for m in args.methods:
        if m != "vital":
            print(f"  {m}: {baseline_options(m)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
