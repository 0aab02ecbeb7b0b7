"""Sweep throughput: targets per hour with batch refill against fixed batches, in one process.

    python -m benchmarks.bench_sweep [--channels 64] [--size 64] [--steps 40] [--batch 8]
                                     [--early-stop 0.02] [--window 4] [--single-stage]
                                     [--modes visualize,fixed,refill,refill-full] [--repeat 2]

A sweep of ``--channels`` channels of one layer of efficientnet-lite0 (ImageNet weights; default
``_blocks.7``, 80 channels), the offline photographs as the top-k mining pool, the ``fast`` preset
with its step budget scaled to ``--steps`` (two resolution stages; ``--single-stage`` collapses them
to one, see :func:`vital_fast.sweep.single_stage`), on the CPU with one thread (on a shared,
oversubscribed machine OpenMP barriers make 2 threads erratic: 2.4 s instead of 28 ms for one
forward pass here). Every mode pays for its own mining and reference prototypes (no cache). Modes:

* ``visualize``: what ``vital-fast visualize`` does with the same targets: ``visualize()`` on fixed
  batches of ``--batch``, every target the full step budget (no early stop is possible there);
* ``fixed``: the sweep engine with fixed batches (``refill=False``): a batch starts when the whole
  previous batch is done; finished targets leave their slots empty;
* ``refill``: the sweep engine with batch refill: a finished target's slot takes the next target
  at once;
* ``refill-full``: refill without early stop (every target the full budget): the engine against
  ``visualize``.

``fixed`` and ``refill`` use the same early stop (``--early-stop``, ``--window``); a target's steps
do not depend on its batch (up to oneDNN's last-bit differences between batch sizes), so only the
packing differs. The modes run interleaved, ``--repeat`` rounds, and the best round of each mode is
reported: a table with targets/hour, steps per target, ticks, mean batch occupancy and the time
spent preparing references and optimizing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch


def _targets_refs(loaded, layer, channels, pool_dir, settings, size, cache):
    from vital_fast.optim import Target
    from vital_fast.references.images import list_image_files, load_images
    from vital_fast.references.mining import channel_reference_images, mine_topk

    pool = load_images(list_image_files(pool_dir))
    k = min(settings.n_refs, len(pool))
    top = mine_topk(loaded, layer, pool, channels, k, size, cache)
    per = channel_reference_images(loaded, top, pool, settings.channel_refs, size)
    targets = [Target("channel", c, layer) for c in channels]
    return targets, {t.key: per[t.index] for t in targets}


def run_mode(mode, loaded, args, settings, pool_dir, out):
    from vital_fast.references.cache import DiskCache
    from vital_fast.sweep import run_sweep

    cache = DiskCache(enabled=False)
    channels = list(range(args.channels))
    t0 = time.perf_counter()
    if mode == "visualize":
        from vital_fast.cli.jobs import run_into_folder

        targets, refs = _targets_refs(loaded, args.layer, channels, pool_dir, settings, args.size, cache)
        run_into_folder(loaded, targets, refs, out, settings, seed=0, batch=args.batch, cache=cache, preset="fast",
                        size=args.size)
        el = time.perf_counter() - t0
        steps = settings.steps * len(targets)
        return {"wall_s": el, "targets": len(targets), "steps_per_target": settings.steps, "refs_s": float("nan"),
                "opt_s": float("nan"),
                "ticks": -(-len(targets) // args.batch) * settings.steps, "occupancy": steps / (
                    -(-len(targets) // args.batch) * settings.steps)}
    refill = mode.startswith("refill")
    es = None if mode == "refill-full" else args.early_stop
    s = run_sweep(loaded, pool_dir, out, layer=args.layer, channels=channels, settings=settings, seed=0,
                  size=args.size, batch=args.batch, refill=refill, early_stop=es, early_stop_window=args.window,
                  cache=cache, manifest_every=1e9)
    el = time.perf_counter() - t0
    t = s.timings
    return {"wall_s": el, "targets": s.done_now, "steps_per_target": t["slot_steps"] / max(1, s.done_now),
            "ticks": t["ticks"], "occupancy": t["slot_steps"] / max(1, t["ticks"]), "refs_s": t["references_s"],
            "opt_s": t["optimize_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--layer", default="_blocks.7")
    p.add_argument("--channels", type=int, default=64, help="channels 0..N-1 of --layer (default 64)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="the fast preset's budget scaled to this (default 40)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--early-stop", type=float, default=0.02)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--modes", default="visualize,fixed,refill")
    p.add_argument("--single-stage", action="store_true",
                   help="one resolution for the whole budget (vital_fast.sweep.single_stage) in every mode")
    p.add_argument("--repeat", type=int, default=2, help="rounds over the modes, interleaved; the best is kept")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, oversubscribed machine OpenMP barriers with 2+ "
                   "threads stall)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    from vital_fast.models import load_model
    from vital_fast.optim import get_preset
    from vital_fast.references.images import offline_photo_paths

    base = get_preset("fast")
    total = base.steps
    stages = [(sc, max(1, round(n * args.steps / total))) for sc, n in base.stages]
    stages[-1] = (stages[-1][0], max(1, args.steps - sum(n for _, n in stages[:-1])))
    settings = base.replace(stages=stages, warmup=min(base.warmup, max(1, args.steps // 10)))
    if args.single_stage:
        from vital_fast.sweep import single_stage

        settings = single_stage(settings)
        stages = settings.stages
    loaded = load_model(args.model)
    tmp = tempfile.mkdtemp(prefix="bench_sweep-")
    pool_dir = os.path.join(tmp, "photos")
    os.makedirs(pool_dir)
    for path in offline_photo_paths():
        shutil.copy(path, pool_dir)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    print(f"# sweep throughput: {args.model} {args.layer} channels 0-{args.channels - 1}, {args.size} px, "
          f"stages {stages}, batch {args.batch}, early stop {args.early_stop} (window {args.window}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = {}
    try:
        for rnd in range(args.repeat):
            for mode in modes:
                out = os.path.join(tmp, f"{mode}-{rnd}")
                r = run_mode(mode, loaded, args, settings, pool_dir, out)
                shutil.rmtree(out, ignore_errors=True)
                r["per_hour"] = 3600 * r["targets"] / r["wall_s"]
                if mode not in rows or r["wall_s"] < rows[mode]["wall_s"]:
                    rows[mode] = r
                print(f"  round {rnd + 1} {mode}: {r['targets']} targets in {r['wall_s']:.1f} s "
                      f"({r['per_hour']:.0f}/h), load avg {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = rows.get("fixed") or next(iter(rows.values()))
    print(f"\nbest of {args.repeat} per mode:")
    print("| mode | targets | wall s | targets/hour | vs fixed | steps/target | ticks | mean batch | references s "
          "| optimizing s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['targets']} | {r['wall_s']:.1f} | {r['per_hour']:.0f} | "
              f"{r['per_hour'] / ref['per_hour']:.2f}x | {r['steps_per_target']:.1f} | {r['ticks']} | "
              f"{r['occupancy']:.2f} | {r['refs_s']:.1f} | {r['opt_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
