"""How well can any depth of the judge tell one channel's real top-k patches from another's? The channel
benchmark's ceiling, method-blind.

    python -m benchmarks.bench_judge_depth [--model efficientnet-lite0] [--layers _blocks.2 _blocks.7 _blocks.14]
                                           [--judge efficientnet-lite2] [--channels 32] [--k 8] [--threads 1]

The pool, the channels and their top-k patches are :mod:`benchmarks.bench_channels`' (same rules, same seed). For
each judge layer (the ends of the judge's stages, and its penultimate features, the benchmark's own judge), every
channel's ``j``-th patch is shown in place of a visualization against every channel's other ``k − 1`` patches (the
benchmark's "patch (held out)" row), ``j`` in turn; a layer's features are the mean and the standard deviation over
positions of each channel (a texture descriptor, which suits a shallow judge layer better than the mean alone). The
table gives the 2-AFC own vs other per visualized layer and judge layer: what a visualization that looked exactly
like one more top-k patch would score, whichever depth of the judge one chose.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import numpy as np
import torch

from benchmarks.bench_channels import build_pool, patches, pick_channels, pool_scores, topk_indices
from vital_fast.evaluate.afc import judge_features, two_afc, wilson_interval
from vital_fast.evaluate.features import ref_inputs
from vital_fast.models import FeatureTaps, efficientnet_stage_ends, load_model
from vital_fast.references.mining import receptive_field


@torch.no_grad()
def texture_features(judge, images: List[torch.Tensor], layers: List[str]) -> Dict[str, np.ndarray]:
    """Per judge layer, ``(N, 2C)``: the mean and the standard deviation over positions of each channel."""
    with FeatureTaps(judge.model, layers, detach=True, stop_after=True) as taps:
        out = taps.run(judge.normalize(ref_inputs(judge, images)))
    return {jl: torch.cat([out[jl].float().mean((2, 3)), out[jl].float().flatten(2).std(2)], 1).double().numpy()
            for jl in layers}


def held_out_afc(feats: Dict[int, np.ndarray], chans: List[int], k: int):
    correct = trials = 0.0
    for j in range(k):
        keep = [i for i in range(k) if i != j]
        r = two_afc([feats[c][j] for c in chans], [feats[c][keep] for c in chans])
        correct, trials = correct + r["n_correct"], trials + r["n_trials"]
    return correct / trials, wilson_interval(correct, int(trials))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--judge", default="efficientnet-lite2")
    ap.add_argument("--layers", nargs="+", default=["_blocks.2", "_blocks.7", "_blocks.14"])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, judge = load_model(a.model), load_model(a.judge)
    size = model.input_size
    pool, n_photos = build_pool(size, a.crops)
    jlayers = [f"_blocks.{i}" for i in efficientnet_stage_ends(judge)] if judge.family == "efficientnet_lite" else []
    rows = []
    for layer in a.layers:
        scores, locs, grid = pool_scores(model, layer, pool)
        chans = pick_channels(scores, a.k, a.channels)
        rf = receptive_field(model, layer, size)
        top = topk_indices(scores[:, chans], a.k, a.crops, True)
        feats: Dict[str, Dict[int, np.ndarray]] = {"penultimate": {}}
        for j, c in enumerate(chans):
            idx = top[j].tolist()
            maxp = patches(model, pool, idx, [locs[i, c].tolist() for i in idx], grid, rf, size, "patch")
            feats["penultimate"][c] = judge_features(judge, maxp, "ref")
            if jlayers:
                for jl, f in texture_features(judge, maxp, jlayers).items():
                    feats.setdefault(jl, {})[c] = f
        for jl, fd in feats.items():
            acc, (lo, hi) = held_out_afc(fd, chans, a.k)
            rows.append((layer, rf, jl, acc, lo, hi))
            print(f"| {layer} ({rf} px) | {jl} | {100 * acc:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] |", flush=True)
    print("\n| visualized layer (receptive field) | judge layer | patch (held out) 2-AFC own vs other |\n"
          "|---|---|---:|")
    for layer, rf, jl, acc, lo, hi in rows:
        print(f"| {layer} ({rf} px) | {jl} | {100 * acc:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] |")
    print(f"\n{a.model}, judge {a.judge}, pool {len(pool)} crops of {n_photos} photographs, {a.channels} channels, "
          f"k = {a.k} from distinct photographs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
