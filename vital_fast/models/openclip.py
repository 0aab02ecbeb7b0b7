"""OpenCLIP models: ``openclip:ARCH[:PRETRAINED]`` (the ``openclip`` extra), the image tower only.

``ARCH`` is an OpenCLIP model name (``ViT-B-32``, ``RN50``, ``convnext_base``; ``open_clip.list_models()``) and
``PRETRAINED`` one of its tags (``openai``, ``laion2b_s34b_b79k``; ``open_clip.list_pretrained()``). Pretrained
weights are read from the local caches only (the Hugging Face hub cache, or OpenCLIP's ``~/.cache/clip`` for
URL checkpoints), never downloaded; ``weights="random"`` (``--random-weights``) builds the architecture alone
(no tag needed). The preprocessing (size, mean, std, interpolation) is the tower's own ``preprocess_cfg``.

The loaded network is the visual tower (``model.visual``): its output is the image embedding, so its units
are ``channel:``, ``neuron:``, ``head:`` and ``direction:`` targets, and ``text:`` targets
(:mod:`vital_fast.models.text`) are directions in that embedding space given by the text tower, which is not kept
with the image tower: it is built from the same weights when a text target needs it (random weights are seeded),
runs once for the prompts and is dropped.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from typing import Optional

import torch

from vital_fast._errors import MissingPackageError
from vital_fast.models.identity import guess_family, mark_embedding_model
from vital_fast.models.text import set_text_tower

__all__ = ["OPENCLIP_PREFIX", "load_openclip"]

OPENCLIP_PREFIX = "openclip:"


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise MissingPackageError(
            "load_model: 'openclip:...' models need the package 'open_clip_torch', which comes with the extra "
            "'openclip': `pip install 'vital_fast[openclip]'` (or `pip install open_clip_torch`)"
        ) from None
    return open_clip


@contextlib.contextmanager
def _quiet():
    """OpenCLIP logs a warning on the root logger for a model built without pretrained weights."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _build(open_clip, arch: str, path: Optional[str], quick_gelu: bool = False):
    """The whole CLIP model in eval mode: pretrained from ``path`` (with the tag's activation: ``quick_gelu``, which
    open_clip applies by itself only when given the tag's name), or random weights seeded (the same every time,
    so that the text tower built again for a text target belongs to the same random model)."""
    if path is not None:
        return open_clip.create_model(arch, pretrained=path, force_quick_gelu=quick_gelu).eval()
    with _quiet(), torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.create_model(arch, pretrained=None).eval()


def _weights_file(open_clip, arch: str, tag: str) -> Optional[str]:
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - a dependency of open_clip
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                p = try_to_load_from_cache(hub, fn)
                if isinstance(p, str) and os.path.isfile(p):
                    return p
    url = cfg.get("url")
    if url:
        p = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


class _TextTower:
    """``encode(prompts) -> (N, D)``: the text side of the CLIP model, built for the call (from the same weights;
    random weights seeded) and dropped after it. A plain object, so the image tower still pickles."""

    def __init__(self, arch: str, path: Optional[str], quick_gelu: bool) -> None:
        self.arch, self.path, self.quick_gelu = arch, path, quick_gelu

    def __call__(self, prompts):
        open_clip = _open_clip()
        clip = _build(open_clip, self.arch, self.path, self.quick_gelu)
        clip.visual = None
        return clip.encode_text(open_clip.get_tokenizer(self.arch)(list(prompts)))


def load_openclip(spec: str, weights: str) -> dict:
    """The loader's record of ``openclip:ARCH[:PRETRAINED]``; never downloads."""
    open_clip = _open_clip()
    arch, _, tag = spec.partition(":")
    arch, tag = arch.strip(), tag.strip()
    names = open_clip.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = ("closest: " + ", ".join(f"openclip:{c}" for c in close)) if close else f"{len(names)} models"
        raise ValueError(f"load_model: unknown OpenCLIP model {arch!r}; {hint} (open_clip.list_models())")
    tags = list(open_clip.list_pretrained_tags_by_model(arch))
    shown = ", ".join(tags[:8]) + (f", ... ({len(tags)} tags)" if len(tags) > 8 else "") if tags else "none"
    if tag and tag not in tags:
        raise ValueError(f"load_model: OpenCLIP model {arch} has no pretrained tag {tag!r}; its tags: "
                         f"{shown}")
    path, cfg = None, {}
    if weights == "random":
        model = _build(open_clip, arch, None)
    else:
        if not tag:
            raise ValueError(f"load_model: openclip:{arch} needs a pretrained tag for its weights "
                             f"(openclip:{arch}:TAG; tags: {shown}), or --random-weights")
        path = _weights_file(open_clip, arch, tag)
        if path is None:
            raise FileNotFoundError(
                f"load_model: the weights of openclip:{arch}:{tag} are not on this machine; vital_fast never "
                f"downloads. On a machine with network run `python -c \"import open_clip; "
                f"open_clip.create_model('{arch}', pretrained='{tag}')\"` and copy its cache (~/.cache/huggingface/hub "
                "or ~/.cache/clip) here, or pass --random-weights")
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}  # the tag's preprocessing and activation
        model = _build(open_clip, arch, path, bool(cfg.get("quick_gelu", False)))
    visual = model.visual
    del model  # the text tower is built again when a text target needs it, and dropped after
    set_text_tower(visual, _TextTower(arch, path, bool(cfg.get("quick_gelu", False))))
    mark_embedding_model(visual)
    # the tag's preprocessing over the tower's defaults (open_clip sets them from the tag only for a tag's name)
    pp = dict(getattr(visual, "preprocess_cfg", None) or {}, **{k: v for k, v in cfg.items()
                                                                 if k in ("mean", "std", "interpolation") and v})
    size = pp.get("size") or getattr(visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    interp = pp.get("interpolation") if pp.get("interpolation") in ("bilinear", "bicubic") else "bicubic"
    return dict(model=visual, name=f"openclip:{arch}" + (f":{tag}" if tag else ""), family=guess_family(visual),
                input_size=size, resize_size=size, mean=tuple(pp.get("mean") or open_clip.OPENAI_DATASET_MEAN),
                std=tuple(pp.get("std") or open_clip.OPENAI_DATASET_STD), num_classes=None, class_names=None,
                interpolation=interp)
