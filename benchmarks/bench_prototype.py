"""The prototype builder: ``vital_fast.sorted_prototype`` on its C++ backend against the plain-torch reference
(``torch.sort`` of values and indices, then the mean), interleaved in one process.

    python -m benchmarks.bench_prototype [--threads 1] [--rounds 5] [--q 128]

Shapes: K = 8 reference images at efficientnet-lite0's layers (channels-last, ReLU-like features with many
zeros), as a channel target's references are built at 224 px. Each row: the best of ``--rounds`` for each
backend, their ratio (reference over C++: above 1, the C++ kernel is faster) and the largest difference.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import vital_fast

SHAPES = [(8, 16, 112, 112), (8, 24, 56, 56), (8, 40, 28, 28), (8, 112, 14, 14), (8, 320, 7, 7), (8, 1280, 7, 7)]


def _best(fn, rounds: int) -> float:
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--q", type=int, default=128)
    a = ap.parse_args(argv)
    if not vital_fast.available_backends()["cpp"]["available"]:
        print("the C++ extension is not built: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print("| K, C, H, W | reference ms | C++ ms | reference / C++ | max abs diff |\n|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        f = torch.randn(*shape, generator=g).relu().contiguous(memory_format=torch.channels_last)
        ref = lambda: vital_fast.sorted_prototype(f, a.q, backend="reference")  # noqa: E731
        cpp = lambda: vital_fast.sorted_prototype(f, a.q, backend="cpp")  # noqa: E731
        diff = float((ref() - cpp()).abs().max())
        tr, tc = _best(ref, a.rounds), _best(cpp, a.rounds)
        print(f"| {', '.join(map(str, shape))} | {tr * 1e3:.1f} | {tc * 1e3:.1f} | {tr / tc:.1f} | {diff:.1e} |")
    print(f"\n{a.threads} threads, q = {a.q}, best of {a.rounds}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
