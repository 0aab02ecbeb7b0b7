"""Batch norms folded into their convolutions (``Settings.fold_batchnorm``): the network's forward and backward to a
layer, folded against as it is, interleaved in one process.

    python -m benchmarks.bench_fold [--model efficientnet-lite0] [--threads 1] [--rounds 6] [--batch 8]
                                    [--points 112:_blocks.2 224:_blocks.2 224:_blocks.7 224:_blocks.14 224:logits]

Each point ``SIDE:LAYER`` runs the network channels-last (as a run does) on a ``(batch, 3, SIDE, SIDE)`` input that
needs its gradient, to ``LAYER`` (``logits``: the whole network), then a backward from the mean square of what it
returned; the rows give each half's time as it is and folded's ratio to it (under 1: folding is faster), summed over
``--rounds`` interleaved rounds after a warm-up. ``python -m benchmarks.bench_recipe_step --vital
"nofold:fold_batchnorm='off'"`` measures the whole step.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vital_fast.models import FeatureTaps, load_model
from vital_fast.models.folding import BatchNormFold
from vital_fast.models.layout import ChannelsLast


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", nargs="+",
                    default=["112:_blocks.2", "224:_blocks.2", "224:_blocks.7", "224:_blocks.14", "224:logits"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    model = lm.model
    layout = ChannelsLast(model)
    fold = BatchNormFold(model)
    print("| side | to | forward s | folded / as it is | backward s | folded / as it is |\n"
          "|---:|---|---:|---:|---:|---:|")
    try:
        for point in a.points:
            side, _, layer = point.partition(":")
            x = torch.rand(a.batch, 3, int(side), int(side)).contiguous(memory_format=torch.channels_last)
            layers = [] if layer == "logits" else [layer]

            def step(folded: bool):
                xi = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                with (fold.applied(x, layers) if folded else torch.enable_grad()):
                    out = FeatureTaps(model, layers, stop_after=True).run(xi, pad=False)[layer] if layers else model(xi)
                t1 = time.perf_counter()
                out.square().mean().backward()
                return t1 - t0, time.perf_counter() - t1

            step(False), step(True)
            tot = {False: [0.0, 0.0], True: [0.0, 0.0]}
            for _ in range(a.rounds):
                for folded in (False, True):
                    f, b = step(folded)
                    tot[folded][0] += f
                    tot[folded][1] += b
            plain, folded = tot[False], tot[True]
            print(f"| {side} | {layer} | {plain[0] / a.rounds:.4f} | {folded[0] / plain[0]:.2f} | "
                  f"{plain[1] / a.rounds:.4f} | {folded[1] / plain[1]:.2f} |", flush=True)
    finally:
        layout.restore()
    print(f"\n{a.model}, batch {a.batch}, {len(fold.pairs or [])} batch norms folded, "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
