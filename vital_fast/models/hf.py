"""Hugging Face ``transformers`` vision models: ``hf:NAME`` (the ``hf`` extra).

``NAME`` is a hub id (``google/vit-base-patch16-224``, ``facebook/dinov2-small``, ``openai/clip-vit-base-patch32``)
read from the local Hugging Face cache only, or a local folder written by ``save_pretrained``. Nothing is ever
downloaded: a model that is not cached is refused in one line that says how to fetch it, and that
``weights="random"`` (``--random-weights``) builds the architecture from its configuration alone when the
configuration is cached.

What is taken from the checkpoint:

* the network: the class its configuration names (``architectures``), the vision tower of CLIP and SigLIP
  checkpoints (``CLIPVisionModelWithProjection``, ``SiglipVisionModel``), else the image-classification or the
  base model;
* the preprocessing from its image processor (``preprocessor_config.json``): mean, std, resize, center crop and
  resampling (bilinear or bicubic);
* class names from the configuration's ``id2label`` (when they are not the placeholder ``LABEL_i``);
* the family: ViT, DeiT, DINOv2 (with or without registers), BEiT, CLIP, SigLIP and Swin are ``"vit"`` (token
  layers ``(B, N, C)``), ConvNeXt is ``"convnext"``, anything else ``"generic"``.

A ``transformers`` model, loaded here or passed as a module, is adapted in place (:func:`adapt`) by two hooks
on its top-level module: its output (a ``ModelOutput``) becomes one tensor (``logits`` where the model has a
classifier, else the image embedding, the pooled output, or the first token of the last hidden state), and
the position embeddings are interpolated for inputs of another size than the checkpoint's
(``interpolate_pos_encoding=True`` where the model takes it). Layer names are those ``transformers`` gives
(``vit.layers.N``, ``dinov2.encoder.layer.N``, ``vision_model.encoder.layers.N``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from vital_fast._errors import MissingPackageError
from vital_fast.models.identity import (
    HF_CONV_TYPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    hf_family,
    hf_model_type,
    mark_embedding_model,
)
from vital_fast.models.text import set_text_tower

__all__ = ["HF_PREFIX", "adapt", "hf_default_layers", "hf_num_classes", "load_hf"]

HF_PREFIX = "hf:"
_MARK = "_vital_fast_hf_adapted"
_TOWERS = {"clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModelWithProjection",
           "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
           "siglip2": "Siglip2VisionModel", "siglip2_vision_model": "Siglip2VisionModel"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingPackageError(
            "load_model: 'hf:...' models need the package 'transformers', which comes with the extra 'hf': "
            "`pip install 'vital_fast[hf]'` (or `pip install transformers`)"
        ) from None
    return transformers


# --------------------------------------------------------------------------------------------
# Adapting a module: one tensor out, any input size
# --------------------------------------------------------------------------------------------


def _one_tensor(out: Any) -> Any:
    """The tensor a ``ModelOutput`` stands for: logits, else image embeddings, else the pooled output, else the
    first token of the last hidden state."""
    if isinstance(out, torch.Tensor) or not hasattr(out, "keys"):
        return out
    for key in ("logits", "image_embeds", "pooler_output"):
        v = out.get(key) if hasattr(out, "get") else None
        if isinstance(v, torch.Tensor):
            return v.flatten(1) if key == "pooler_output" and v.dim() > 2 else v
    v = out.get("last_hidden_state")
    if isinstance(v, torch.Tensor):
        return v[:, 0] if v.dim() == 3 else v.flatten(1)
    raise ValueError(f"a {type(out).__name__} without logits, embeddings or hidden states: nothing to visualize")


def adapt(model: nn.Module) -> nn.Module:
    """Make a ``transformers`` model callable as ``model(x) -> Tensor`` at any input size, in place (idempotent).

    Two hooks on the top-level module: a forward hook maps the ``ModelOutput`` to one tensor
    (:func:`_one_tensor`), and where ``forward`` takes ``interpolate_pos_encoding`` a pre-hook sets it, so that
    the position embeddings follow the input size. Layer names are unchanged.
    """
    if getattr(model, _MARK, False):
        return model
    model.register_forward_hook(_one_tensor_hook)  # module-level hooks: the model still pickles
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        params = {}
    if "interpolate_pos_encoding" in params:
        model.register_forward_pre_hook(_interpolate_hook, with_kwargs=True)
    setattr(model, _MARK, True)
    return model


def _one_tensor_hook(module: nn.Module, args, out):
    return _one_tensor(out)


def _interpolate_hook(module: nn.Module, args, kwargs):
    kwargs.setdefault("interpolate_pos_encoding", True)
    return args, kwargs


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _fetch_hint(name: str) -> str:
    return (f"vital_fast never downloads. On a machine with network run `python -c \"from transformers import "
            f"AutoModel, AutoImageProcessor; AutoModel.from_pretrained('{name}'); "
            f"AutoImageProcessor.from_pretrained('{name}')\"` (or `hf download {name}`) and copy its Hugging Face "
            "cache (~/.cache/huggingface/hub) here")


def _cached_file(name: str, filename: str) -> Optional[str]:
    if os.path.isdir(name):
        p = os.path.join(name, filename)
        return p if os.path.isfile(p) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    p = try_to_load_from_cache(name, filename)
    return p if isinstance(p, str) and os.path.isfile(p) else None


def _tower_class(transformers, config) -> Tuple[Any, Any]:
    """(model class, its config) for ``config``: the vision tower of a joint model, the class the checkpoint
    names, the image classifier, or the base model."""
    mt = str(getattr(config, "model_type", ""))
    if mt in _TOWERS and hasattr(transformers, _TOWERS[mt]):
        cls = getattr(transformers, _TOWERS[mt])
        vision = getattr(config, "vision_config", None)
        if vision is not None:
            vision = cls.config_class.from_dict(vision.to_dict())
            if hasattr(config, "projection_dim") and hasattr(vision, "projection_dim"):
                vision.projection_dim = config.projection_dim
        return cls, vision if vision is not None else config
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls, config
    from transformers import AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if mt in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and getattr(config, "num_labels", 0) > 2:
        return AutoModelForImageClassification, config
    return AutoModel, config


def _size(value: Any) -> Tuple[Optional[int], Optional[int]]:
    """(shortest edge, square side) of an image processor ``size`` / ``crop_size`` entry."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), None
        if "height" in value:
            return None, int(min(value["height"], value.get("width", value["height"])))
    return None, None


