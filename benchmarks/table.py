"""The kernel benchmark table: ResNet-50 layer shapes at 224 px, forward + backward, CPU.

Three rows per shape: the pure-torch reference, a baseline written the way the paper's code works
(re-sorting K = 10 reference images' features inside the loss at every call, inverse permutation
by a second argsort), and the fused vital_fast op; timed interleaved in one process, median of the
rounds; with the fused op's effective GB/s against this machine's copy bandwidth measured in the
same run.

    python -m benchmarks.table [--quick] [--threads 2] [--batches 1 16] [--device cpu|cuda] [--json out.json]
                               [--compiled inductor|aot_eager]

``--compiled BACKEND`` adds a row: the fused op's forward and backward under ``torch.compile(fullgraph=True)``
with that dynamo backend (its speed-up column is compiled time / eager time: below 1, compiled is faster).

With ``--device cuda`` the same rows run on the GPU (the fused op is the Triton kernel there), every
closure synchronized; the copy bandwidth is the GPU's.
"""

from __future__ import annotations

import argparse
import json
import sys

from vital_fast.bench import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or a CUDA device (cuda, cuda:1): synchronized timings")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--compiled", default=None, metavar="BACKEND",
                   help="also time the fused op under torch.compile(fullgraph=True) with this dynamo backend")
    a = p.parse_args(argv)
    rounds = a.rounds or (3 if a.quick else 7)
    try:
        res = run(a.batches, a.threads, rounds, device=a.device, compiled=a.compiled)
    except (RuntimeError, ValueError) as exc:  # no CUDA, a bad device string
        p.error(f"--device {a.device}: {exc}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
