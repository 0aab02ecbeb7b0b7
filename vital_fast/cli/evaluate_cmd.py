"""``vital-fast evaluate``: metrics of a run folder, or one comparison table of several runs.

    vital-fast evaluate RUN_DIR [--judge MODEL]            metrics.json, metrics.md, metrics.csv, gallery
    vital-fast evaluate --compare RUN_A RUN_B ... [--out DIR]   a row per method, a column per metric
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict

from vital_fast.cli.common import EXIT_OK, UsageError, groups


def register(sub) -> Dict[str, Callable]:
    """Add the ``evaluate`` sub-command to ``sub``; return its handler."""
    e = sub.add_parser(
        "evaluate", help="metrics of a run (accuracy by the model and a judge, FID, W2, ...), or compare runs",
        description="Computes the metrics of a run folder and writes metrics.json, metrics.md and metrics.csv into "
        "it, and the metrics into its gallery. With --compare, evaluates every run given and prints one table with "
        "a row per method (runs of one method with different seeds share a row, with their diversity).")
    data, method, _, hw, output = groups(e)
    e.add_argument("run", nargs="*", help="run folder(s)")
    data.add_argument("--compare", nargs="+", default=None, metavar="RUN", help="runs to compare in one table")
    method.add_argument("--judge", default="auto", help="independent classifier: a model name or file, or 'none' "
                        "(default: auto: efficientnet-lite2 for ImageNet models, efficientnet-lite0 for lite2 itself)")
    data.add_argument("--model", default=None, help="the visualized model, when the manifest's name cannot be loaded "
                      "(a model file, or a name)")
    data.add_argument("--arch", default=None, help="architecture of a state_dict model file (e.g. torchvision:resnet50)")
    method.add_argument("--fid-crops", type=int, choices=[1, 5], default=5,
                        help="views per image in the Frechet distance: 5 = the image and its 4 corner crops (default)")
    output.add_argument("--out", default=None, help="with --compare: also write compare.md/.csv/.json into this folder")
    hw.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    output.add_argument("--no-write", action="store_true", help="print only; write nothing into the run folders")
    return {"evaluate": cmd_evaluate}


def cmd_evaluate(args) -> int:

    runs = list(args.run or []) + list(args.compare or [])
    if not runs:
        raise UsageError("evaluate: give a run folder (vital-fast evaluate RUN_DIR) or --compare RUN_A RUN_B ...")
    for r in runs:
        if not os.path.isdir(r):
            raise UsageError(f"no such run folder: {r}")
        if not os.path.isfile(os.path.join(r, "manifest.json")):
            raise UsageError(f"{r} is not a vital_fast run folder (no manifest.json)")
    if args.out and not args.compare:
        raise UsageError("--out is for --compare (a single run's metrics go into its own folder)")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    from vital_fast.evaluate.metrics import compare_runs, evaluate_run, markdown_table

    judge = None if args.judge in ("none", "") else args.judge
    if args.compare or len(runs) > 1:
        rows, md = compare_runs(runs, judge=judge, model=args.model, arch=args.arch, fid_crops=args.fid_crops,
                                device=args.device, write=not args.no_write, out=args.out)
        print(md)
        notes = [f"{r['method']}: {r['notes']}" for r in rows if r.get("notes")]
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        if args.out:
            print(f"wrote {os.path.join(args.out, 'compare.md')}", file=sys.stderr)
        return EXIT_OK
    m = evaluate_run(runs[0], judge=judge, model=args.model, arch=args.arch, fid_crops=args.fid_crops,
                     device=args.device, write=not args.no_write)
    print(markdown_table([m["summary"]]))
    for msg in m["messages"]:
        print(f"note: {msg}", file=sys.stderr)
    if not args.no_write:
        print(f"wrote {os.path.join(runs[0], 'metrics.json')} (and metrics.md, metrics.csv, index.html)",
              file=sys.stderr)
    return EXIT_OK
