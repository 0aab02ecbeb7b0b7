"""Text directions for CLIP-like models: ``text:PROMPT`` targets.

``text:a photo of a dog`` (quotes optional; several prompts ``text:a dog|a puppy`` are averaged) is a direction in
the joint embedding space: the text tower's embedding of the prompt (unit length; the mean of the prompts'
unit embeddings, renormalized), as a ``direction`` target (:func:`vital_fast.optim.targets.text_target`) on the image tower's ``output`` layer (the image
embedding, :data:`vital_fast.models.identity.OUTPUT_LAYER`). Its references are mined by the same projection,
as for any direction. The text tower runs once per prompt set (cached by prompt) and is not part of the image
tower's layers, weights or fingerprint.

Text towers: OpenCLIP models (``openclip:ARCH[:TAG]``; the tokenizer ships with OpenCLIP) and Hugging Face CLIP
and SigLIP checkpoints (``hf:NAME``; the text model and tokenizer read from the same cache or folder).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

__all__ = ["TEXT_PREFIX", "is_text_spec", "set_text_tower", "text_embedding", "text_key", "text_prompts"]

TEXT_PREFIX = "text:"
_TOWER = "_vital_fast_clip_text"  # (encode(prompts) -> (N, D) tensor) set by the loaders
_CACHE = "_vital_fast_text_cache"


def is_text_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(TEXT_PREFIX)


def text_prompts(spec: str) -> List[str]:
    """The prompts of ``text:PROMPT[|PROMPT...]`` (surrounding quotes and spaces removed); ValueError when empty."""
    body = spec.strip()[len(TEXT_PREFIX):]
    prompts = [p.strip().strip("\"'").strip() for p in body.split("|")]
    if not body.strip() or not all(prompts):
        raise ValueError(f"bad target {spec!r}: a text target needs a prompt, e.g. text:\"a photo of a dog\" "
                         "(several: text:a dog|a puppy)")
    return prompts


def text_key(spec: str) -> str:
    """The canonical key of a text target: ``text:`` and its prompts joined by ``|``."""
    return TEXT_PREFIX + "|".join(text_prompts(spec))


def set_text_tower(model: torch.nn.Module, encode) -> None:
    """Attach the text side (``encode(prompts) -> (N, D)``) to an image tower, outside its submodules."""
    model.__dict__[_TOWER] = encode


def text_embedding(loaded, spec: str) -> torch.Tensor:
    """The unit direction ``(D,)`` (float32, CPU) of ``text:PROMPT[|...]`` in ``loaded``'s embedding space."""
    model = getattr(loaded, "model", loaded)
    encode = model.__dict__.get(_TOWER)
    if encode is None:
        raise ValueError(f"target {spec!r}: text targets need a CLIP-like model with a text tower "
                         f"(openclip:ARCH[:TAG], or an hf: CLIP or SigLIP checkpoint); "
                         f"{getattr(loaded, 'name', 'this model')} has none")
    cache: Dict[str, torch.Tensor] = model.__dict__.setdefault(_CACHE, {})
    key = text_key(spec)
    if key not in cache:
        with torch.no_grad():
            emb = encode(text_prompts(spec)).float()
        emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
        cache[key] = torch.nn.functional.normalize(emb, dim=0).cpu()
    return cache[key]