def _preprocessing(name: str, config) -> Dict[str, Any]:
    """input_size, resize_size, mean, std and interpolation from ``preprocessor_config.json`` (the config's
    ``image_size`` and ImageNet statistics, with a warning, when the checkpoint has no image processor)."""
    vision = getattr(config, "vision_config", None) or config
    side = getattr(vision, "image_size", 224)
    side = int(side[0] if isinstance(side, (list, tuple)) else side)
    path = _cached_file(name, "preprocessor_config.json")
    if path is None:
        warnings.warn(f"hf:{name} has no preprocessor_config.json on this machine: ImageNet mean/std at {side} px",
                      stacklevel=3)
        return dict(input_size=side, resize_size=side, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation="bilinear")
    try:
        with open(path, encoding="utf-8") as fh:
            pp = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_model: hf:{name}: unreadable preprocessor_config.json ({exc})") from None
    short, square = _size(pp.get("size"))
    crop_short, crop_square = _size(pp.get("crop_size"))
    crop = crop_square or crop_short
    crop_pct = pp.get("crop_pct")
    if short and isinstance(crop_pct, (int, float)) and 0 < crop_pct < 1 and not crop:
        # ConvNeXt's processor: resize the short side to size / crop_pct, then center-crop size (below 384 px)
        return dict(input_size=int(short), resize_size=int(short / crop_pct) if short < 384 else int(short),
                    mean=tuple(float(v) for v in (pp.get("image_mean") or IMAGENET_MEAN)),
                    std=tuple(float(v) for v in (pp.get("image_std") or IMAGENET_STD)),
                    interpolation=_RESAMPLE.get(pp.get("resample"), "bilinear"))
    if pp.get("do_center_crop", crop is not None) and crop:
        input_size = crop
        resize = short or square or crop
    else:  # a plain resize to a square (or to a shortest edge), no crop
        input_size = square or short or side
        resize = input_size
    mean = tuple(float(v) for v in (pp.get("image_mean") or IMAGENET_MEAN))
    std = tuple(float(v) for v in (pp.get("image_std") or IMAGENET_STD))
    if not pp.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return dict(input_size=int(input_size), resize_size=max(int(resize), int(input_size)), mean=mean, std=std,
                interpolation=_RESAMPLE.get(pp.get("resample"), "bilinear"))


