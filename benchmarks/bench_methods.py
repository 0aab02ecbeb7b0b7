"""VITAL against the baselines on the offline demo's class targets, with equal step budgets.

    python -m benchmarks.bench_methods [--methods vital actmax fourier maco bnstats vital+fourier ...] [--preset fast]
                                       [--seeds 0 [1 ...]] [--out runs/bench-methods] [--threads 2]
                                       [--judge efficientnet-lite2] [--reuse] [--no-eval]
                                       [--model NAME] [--images FOLDER --classes 1 2 ...]

efficientnet-lite0 with its ImageNet weights; the six classes of ``vital-fast demo`` (espresso,
tiger cat, missile, moped, daisy, palace) with the photographs that ship in installed packages as
references (``offline_class_photos()``); every method runs the preset's stages (``fast``: 60 steps
at half resolution, then 90 at full) with each seed (default: 0), all six targets in one batch. Each method's run
folder is written under ``--out``; then every run is evaluated (:mod:`vital_fast.evaluate.metrics`,
judge efficientnet-lite2) and one table is printed: accuracy by the model and by the judge, the
Fréchet distance to the reference photographs in the judge's features, the sort-matching W2 at
the matched layers, and the time per target, wall-clock and CPU (the process's CPU time over all
threads, steadier than wall time on a shared machine), reference preparation included (the
prototype cache is off, so VITAL pays for its prototypes). With several seeds each row averages
the runs of its method and adds their diversity (mean pairwise cosine distance of the judge's
features of one target's images across seeds). A run folder that exists is reused with
``--reuse`` (so the runs can be made in several calls, e.g. ``--methods vital actmax --no-eval``,
and evaluated together at the end).

A method is a registered name (:data:`vital_fast.optim.methods.METHODS`) or ``METHOD+PARAM``, the
method on another image parametrization (:data:`vital_fast.optim.parametrizations.PARAMETRIZATIONS`:
``pixel``, ``fourier``, ``maco``), e.g. ``--methods vital vital+fourier actmax+fourier``: it runs
``visualize(..., method=METHOD, param=PARAM)``, which gives a method on a parametrization other than
its own that parametrization's usual learning rate (``fourier``: 0.05, constant; ``maco``: 1.0,
constant; ``pixel``: the method's own). Its run folder (``--out/vital+fourier``), its manifest's
``method`` and its table row carry the full name; the settings printed at the end give the
learning rate and schedule it ran with. ``METHOD@AMP`` (``vital@bf16``, ``vital+fourier@bf16``) runs the
network in mixed precision (``Settings.amp``) under its own row.

With ``--images`` (a folder of class subfolders, such as ImageNet's validation set on your machine)
and ``--classes``, the same comparison runs on your classes with their real reference images (the
preset's ``n_refs`` per class: 8 for ``fast``, 50 for ``paper``), the setting of the paper's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from vital_fast.cli.demo import DEMO_CLASSES
from vital_fast.cli.jobs import gather_references, labels_for
from vital_fast.evaluate.baselines import BASELINES
from vital_fast.evaluate.metrics import compare_runs, markdown_table
from vital_fast.models import load_model
from vital_fast.optim import Target, get_preset, visualize
from vital_fast.optim.methods import METHODS as REGISTERED_METHODS
from vital_fast.optim.methods import build_recipe, method_options
from vital_fast.optim.parametrizations import PARAMETRIZATIONS
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import load_images, offline_class_photos
from vital_fast.results import save_result

COLUMNS = [
    ("method", "method", "s"), ("wall_s_per_target", "s / target", ".1f"), ("cpu_s_per_target", "CPU s / target", ".1f"),
    ("model_top1", "lite0 top-1", "%"), ("model_top5", "lite0 top-5", "%"),
    ("judge_top1", "judge top-1", "%"), ("judge_top5", "judge top-5", "%"),
    ("judge_top1_rec", "judge top-1, refs recognized", "%"), ("fid", "FID (judge) ↓", ".1f"), ("w2", "W2 ↓", ".3g"),
    ("afc", "2-AFC (judge)", "%"), ("afc_ci", "2-AFC 95 % CI", "ci"),  # shown only for runs with unit targets
    ("specificity", "specificity", "%"), ("spec_ratio", "own / strongest other", ".2f"), ("copy", "copy ↓", ".2f"),
]


def parse_method(name: str) -> Tuple[str, Optional[str], str]:
    """``"vital"`` -> ``("vital", None, "off")``; ``"vital+fourier@bf16"`` -> ``("vital", "fourier", "bf16")``.

    Raises
    ------
    ValueError
        An unknown method, parametrization or precision, or a malformed name (the valid ones listed).
    """
    spec, at, amp = name.partition("@")
    if at and amp not in ("off", "bf16", "fp16", "auto"):
        raise ValueError(f"--methods {name}: unknown precision {amp!r}; valid: off, bf16, fp16, auto "
                         f"(as METHOD@AMP, e.g. vital@bf16)")
    method, plus, param = spec.partition("+")
    if method not in REGISTERED_METHODS:
        raise ValueError(f"--methods {name}: unknown method {method!r}; valid: {', '.join(REGISTERED_METHODS)} "
                         f"(optionally +PARAM, PARAM one of {', '.join(PARAMETRIZATIONS)})")
    if plus and param not in PARAMETRIZATIONS:
        raise ValueError(f"--methods {name}: unknown parametrization {param!r}; valid: {', '.join(PARAMETRIZATIONS)} "
                         f"(as METHOD+PARAM, e.g. vital+fourier)")
    return method, (param if plus else None), (amp if at else "off")


def run_dir(out: str, method: str, seed: int, first_seed: int) -> str:
    return os.path.join(out, method if seed == first_seed else f"{method}-seed{seed}")


def per_seed_table(runs: Dict[str, List[str]], methods: List[str], seeds: List[int]) -> str:
    """Judge top-1 hits of every run (method x seed), from each run's metrics.json: the spread behind the means."""
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | total |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for m in methods:
        cells, hit, tot = [], 0, 0
        for run in runs[m]:
            try:
                with open(os.path.join(run, "metrics.json"), encoding="utf-8") as fh:
                    per = json.load(fh)["targets"]
                h = [v["judge_top1"] for v in per.values() if isinstance(v, dict) and "judge_top1" in v]
            except (OSError, ValueError, KeyError):
                h = []
            cells.append(f"{sum(h)}/{len(h)}" if h else "n/a")
            hit, tot = hit + sum(h), tot + len(h)
        lines.append(f"| {m} | " + " | ".join(cells) + (f" | {hit}/{tot} |" if tot else " | n/a |"))
    return "judge top-1 hits per seed\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["vital", *BASELINES], metavar="METHOD[+PARAM]",
                   help=f"methods to compare (default: vital {' '.join(BASELINES)}); METHOD+PARAM runs a method on another "
                        f"parametrization ({', '.join(PARAMETRIZATIONS)}), e.g. vital+fourier")
    p.add_argument("--vital", nargs="*", default=[], metavar="NAME:KEY=VALUE;...",
                   help="add a VITAL variant with settings overrides under its own row, e.g. "
                        "--vital \"logit0.1:class_logit_weight=0.1\" (values read as Python literals)")
    p.add_argument("--preset", default="fast")
    p.add_argument("--out", default=os.path.join("runs", "bench-methods"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed and method; several seeds are averaged and give the diversity column")
    p.add_argument("--judge", default="auto",
                   help="judge model (default: efficientnet-lite2, or lite0 when lite2 is the visualized model)")
    p.add_argument("--reuse", action="store_true", help="evaluate existing run folders under --out; do not re-run")
    p.add_argument("--no-eval", action="store_true", help="only make the runs")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="model to visualize (default: efficientnet-lite0; torchvision:NAME needs its pretrained weights)")
    p.add_argument("--images", default=None,
                   help="your own reference images: a folder of class subfolders (285/ or n02124075/ with a "
                        "wnids.txt), e.g. ImageNet's validation set; default: the offline photographs")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class indices to visualize (default: the demo's six; needed with --images)")
    args = p.parse_args(argv)
    try:
        parsed = {m: parse_method(m) for m in args.methods}
    except ValueError as err:
        p.error(str(err))
    from benchmarks.bench_channels import parse_variant

    overrides: Dict[str, dict] = {}
    for v in args.vital:
        name, kw = parse_variant(v)
        if not name or name in parsed:
            p.error(f"--vital {v}: give the variant a new name (NAME:KEY=VALUE;...)")
        parsed[name], overrides[name] = ("vital", None, "off"), kw
        args.methods.append(name)
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods: a method is named twice in {' '.join(args.methods)}")
    torch.set_num_threads(args.threads)
    if args.images is None and args.classes is not None:
        p.error("--classes needs --images (the offline photographs cover only the demo's classes)")

    loaded = load_model(args.model)
    settings = get_preset(args.preset)
    if args.images is None:
        photos = offline_class_photos()
        targets = [Target("class", c) for c in DEMO_CLASSES]
        refs = {t.key: load_images(photos[t.index], what=f"photographs of {t.key}") for t in targets}
    else:
        targets = [Target("class", c) for c in (args.classes or DEMO_CLASSES)]
        try:
            refs = gather_references(loaded, targets, args.images, settings, DiskCache(enabled=False))
        except ValueError as err:
            p.error(str(err))
    labels = labels_for(loaded, targets)
    print(f"{args.model}, {len(targets)} class targets, preset {args.preset} "
          f"({settings.steps} steps: {settings.stages}), seeds {args.seeds}, {args.threads} threads", file=sys.stderr)
    runs: Dict[str, List[str]] = {}
    try:
        run_settings = {m: settings.replace(**overrides.get(m, {})) for m in parsed}
    except ValueError as err:
        p.error(str(err))
    recipes = {m: build_recipe(base, run_settings[m], param=param) for m, (base, param, _) in parsed.items()}
    for m in args.methods:
        base, param, amp = parsed[m]
        for seed in args.seeds:
            out = run_dir(args.out, m, seed, args.seeds[0])
            runs.setdefault(m, []).append(out)
            if args.reuse and os.path.isfile(os.path.join(out, "manifest.json")):
                continue
            if os.path.isdir(out):
                shutil.rmtree(out)
            t0, c0 = time.perf_counter(), time.process_time()
            res = visualize(loaded, targets, refs, settings=run_settings[m].replace(amp=amp), seed=seed, method=base,
                            param=param, cache=DiskCache(enabled=False))
            wall = (time.perf_counter() - t0) / len(targets)
            cpu = (time.process_time() - c0) / len(targets)
            save_result(res, out, labels=labels, seed=seed,
                        extra={"preset": args.preset, "method": m, "bench_wall_s_per_target": wall,
                               "bench_cpu_s_per_target": cpu, "bench_lr": recipes[m].lr,
                               "bench_schedule": recipes[m].schedule})
            print(f"{m:14s} seed {seed}: {wall:6.1f} s / target ({cpu:.1f} CPU s)  -> {out}", file=sys.stderr)
    if args.no_eval:
        return 0
    all_runs = [r for m in args.methods for r in runs[m]]
    rows, _ = compare_runs(all_runs, judge=args.judge, out=args.out)
    columns = list(COLUMNS) + ([("diversity", "diversity", ".3f")] if len(args.seeds) > 1 else [])
    for r, m in zip(rows, args.methods):  # one row per method, in the order of the runs
        times = []
        for run in runs[m]:
            with open(os.path.join(run, "manifest.json"), encoding="utf-8") as fh:
                man = json.load(fh)
            times.append((man.get("bench_wall_s_per_target"), man.get("bench_cpu_s_per_target")))
        walls = [w for w, _ in times if w is not None]
        cpus = [c for _, c in times if c is not None]
        r["method"] = m
        r["wall_s_per_target"] = sum(walls) / len(walls) if walls else "n/a"
        r["cpu_s_per_target"] = sum(cpus) / len(cpus) if cpus else "n/a"
    print(markdown_table(rows, columns))
    if len(args.seeds) > 1:
        print()
        print(per_seed_table(runs, args.methods, args.seeds))
    print("\nsettings:", file=sys.stderr)
    print(f"  vital: {settings.to_dict()}", file=sys.stderr)
    for m in args.methods:
        base, param, amp = parsed[m]
        if amp != "off":
            print(f"  {m}: network in {amp} (Settings.amp)", file=sys.stderr)
        if base != "vital":
            print(f"  {m}: {method_options(base)}", file=sys.stderr)
        if overrides.get(m):
            print(f"  {m}: vital with {overrides[m]}", file=sys.stderr)
        if param is not None:
            r = recipes[m]
            print(f"  {m}: parametrization {r.param.describe()}, lr {r.lr}, schedule {r.schedule}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
