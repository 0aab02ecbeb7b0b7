"""One target against Lucent: seconds per step of a Fourier activation-maximization, vital_fast and Lucent's
``render_vis`` on the same model, layer, channel, image size and parametrization, interleaved.

    python -m benchmarks.bench_lucent [--model torchvision:resnet50] [--layer layer3] [--size 224] [--steps 8]
                                      [--rounds 3] [--threads 2] [--batch 1 8]

vital_fast runs its ``fourier`` method (Lucid's 1/f spectrum with decorrelated colour, Lucid's views, Adam
lr 0.05: what Lucent's defaults do) on ``channel:LAYER:0``; Lucent runs ``render_vis`` with
``objectives.channel`` on a ``param.image(size, fft=True, decorrelate=True)`` and its standard transforms. Each
side's time per step (``--padded``: also vital_fast at one target padded to a batch of two) is the difference between a run of ``2 * steps`` and one of ``steps`` steps, divided by
``steps`` (set-up and hooks cancel), median of the interleaved rounds; ``--batch 8`` adds vital_fast with eight
channels in one pass (per target-step), which Lucent runs one at a time. Needs Lucent (``pip install
torch-lucent``, the ``clients`` extra); random weights for torchvision models, as nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def time_vital(loaded, layer: str, size: int, steps: int, B: int, padded: bool = False) -> float:
    """``padded``: a one-element batch forced to run as two (the way before ``needs_padding``)."""
    import vital_fast.models.padding as padding
    from vital_fast.optim import get_preset, visualize
    from vital_fast.references.cache import DiskCache

    real = padding.needs_padding
    if padded:
        padding.needs_padding = lambda model, x, layers=None: True

    targets = [f"channel:{layer}:{i}" for i in range(B)]

    def run(n):
        s = get_preset("fast").replace(stages=[(1.0, n)])
        t0 = time.perf_counter()
        visualize(loaded, targets, method="fourier", settings=s, size=size, cache=DiskCache(enabled=False),
                  progress=False)
        return time.perf_counter() - t0

    try:
        return (run(2 * steps) - run(steps)) / steps / B
    finally:
        padding.needs_padding = real


def time_lucent(model, layer: str, size: int, steps: int) -> float:
    from lucent.optvis import objectives, param, render

    name = layer.replace(".", "_")

    def run(n):
        t0 = time.perf_counter()
        render.render_vis(model, objectives.channel(name, 0), lambda: param.image(size, fft=True, decorrelate=True),
                          thresholds=(n,), show_image=False, progress=False, fixed_image_size=size)
        return time.perf_counter() - t0

    return (run(2 * steps) - run(steps)) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--padded", action="store_true", help="also vital_fast B=1 with the one-element batch padded to two")
    a = ap.parse_args(argv)
    try:
        import lucent  # noqa: F401
    except ImportError:
        print("bench_lucent: Lucent is not installed (pip install torch-lucent)", file=sys.stderr)
        return 2
    from vital_fast.models import load_model

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, weights="random" if a.model.startswith(("torchvision:", "timm:")) else "pretrained")
    model = loaded.model.eval()
    rows = {f"vital_fast B={B}": (lambda B=B: time_vital(loaded, a.layer, a.size, a.steps, B)) for B in a.batch}
    if a.padded:
        rows["vital_fast B=1 padded"] = lambda: time_vital(loaded, a.layer, a.size, a.steps, 1, padded=True)
    rows["lucent render_vis (B=1)"] = lambda: time_lucent(model, a.layer, a.size, a.steps)
    got = {k: [] for k in rows}
    for _ in range(a.rounds):
        for k, fn in rows.items():
            got[k].append(fn())
    lucent_s = statistics.median(got["lucent render_vis (B=1)"])
    print(f"{a.model} {a.layer} channel 0, {a.size} px, Fourier image, {a.threads} threads, {a.steps} timed steps, "
          f"median of {a.rounds} interleaved rounds")
    print("| provider | s per target-step | Lucent / provider |")
    print("|---|---:|---:|")
    for k, v in got.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.4f} | {lucent_s / m:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
