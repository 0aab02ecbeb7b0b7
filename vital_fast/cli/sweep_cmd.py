"""``vital-fast sweep``: every channel of a layer (and/or many classes) into one resumable folder.

    vital-fast sweep --model efficientnet-lite0 --layer _blocks.10 --channels all --images PHOTOS --out OUT
    vital-fast sweep ... --resume                       # continue after Ctrl-C, kill -9 or power loss
    torchrun --nproc-per-node 4 -m vital_fast sweep ...  # sharded over 4 processes (or GPUs)

The engine is :func:`vital_fast.sweep.run_sweep`; this module parses arguments, prints progress
on rank 0 and builds the gallery when the sweep is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict

from vital_fast.cli.common import (
    EXIT_OK,
    UsageError,
    add_matching_args,
    add_model_args,
    add_run_args,
    cache_from_args,
    check_preset,
    device_from_args,
    groups,
    load_from_args,
    log_run,
    parse_layers,
    settings_from_args,
)
from vital_fast.cli.pyref import images_arg, is_pyref, load_model_pyref


def register(sub) -> Dict[str, Callable[[Any], int]]:
    p = sub.add_parser(
        "sweep", help="visualize every channel of a layer (and/or many classes): resumable, batch refill, "
        "shards over torchrun ranks",
        description="Visualize whole layers. Top-k references of all requested channels are mined in one pass "
        "over --images (cached); targets are optimized in a batch that is refilled as targets finish; each "
        "finished target is written atomically and indexed, so --resume after any interruption continues where "
        "it stopped. Under torchrun (e.g. `torchrun --nproc-per-node 4 -m vital_fast sweep ...`) the ranks share "
        "the targets and write into the same folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data, method, schedule, hw, output = groups(p)
    add_model_args(p)
    data.add_argument("--layer", default=None, help="the layer whose channels are swept (see `vital-fast layers`)")
    data.add_argument("--channels", default=None, metavar="SPEC",
                      help="channels of --layer (or rows of --directions): all (default), 0-511, or 0,3,8-15")
    data.add_argument("--directions", default=None, metavar="FILE",
                      help="sweep the rows of this direction matrix (.pt or .safetensors: (N, C), e.g. a sparse "
                      "autoencoder's decoder) in --layer's channel space instead of its channels")
    data.add_argument("--classes", default=None, metavar="SPEC",
                      help="class targets too (or instead): all, 0-999, or 1,5,9-12; references from --images/<class>/")
    data.add_argument("--images", required=True, help="folder of candidate images for top-k mining (every image under "
                      "it) and class subfolders; or py:MODULE:NAME, a map-style torch Dataset of images (or a function "
                      "returning one) to mine channels from")
    output.add_argument("--out", required=True, help="the sweep folder")
    add_matching_args(p)
    schedule.add_argument("--early-stop", type=float, default=None, metavar="TOL",
                          help="finish a target once its loss improved by less than this fraction over the last window of "
                          "steps (a tenth of the steps); off by default")
    schedule.add_argument("--no-refill", action="store_true",
                          help="fixed batches: wait for the whole batch before starting new targets (for comparison)")
    schedule.add_argument("--single-stage", action="store_true",
                          help="one resolution for the whole step budget instead of the preset's stages: every slot then "
                          "shares one stack, which suits refill (results differ from `visualize`'s multi-stage schedule)")
    hw.add_argument("--exact", action="store_true",
                    help="bit-reproducible per target whatever the batch, slot or rank (turns oneDNN off; slower)")
    output.add_argument("--manifest-every", type=float, default=60.0, metavar="SEC",
                        help="rewrite manifest.json this often while running (default: 60)")
    add_run_args(p)
    return {"sweep": cmd_sweep}


def _load_model(args):

    spec = args.model
    if is_pyref(spec):
        return load_model_pyref(spec, args.labels, getattr(args, "family", None))
    device_from_args(args)
    return load_from_args(argparse.Namespace(model=spec, random_weights=args.random_weights, arch=args.arch, device="cpu",
                                    labels=args.labels, family=getattr(args, "family", None)))


def cmd_sweep(args) -> int:
    from vital_fast.cli.progress_bar import Progress

    if args.layer is None and args.classes is None:
        raise UsageError("sweep: give --layer (its channels are swept) and/or --classes")
    if args.channels is not None and args.layer is None:
        raise UsageError("--channels needs --layer")
    if args.directions is not None:
        if args.layer is None:
            raise UsageError("--directions needs --layer (the layer whose channel space they live in)")
        from vital_fast.optim.directions import load_directions

        args.directions = load_directions(args.directions)  # a bad file: one line, exit 2, before any work
    if args.early_stop is not None and not args.early_stop >= 0:
        raise UsageError(f"--early-stop must be a fraction >= 0, got {args.early_stop}")
    images = images_arg(args.images)
    if args.manifest_every <= 0:
        raise UsageError(f"--manifest-every must be > 0, got {args.manifest_every}")
    settings = settings_from_args(args)
    if args.single_stage:
        from vital_fast.sweep import single_stage

        settings = single_stage(settings)
    device = device_from_args(args)
    loaded = _load_model(args)

    from vital_fast.sweep import run_sweep

    class_layers = parse_layers(loaded, args.layers)
    if class_layers is None:
        check_preset(loaded)

    rank = int(os.environ.get("RANK", "0") or 0)
    bar = {}

    def progress(info):
        if bar.get("finished") or info["total"] == 0:
            return
        bar["finished"] = info["done"] >= info["total"]
        if "bar" not in bar:
            before = f" ({info['done_before']} done before)" if info["done_before"] else ""
            bar["bar"] = Progress(max(1, info["total"]), label=f"sweep{before}")
        rate = info["rate_per_min"]
        bar["bar"].update(info["done"], note=f"targets · {rate:.1f}/min")

    summary = run_sweep(
        loaded, images, args.out, layer=args.layer, channels=args.channels, classes=args.classes,
        preset=args.preset, settings=settings, seed=args.seed, size=args.size, batch=args.batch,
        refill=not args.no_refill, early_stop=args.early_stop, exact=args.exact, resume=args.resume,
        force=args.force, cache=cache_from_args(args), device=device, progress=progress if rank == 0 else None,
        manifest_every=args.manifest_every, extra={"preset": args.preset}, directions=args.directions,
        class_layers=class_layers,
    )
    if summary.rank == 0:
        from vital_fast.report.gallery import build_gallery

        index = build_gallery(args.out)
        log_run(args)
        if summary.done_before == summary.total:
            print(f"sweep: all {summary.total} targets were already finished in {args.out}", file=sys.stderr)
        print(f"sweep: {summary.done_before + summary.done_now}/{summary.total} targets in {args.out} "
              f"({summary.done_now} now, {summary.targets_per_hour:.0f} targets/hour, {summary.world} rank(s)); "
              f"gallery: {index}")
        if summary.done_before + summary.done_now < summary.total:
            print("sweep: incomplete; run again with --resume", file=sys.stderr)
    return EXIT_OK
