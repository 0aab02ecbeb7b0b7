"""Seconds per target-step of VITAL's channel recipe against variants of it, interleaved in one process.

    python -m benchmarks.bench_recipe_step [--model efficientnet-lite0] [--layers _blocks.4 _blocks.10]
                                           [--channels 8] [--steps 20] [--rounds 3] [--threads 2]
                                           [--vital NAME:KEY=VALUE;...]

Each round runs the preset (``--preset``, default ``fast``) and then every ``--vital`` variant (settings overrides, as in
:mod:`benchmarks.bench_channels`) on the same channels of each layer, with the same random reference images and the
prototype cache off, so that a recipe pays for its prototypes too (the matched layers it adds cost references as well
as steps). The table gives each variant's median over the rounds and its ratio to the preset's (under 1: faster), in
three columns: all of it per target-step (references included, as the first column always was), the step alone
(``timings["s_per_target_step"]``: what a longer schedule converges to) and the references per target (their
prototypes, computed once per target and stage). The variant key ``prototypes=reference`` builds that variant's
prototypes with the plain-torch reference (``torch.sort``, as before the C++ kernel); ``--vital today`` (:data:`TODAY`)
times the channel recipe of the issue that asked for the specific channels, as it ran then. Quality is not measured
here (:mod:`benchmarks.bench_channels` does that).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch

from benchmarks.bench_channels import parse_variant
from vital_fast.models import load_model
from vital_fast.ops.prototype import sorted_prototype
from vital_fast.optim import get_preset, visualize
from vital_fast.references import prototypes
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet


# ``--vital today``: the channel recipe of the issue that asked for specific channels, as it ran when it was filed (no
# activation term, no later layers, prototypes by torch.sort, batch norms as they are)
TODAY = ("today:channel_activation_weight=0.0;channel_later_weight=0.0;channel_later_every=1;prototypes='reference';"
         "fold_batchnorm='off'")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--layers", nargs="+", default=["_blocks.4", "_blocks.10"])
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--vital", nargs="*", default=[], metavar="NAME:KEY=VALUE;...")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    base = get_preset(a.preset).with_steps(a.steps)
    variants = {a.preset: base}
    proto_backend = {}
    for v in a.vital:
        name, kw = parse_variant(TODAY if v == "today" else v)
        proto_backend[name] = kw.pop("prototypes", None)
        if proto_backend[name] not in (None, "reference", "cpp"):
            ap.error(f"--vital {v}: prototypes must be 'reference' or 'cpp', got {proto_backend[name]!r}")
        try:
            variants[name] = base.replace(**kw)
        except ValueError as err:
            ap.error(f"--vital {v}: {err}")
    g = torch.Generator().manual_seed(0)
    refs = ImageSet([torch.rand(3, model.input_size, model.input_size, generator=g) for _ in range(base.n_refs)],
                    [f"r{i}" for i in range(base.n_refs)], [f"h{i}" for i in range(base.n_refs)])
    times = {(l, n): [] for l in a.layers for n in variants}
    for _ in range(a.rounds):
        for layer in a.layers:
            targets = [f"channel:{layer}:{c}" for c in range(a.channels)]
            for name, s in variants.items():
                pb = proto_backend.get(name)
                prototypes.sorted_prototype = functools.partial(sorted_prototype, backend=pb) if pb else sorted_prototype
                t0 = time.perf_counter()
                try:
                    res = visualize(model, targets, {t: refs for t in targets}, settings=s, seed=0,
                                    cache=DiskCache(enabled=False))
                finally:
                    prototypes.sorted_prototype = sorted_prototype
                times[(layer, name)].append(((time.perf_counter() - t0) / (a.steps * len(targets)),
                                             res.timings["s_per_target_step"],
                                             res.timings["references_s"] / len(targets)))
    print(f"| layer | recipe | s per target-step (median of {a.rounds}) | ratio to {a.preset} | step alone | ratio | "
          f"references s per target | ratio |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for layer in a.layers:
        ref = [statistics.median(col) for col in zip(*times[(layer, a.preset)])]
        for name in variants:
            m = [statistics.median(col) for col in zip(*times[(layer, name)])]
            print(f"| {layer} | {name} | " + " | ".join(f"{v:.4f} | {v / r:.2f}" for v, r in zip(m, ref)) + " |")
    print(f"\n{a.model}, {a.channels} channels per layer, {a.steps} steps, {a.threads} threads, prototype cache off",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
