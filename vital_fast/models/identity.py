"""What a network is, read from the module itself: its architecture family, classifier size and
weights fingerprint.

:func:`guess_family` names the family from the class and module names (one of :data:`FAMILIES`);
:func:`weights_fingerprint` hashes the weights (a cache key for reference prototypes). All three
public names are re-exported by :mod:`vital_fast.models.loading` and :mod:`vital_fast.models`.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import torch
from torch import nn

from vital_fast.models import taps

__all__ = ["FAMILIES", "OUTPUT_LAYER", "guess_family", "hf_family", "is_embedding_model", "is_hf_model", "mark_embedding_model",
           "weights_fingerprint"]

FAMILIES = ("resnet", "densenet", "convnext", "efficientnet_lite", "efficientnet", "vit", "generic")
# The preprocessing of ImageNet weights, and the default for a module whose weights say nothing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model_type -> family; the vision towers of the joint models are their own model types too.
HF_TOKEN_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "clip",
                "clip_vision_model", "siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model", "swin",
                "swinv2", "vit_mae", "vit_msn", "dinov3_vit")
HF_CONV_TYPES = ("convnext", "convnextv2")


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def weights_fingerprint(model: nn.Module) -> str:
    """A stable hash of a model's weights: 16 hex characters of a sha256.

    The hash covers, for every ``state_dict()`` entry in sorted name order, the name, the dtype,
    the shape and the raw bytes (parameters and buffers such as BatchNorm running statistics).
    It does not depend on the device or on ``requires_grad``.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The network.

    Returns
    -------
    str
        16 lowercase hex characters.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import weights_fingerprint
    >>> a = torch.nn.Linear(2, 2)
    >>> b = torch.nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> weights_fingerprint(a) == weights_fingerprint(b)
    True
    """
    module, _ = taps._unwrap(model)
    state = module.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):  # extra state; hashed by its repr
            h.update(f"{name}|extra|{value!r}\n".encode())
            continue
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype)}|{tuple(value.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Family and metadata helpers
# --------------------------------------------------------------------------------------------


def _class_names(model: nn.Module) -> Tuple[str, str]:
    """(class name, qualified name) also for TorchScript modules."""
    if isinstance(model, torch.jit.ScriptModule):
        cls = getattr(model, "original_name", type(model).__name__)
        try:
            qual = model._c._type().qualified_name()
        except Exception:  # pragma: no cover - private API; the class name still works
            qual = cls
        return cls, qual.replace("__torch__.", "")
    return type(model).__name__, f"{type(model).__module__}.{type(model).__name__}"


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def hf_model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def hf_family(model: nn.Module) -> str:
    """The family of a ``transformers`` model from its ``config.model_type``."""
    mt = hf_model_type(model)
    if mt in HF_TOKEN_TYPES:
        return "vit"
    if mt in HF_CONV_TYPES:
        return "convnext"
    return "generic"


_EMBEDDING = "_vital_fast_embedding_model"


OUTPUT_LAYER = "output"


def mark_embedding_model(model: nn.Module) -> nn.Module:
    """Record that ``model``'s output is an embedding, not class logits (a CLIP image tower, a DINOv2 backbone):
    ``class:N`` targets are refused on it, its units are the targets. The embedding becomes a layer of its own,
    ``output`` (an ``nn.Identity`` the model's output passes through; no weights), so that directions in the
    embedding space (``text:`` targets, :mod:`vital_fast.models.text`) are targets like any other. The layer shows
    the embedding ``(B, D)`` in the family's layout, as one token ``(B, 1, D)`` of a ``vit`` or a 1x1 map
    ``(B, D, 1, 1)`` elsewhere; the model's output itself is unchanged."""
    if model.__dict__.get(_EMBEDDING):
        return model
    model.__dict__[_EMBEDDING] = True
    if OUTPUT_LAYER not in model._modules:
        model.__dict__[_OUTPUT_TOKENS] = guess_family(model) == "vit"
        model.add_module(OUTPUT_LAYER, nn.Identity())
        model.register_forward_hook(_output_tap)  # module-level: the model still pickles
    return model


_OUTPUT_TOKENS = "_vital_fast_output_as_token"


def _output_tap(m: nn.Module, args, out):
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        m._modules[OUTPUT_LAYER](out[:, None] if m.__dict__.get(_OUTPUT_TOKENS) else out[:, :, None, None])
    return out


def is_embedding_model(model: nn.Module) -> bool:
    """Whether :func:`mark_embedding_model` marked ``model``."""
    return bool(model.__dict__.get(_EMBEDDING, False))


def guess_family(model: nn.Module) -> str:
    """The architecture family of a module, from its class and module names.

    Returns one of :data:`FAMILIES`; ``"generic"`` when nothing matches.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import guess_family
    >>> guess_family(torch.nn.Sequential())
    'generic'
    """
    module, _ = taps._unwrap(model)
    if is_hf_model(module):
        return hf_family(module)
    cls, qual = _class_names(module)
    text = qual.lower()
    if "efficientnet_lite_pytorch" in text or "efficientnet_pytorch" in text:
        return "efficientnet_lite"  # same _conv_stem/_blocks layout: the same presets apply
    if "efficientnet" in text or "mobilenetv3" in text:
        return "efficientnet"  # torchvision's and timm's: stem and stages under other names
    if "densenet" in text:
        return "densenet"
    if "convnext" in text:
        return "convnext"
    if "resnet" in text or "resnext" in text:
        return "resnet"
    if cls == "VisionTransformer" or "vision_transformer" in text:
        return "vit"
    return "generic"


def _infer_num_classes(model: nn.Module) -> Optional[int]:
    """``out_features`` of the last ``nn.Linear`` registered in the model, if any."""
    last = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = mod.out_features
        elif getattr(mod, "original_name", None) == "Linear" and hasattr(mod, "weight"):
            last = int(mod.weight.shape[0])
    return last