def _class_names(config, num_classes: Optional[int]) -> Optional[Tuple[str, ...]]:
    id2label = getattr(config, "id2label", None) or {}
    if not num_classes or len(id2label) != num_classes:
        return None
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_classes)]
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return tuple(names)


def load_hf(name: str, weights: str) -> dict:
    """The loader's record (model, name, family, preprocessing, classes) of ``hf:NAME``; never downloads."""
    transformers = _transformers()
    from transformers import AutoConfig

    if not name:
        raise ValueError("load_model: 'hf:' needs a hub id or a folder, e.g. hf:google/vit-base-patch16-224")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if os.path.isdir(name):
            raise ValueError(f"load_model: hf:{name} is a folder without a readable config.json "
                             f"({str(exc).splitlines()[0][:200]})") from None
        raise FileNotFoundError(f"load_model: hf:{name} is not in the local Hugging Face cache; "
                                f"{_fetch_hint(name)}") from None
    cls, cfg = _tower_class(transformers, config)
    if weights == "random":
        model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    else:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a progress bar per load: not on our stderr
        try:
            model = cls.from_pretrained(name, config=cfg, local_files_only=True)
        except RuntimeError as exc:  # transformers' loading report: weights that do not fit the config
            raise ValueError(f"load_model: the weights of hf:{name} do not fit its {type(cfg).__name__} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"load_model: the weights of hf:{name} are not on this machine (its config is: "
                f"--random-weights builds the architecture from it); {_fetch_hint(name)}"
                f" [{str(exc).splitlines()[0][:160]}]") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    model = adapt(model)
    num_classes = hf_num_classes(model)
    if num_classes is None:
        mark_embedding_model(model)
    if str(getattr(config, "model_type", "")) in _TEXT_TOWERS and getattr(config, "text_config", None) is not None:
        set_text_tower(model, _TextEncoder(name, config, weights))
    return dict(model=model, name=f"hf:{name}", family=hf_family(model), num_classes=num_classes,
                class_names=_class_names(model.config, num_classes), **_preprocessing(name, config))


_TEXT_TOWERS = {"clip": "CLIPTextModelWithProjection", "siglip": "SiglipTextModel", "siglip2": "Siglip2TextModel"}


class _TextEncoder:
    """``encode(prompts) -> (N, D)`` of a joint checkpoint's text tower and tokenizer, loaded for each call and
    dropped after it (from the same cache or folder; random weights built from the config, seeded, for
    ``weights="random"``); :mod:`vital_fast.models.text` caches the directions per prompt. A plain object, so the
    image tower still pickles."""

    def __init__(self, name: str, config, weights: str) -> None:
        self.name, self.config, self.weights = name, config, weights

    def _load(self):
        transformers = _transformers()
        from transformers import AutoTokenizer

        config, mt = self.config, str(self.config.model_type)
        cls = getattr(transformers, _TEXT_TOWERS[mt])
        tcfg = cls.config_class.from_dict(config.text_config.to_dict())
        if hasattr(config, "projection_dim") and hasattr(tcfg, "projection_dim"):
            tcfg.projection_dim = config.projection_dim
        try:
            tok = AutoTokenizer.from_pretrained(self.name, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"text targets: the tokenizer of hf:{self.name} is not on this machine "
                             f"({str(exc).splitlines()[0][:160]}); {_fetch_hint(self.name)}") from None
        if self.weights == "random":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                text = cls.from_config(tcfg)
        else:
            text = cls.from_pretrained(self.name, config=tcfg, local_files_only=True)
        return text.eval(), tok, mt

    def __call__(self, prompts):
        text, tok, mt = self._load()  # runs once for these prompts and is dropped
        batch = tok(list(prompts), padding="max_length" if mt.startswith("siglip") else True, truncation=True,
                    return_tensors="pt")
        out = text(**batch)
        emb = getattr(out, "text_embeds", None)
        return emb if isinstance(emb, torch.Tensor) else out.pooler_output


def hf_num_classes(model: nn.Module) -> Optional[int]:
    """The classifier's outputs of a ``transformers`` model, or None for a model without a classifier (its
    output is an embedding: unit targets only)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    has_head = any(n in ("classifier", "cls_classifier", "head") and isinstance(m, nn.Linear)
                   for n, m in model.named_children())
    return int(num_labels) if has_head and num_labels else None


# --------------------------------------------------------------------------------------------
# Matched layers
# --------------------------------------------------------------------------------------------


def _block_lists(module: nn.Module) -> List[Tuple[str, int]]:
    """(name, length) of every ``nn.ModuleList`` named ``layer``, ``layers`` or ``blocks``."""
    out = []
    for n, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in ("layer", "layers", "blocks") and len(m):
            out.append((n, len(m)))
    return out


def _picks(depth: int) -> List[int]:
    if depth == 12:
        return [0, 4, 8, 11]  # the paper's ViT-B choice
    if depth == 24:
        return [2, 9, 20, 23]  # the paper's ViT-L choice
    return sorted({round(f * (depth - 1)) for f in (0.0, 1 / 3, 2 / 3, 1.0)})


def hf_default_layers(module: nn.Module) -> List[Tuple[str, float]]:
    """The matched layers of a ``transformers`` model, the paper's choices carried over by architecture:

    * token models (ViT, DeiT, DINOv2, CLIP, SigLIP, BEiT): the patch embedding convolution and four encoder
      layers (ViT-B depth 12: 0, 4, 8, 11; depth 24: 2, 9, 20, 23; else spread evenly);
    * Swin: the patch embedding and the last block of each stage;
    * ConvNeXt: the stem (weight 10), the downsampling convolutions of stages 1-3 and the last stage.
    """
    names = {n for n, _ in module.named_modules()}
    stem = next((n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
    mt = hf_model_type(module)
    if mt in HF_CONV_TYPES:
        stages = [n for n, _ in _block_lists(module) if n.endswith("stages")] or \
                 [n for n in names if n.endswith("encoder.stages")]
        base = stages[0] if stages else None
        emb = next((n for n in names if n.endswith("embeddings") and "." not in n.replace("convnext.", "")), None)
        if base is None or emb is None:
            raise ValueError("default_layers: a transformers ConvNeXt without 'embeddings' and 'encoder.stages'")
        down = [f"{base}.{k}.downsampling_layer.1" if f"{base}.{k}.downsampling_layer.1" in names
                else f"{base}.{k}" for k in (1, 2, 3)]
        return [(emb, 10.0)] + [(d, 1.0) for d in down] + [(f"{base}.3", 1.0)]
    if mt in ("swin", "swinv2"):
        stages = [(n, k) for n, k in _block_lists(module) if n.endswith("encoder.layers")]
        if not stages:
            raise ValueError("default_layers: a transformers Swin without 'encoder.layers'")
        base, n_stages = stages[0]
        ends = []
        for s in range(n_stages):
            blocks = dict(_block_lists(module)).get(f"{base}.{s}.blocks", 0)
            if blocks:
                ends.append(f"{base}.{s}.blocks.{blocks - 1}")
        return ([(stem, 1.0)] if stem else []) + [(e, 1.0) for e in ends]
    lists = [(n, k) for n, k in _block_lists(module) if not n.endswith(("blocks",)) or "encoder" in n]
    if not lists:
        raise ValueError("default_layers: a transformers model without encoder layers ('layer', 'layers'); "
                         "pass family='generic' or choose the layers yourself")
    base, depth = max(lists, key=lambda t: t[1])
    return ([(stem, 1.0)] if stem else []) + [(f"{base}.{k}", 1.0) for k in _picks(depth)]
