"""VITAL's sort-matching loss as an objective of Lucent's ``render_vis`` (pixel or Fourier image).

    python examples/lucent_loss.py [--steps 128] [--size 128] [--param fourier|pixel] [--layer _blocks.10]
                                   [--out lucent_vital.png]

The image is optimized so that the distribution of each channel of ``--layer`` matches the photograph's
(efficientnet-lite0, ImageNet weights; a coffee cup shipped with scikit-image): the loss is a Lucent objective
(:func:`vital_fast.integrations.lucent_objective`) and composes with Lucent's own.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parser, prototype_setup, save_png  # noqa: E402

from vital_fast.integrations import lucent_objective  # noqa: E402


def main(argv=None):
    ap = parser(__doc__, 128, "lucent_vital.png")
    ap.add_argument("--param", choices=["fourier", "pixel"], default="fourier")
    a = ap.parse_args(argv)
    from lucent.optvis import param, render, transform

    loaded, model, proto = prototype_setup(a.size, a.layer)
    objective = lucent_objective(a.layer, proto)

    def param_f():
        return param.image(a.size, fft=a.param == "fourier", decorrelate=True)

    # Lucent's images are RGB in [0, 1]; the model's own normalization goes last
    transforms = transform.standard_transforms + [loaded.normalize]
    torch.manual_seed(0)
    with torch.no_grad():  # the loss of the image Lucent starts from (the same seed)
        initial = float(objective_value(model, a.layer, proto, loaded.normalize(param_f()[1]())))
    torch.manual_seed(0)
    images = render.render_vis(model, objective, param_f, transforms=transforms, thresholds=(a.steps,),
                               preprocess=False, show_image=False, progress=False, fixed_image_size=a.size)
    img = torch.from_numpy(images[-1][0]).permute(2, 0, 1)
    save_png(img, a.out)
    with torch.no_grad():  # the loss of the result, on the untransformed image
        final = float(objective_value(model, a.layer, proto, loaded.normalize(img[None])))
    print(f"lucent render_vis + vital_fast sort-matching loss: {a.steps} steps, {a.param} image, loss "
          f"{initial:.4f} -> {final:.4f}; wrote {a.out}")
    return initial, final


def objective_value(model, layer, proto, x):
    from vital_fast import sort_match_loss
    from vital_fast.integrations import layer_features

    return sort_match_loss(layer_features(model, layer, x), proto)


if __name__ == "__main__":
    main()
