"""VITAL's sort-matching loss as the objective of Horama's Fourier feature visualization.

    python examples/horama_loss.py [--steps 64] [--size 128] [--layer _blocks.10] [--out horama_vital.png]

Horama maximizes a score of the crops it takes each step; :func:`vital_fast.integrations.horama_objective` gives
the negative sort-matching loss of ``--layer`` against the photograph's prototype (efficientnet-lite0, a coffee
cup shipped with scikit-image). Horama 0.3.0 runs on ``cuda`` by default and imports ``einops`` without
declaring it; its MACO variant fetches a spectrum from the web, so this example uses its Fourier loop, on the CPU.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parser, prototype_setup, save_png  # noqa: E402

from vital_fast.integrations import horama_objective  # noqa: E402


def main(argv=None):
    a = parser(__doc__, 64, "horama_vital.png").parse_args(argv)
    import horama

    loaded, model, proto = prototype_setup(a.size, a.layer)
    score = horama_objective(model, a.layer, proto)
    scores = []

    def tracked(images):
        s = score(images)
        scores.append(float(s.detach()))
        return s

    img, _ = horama.fourier(tracked, total_steps=a.steps, image_size=a.size, model_input_size=a.size,
                            crops_per_iteration=2, device="cpu")
    save_png(loaded.denormalize(img[None])[0], a.out)
    k = max(1, min(5, len(scores) // 4))
    first, last = -sum(scores[:k]) / k, -sum(scores[-k:]) / k
    print(f"horama fourier + vital_fast sort-matching loss: {a.steps} steps, loss {first:.4f} -> {last:.4f} "
          f"(mean of the first and last {k} steps); wrote {a.out}")
    return first, last


if __name__ == "__main__":
    main()
