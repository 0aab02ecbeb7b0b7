"""The kernel benchmark table: ResNet-50 layer shapes at 224 px, forward + backward, CPU.

Three rows per shape: the pure-torch reference, a baseline written the way the paper's code works
(re-sorting K = 10 reference images' features inside the loss at every call, inverse permutation
by a second argsort), and the fused vital_fast op; timed interleaved in one process, median of the
rounds; with the fused op's effective GB/s against this machine's copy bandwidth measured in the
same run.

    python -m benchmarks.table [--quick] [--threads 2] [--batches 1 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import vital_fast
from benchmarks._common import (
    RESNET50_SHAPES,
    copy_bandwidth_gbs,
    fused_bytes,
    interleaved_times,
    make_inputs,
    median,
    providers,
)


def run(batches, threads: int, rounds: int, shapes=RESNET50_SHAPES, out=sys.stdout):
    torch.set_num_threads(threads)
    backends = vital_fast.available_backends()
    fused_backend = "cpp" if backends["cpp"]["available"] else "reference (C++ extension not built)"
    bw = copy_bandwidth_gbs()
    print(f"vital_fast {vital_fast.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{threads} threads; fused op backend: {fused_backend}", file=out)
    print(f"memory copy bandwidth (read + write): {bw:.1f} GB/s; {rounds} interleaved rounds, median", file=out)
    print("", file=out)
    header = f"| shape (B, C, H, W) | provider | fwd+bwd ms | vital_fast speed-up | GB/s (% of copy) |"
    print(header, file=out)
    print("|---|---|---:|---:|---:|", file=out)
    rows = []
    for B in batches:
        for C, H, W in shapes:
            x, refs, proto = make_inputs(B, C, H, W)
            times = interleaved_times(providers(x, refs, proto), rounds=rounds)
            med = {k: median(v) for k, v in times.items()}
            gbs = fused_bytes(x) / med["vital_fast"] / 1e9
            for name in ("reference", "paper-style", "vital_fast"):
                speed = med[name] / med["vital_fast"]
                extra = f"{gbs:.1f} ({100 * gbs / bw:.0f} %)" if name == "vital_fast" else ""
                print(f"| ({B}, {C}, {H}, {W}) | {name} | {1e3 * med[name]:.1f} | "
                      f"{speed:.1f}x | {extra} |", file=out, flush=True)
                rows.append({"shape": [B, C, H, W], "provider": name, "ms": 1e3 * med[name],
                             "speedup_of_vital_fast": speed, "gbs": gbs if name == "vital_fast" else None})
            del x, refs, proto
    return {"copy_gbs": bw, "threads": threads, "rounds": rounds, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    rounds = a.rounds or (3 if a.quick else 7)
    res = run(a.batches, a.threads, rounds)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
