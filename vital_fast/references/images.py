"""Reference images: reading files and folders, the offline photographs, preprocessing.

Images are handled as float tensors ``(3, H, W)`` in [0, 1]. Files are read as a photo collection
holds them, the way torchvision's ``ImageFolder`` does (``PIL.Image.convert("RGB")``):

- grayscale (``1``, ``L``, ``LA``), palette (``P``, ``PA``), ``CMYK``, ``RGBA`` and other 8-bit modes
  are converted to RGB (alpha dropped, gray replicated);
- 16-bit and 32-bit integer and float grayscale (``I;16``, ``I``, ``F``) are scaled to [0, 1] by their
  bit depth first (a 16-bit PNG by 65535; an ``I``/``F`` image by 255 or 65535 when its values fit that
  range, else by its own minimum and maximum), so that a 16-bit scan is not all white;
- the EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as a photo viewer shows it;
- a file larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89
  megapixels; :class:`PIL.Image.DecompressionBombWarning` and ``...Error``) is skipped, not decoded
  nor downscaled: decoding it could exhaust memory, and a reference photograph need not be that large.

Unreadable, truncated and too-large files are skipped with one warning that counts them; they are
never fatal for a folder as long as one usable image remains.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class ImageSet:
    """Reference images with a name and a content hash each (the hash keys the cache)."""

    images: List[torch.Tensor] = field(default_factory=list)  # (3, H, W) float32 in [0, 1]
    names: List[str] = field(default_factory=list)
    hashes: List[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def digest(self) -> str:
        """One hash of the whole set (order-independent)."""
        return hashlib.sha256("\n".join(sorted(self.hashes)).encode()).hexdigest()[:16]

    def subset(self, idx: Sequence[int]) -> "ImageSet":
        return ImageSet([self.images[i] for i in idx], [self.names[i] for i in idx],
                        [self.hashes[i] for i in idx])


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _unit_gray(im) -> np.ndarray:
    """A high-depth grayscale image (``I;16*``, ``I``, ``F``) as ``(H, W)`` float32 in [0, 1]."""
    arr = np.asarray(im).astype(np.float32)
    if im.mode.startswith("I;16"):
        return arr / 65535.0
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    if lo >= 0.0 and hi <= 1.0 and im.mode == "F":
        return arr
    if lo >= 0.0 and hi <= 255.0:
        return arr / 255.0
    if lo >= 0.0 and hi <= 65535.0:
        return arr / 65535.0
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def load_image(path: str) -> torch.Tensor:
    """Read one image file as ``(3, H, W)`` float32 in [0, 1] (any Pillow mode; EXIF orientation applied).

    Raises
    ------
    ValueError
        When the file cannot be read as an image (unreadable, truncated, a mode Pillow cannot convert
        to RGB), or is past Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            # past MAX_IMAGE_PIXELS Pillow warns (past twice that it raises): skip both, never decode
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Palette images with Transparency ..."
            with Image.open(path) as im:
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a broken EXIF block: keep the pixels as stored
                    pass
                if im.mode.startswith("I") or im.mode == "F":
                    gray = _unit_gray(im)
                    arr = np.repeat(gray[:, :, None], 3, axis=2)
                else:
                    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{path}: too large to decode safely ({exc})") from exc
    except Exception as exc:  # a truncated or foreign file: Pillow raises many kinds
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()


def list_image_files(folder: str, recursive: bool = True) -> List[str]:
    """Image files under ``folder`` (by extension), sorted for a stable order. A broken symbolic link (dangling,
    or a loop) is left out with one warning that counts them, as unreadable files are when they are loaded."""
    out, broken = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."):
                path = os.path.join(root, f)
                (out if os.path.exists(path) else broken).append(path)
        if not recursive:
            break
    if broken:
        warnings.warn(f"{folder}: skipped {len(broken)} broken symbolic link{'s' if len(broken) > 1 else ''} "
                      f"(dangling or looping; first: {broken[0]})", UserWarning, stacklevel=2)
    return out


def load_images(
    source: Union[str, Sequence[Union[str, torch.Tensor]], torch.Tensor], *, what: str = "reference images"
) -> ImageSet:
    """Load reference images from a folder, a list of files or tensors, or a ``(K, 3, H, W)`` tensor.

    Files in any Pillow mode are converted to RGB (see the module docstring). Unreadable, truncated
    and too-large files are skipped with one warning that counts them. Tensors must be
    ``(3, H, W)`` float in [0, 1].

    Raises
    ------
    ValueError
        A missing path, or no usable image at all.
    """
    items: List[Union[str, torch.Tensor]]
    if isinstance(source, torch.Tensor):
        if source.dim() != 4 or source.shape[1] != 3:
            raise ValueError(f"{what}: a tensor of images must be (K, 3, H, W), got {tuple(source.shape)}")
        items = list(source)
    elif isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if os.path.isdir(source):
            items = list_image_files(source)
        elif os.path.isfile(source):
            items = [source]
        else:
            raise ValueError(f"{what}: no such file or folder: {source}")
    else:
        items = list(source)
    out = ImageSet()
    reasons: List[str] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"{what}: an image tensor must be (3, H, W), got {tuple(item.shape)}")
            img = item.detach().float().cpu().clamp(0, 1)
            out.images.append(img)
            out.names.append(f"tensor{len(out.names)}")
            out.hashes.append(tensor_hash(img))
            continue
        path = os.fspath(item)
        if not os.path.exists(path):
            raise ValueError(f"{what}: no such file: {path}")
        try:
            img = load_image(path)
        except ValueError as exc:
            out.skipped += 1
            reasons.append(str(exc))
            continue
        with open(path, "rb") as fh:
            h = hashlib.sha256(fh.read()).hexdigest()[:16]
        out.images.append(img)
        out.names.append(path)
        out.hashes.append(h)
    if out.skipped:
        warnings.warn(
            f"{what}: skipped {out.skipped} of {len(items)} files that could not be read as images "
            f"(unreadable, truncated or past Pillow's decompression-bomb limit; first: {reasons[0]})",
            UserWarning,
            stacklevel=2,
        )
    if not out.images:
        raise ValueError(f"{what}: no usable image in {source if isinstance(source, str) else 'the given list'}")
    return out


INTERPOLATIONS = ("bilinear", "bicubic")


def resize_center_crop(img: torch.Tensor, size: int, resize: Optional[int] = None,
                       mode: str = "bilinear") -> torch.Tensor:
    """Resize the shorter side to ``resize`` (default ``size * 256 / 224``) with ``mode`` (bilinear or bicubic,
    antialiased: the model's own preprocessing, :attr:`LoadedModel.interpolation`), then center-crop ``size``."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"resize_center_crop: mode must be one of {', '.join(INTERPOLATIONS)}, got {mode!r}")
    resize = resize or int(round(size * 256 / 224))
    _, h, w = img.shape
    scale = resize / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    x = F.interpolate(img[None], size=(nh, nw), mode=mode, align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1)


def random_resized_crops(
    img: torch.Tensor, size: int, n: int, generator: torch.Generator, scale: Tuple[float, float] = (0.35, 1.0)
) -> torch.Tensor:
    """``n`` random resized crops ``(n, 3, size, size)`` of one image (aspect 3/4 to 4/3), seeded."""
    _, h, w = img.shape
    out = []
    for _ in range(n):
        area = h * w * float(torch.empty(1).uniform_(*scale, generator=generator))
        ratio = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator)))
        ch = int(round(min(h, np.sqrt(area / ratio))))
        cw = int(round(min(w, np.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = img[:, top:top + ch, left:left + cw]
        out.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0])
    return torch.stack(out).clamp(0, 1)


# The photographs that ship inside installed packages, with the ImageNet class each shows
# (DESIGN.md §6: what efficientnet-lite0 calls them). Paths are resolved lazily.
_OFFLINE = {
    "coffee": ("skimage", "coffee.png", 967),
    "chelsea": ("skimage", "chelsea.png", 282),
    "rocket": ("skimage", "rocket.jpg", 657),
    "motorcycle_left": ("skimage", "motorcycle_left.png", 665),
    "motorcycle_right": ("skimage", "motorcycle_right.png", 665),
    "astronaut": ("skimage", "astronaut.png", None),
    "china": ("sklearn", "china.jpg", 698),
    "flower": ("sklearn", "flower.jpg", 985),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg", 400),
}


def offline_photo_path(name: str) -> str:
    """Path of one photograph that ships in an installed package (scikit-image, scikit-learn, matplotlib)."""
    if name not in _OFFLINE:
        raise ValueError(f"unknown offline photograph {name!r}; known: {', '.join(sorted(_OFFLINE))}")
    pkg, fname, _ = _OFFLINE[name]
    try:
        if pkg == "skimage":
            import skimage

            path = os.path.join(os.path.dirname(skimage.__file__), "data", fname)
        elif pkg == "sklearn":
            import sklearn.datasets

            path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", fname)
        else:
            import matplotlib

            path = os.path.join(matplotlib.get_data_path(), "sample_data", fname)
    except ImportError as exc:
        dist = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(pkg, pkg)
        from vital_fast._errors import MissingPackageError

        raise MissingPackageError(f"the offline photograph {name!r} needs the package {dist}, which comes with the "
                          f"extra 'demo': pip install 'vital_fast[demo]' (or pip install {dist})") from exc
    if not os.path.isfile(path):
        raise RuntimeError(f"the offline photograph {name!r} is missing from {pkg} (expected {path})")
    return path


def offline_class_photos() -> Dict[int, List[str]]:
    """ImageNet class index -> paths of offline photographs showing that class."""
    out: Dict[int, List[str]] = {}
    for name, (_, _, cls) in _OFFLINE.items():
        if cls is not None:
            out.setdefault(cls, []).append(offline_photo_path(name))
    return out


def offline_photo_paths() -> List[str]:
    """All offline photographs (a small candidate pool for channel top-k mining)."""
    return [offline_photo_path(n) for n in _OFFLINE]


# Class folders: a subfolder per class, named by the class index or its WordNet id.

WNID_FILES = ("wnids.txt", "LOC_synset_mapping.txt", "synsets.txt")
_WNID_CACHE: Dict[Tuple[str, float, int], List[str]] = {}


def class_image_folder(root: str, index: int, wnids_file: Optional[str] = None) -> Optional[str]:
    """The subfolder of ``root`` holding class ``index``: named by the index (``285``) or a WordNet id.

    The WordNet ids come from ``wnids_file`` when given; else from a ``wnids.txt`` (or
    ``LOC_synset_mapping.txt``, ``synsets.txt``) in ``root`` itself (:func:`find_wnid_file`); else from
    ``$VITAL_FAST_WNIDS`` when the user set it. The mapping is an argument, never process state: two
    folders with different files resolve each by its own.

    Raises
    ------
    ValueError
        ``wnids_file`` (or ``$VITAL_FAST_WNIDS``, when used) names a file that does not exist.
    """
    cand = os.path.join(root, str(index))
    if os.path.isdir(cand):
        return cand
    if wnids_file is None:
        wnids_file = find_wnid_file(root)
        if wnids_file is None and os.environ.get("VITAL_FAST_WNIDS"):
            wnids_file = os.environ["VITAL_FAST_WNIDS"]
            if not os.path.isfile(wnids_file):
                raise ValueError(f"$VITAL_FAST_WNIDS: no such WordNet id file: {wnids_file}")
        if wnids_file is None:  # ImageFolder's convention: ImageNet-1k's class i is the i-th WordNet id, sorted
            ids = sorted_wnid_folders(root)
            if len(ids) == 1000 and 0 <= index < 1000:
                return os.path.join(root, ids[index])
            wnid = imagenet_wnid(index) if ids else None  # a subset of ImageNet-1k's folders: the id names the class
            if wnid and os.path.isdir(os.path.join(root, wnid)):
                return os.path.join(root, wnid)
            return None
    elif not os.path.isfile(wnids_file):
        raise ValueError(f"no such WordNet id file: {wnids_file}")
    wnid = _wnid(index, wnids_file)
    if wnid and os.path.isdir(os.path.join(root, wnid)):
        return os.path.join(root, wnid)
    return None


def imagenet_wnid(index: int) -> Optional[str]:
    """ImageNet-1k's WordNet id of class ``index`` (the table that ships with timm's ``ImageNetInfo``), or None
    without timm or past the 1,000 classes."""
    if not 0 <= index < 1000:
        return None
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return None
    try:
        return str(ImageNetInfo().index_to_label_name(index))
    except Exception:  # noqa: BLE001 - a timm without the table: as if absent
        return None


def missing_class_message(root: str, index: int, wnids_file: Optional[str] = None) -> str:
    """Why :func:`class_image_folder` found no folder for class ``index`` under ``root``, and what to do, in one
    line: the index folder to make, the WordNet id the mapping gives and its missing folder, a class past the
    mapping's end, or WordNet-id folders without a mapping (not ImageNet-1k's 1,000)."""
    head = f"no reference images for class:{index} in {root}"
    wnids_file = wnids_file or find_wnid_file(root) or os.environ.get("VITAL_FAST_WNIDS") or None
    if wnids_file and os.path.isfile(wnids_file):
        try:
            ids = _read_wnids(wnids_file)
        except (OSError, UnicodeDecodeError):
            return f"{head}: cannot read the WordNet id file {wnids_file}"
        if not 0 <= index < len(ids):
            return (f"{head}: {os.path.basename(wnids_file)} lists {len(ids)} classes (0-{len(ids) - 1}); class "
                    f"{index} is not among them (a folder {index}/ would be used)")
        return (f"{head}: {os.path.basename(wnids_file)} maps it to the WordNet id {ids[index]}, but there is no "
                f"folder {os.path.join(root, ids[index])} (nor {os.path.join(root, str(index))})")
    wn = sorted_wnid_folders(root)
    if wn:
        wnid = imagenet_wnid(index)
        if wnid:
            return (f"{head}: ImageNet-1k's class {index} is {wnid}, and there is no folder {os.path.join(root, wnid)} "
                    f"among its {len(wn)} WordNet-id folders ({wn[0]}, ...); for another class order add a wnids.txt")
        return (f"{head}: its {len(wn)} WordNet-id folders ({wn[0]}, ...) are not ImageNet-1k's 1,000, so their "
                f"order says nothing: add a wnids.txt (one WordNet id a line, in the model's class order) beside "
                f"them, or name the folders by class index ({index}/)")
    return f"{head}: expected a subfolder {os.path.join(root, str(index))} (or one named by its WordNet id)"


def sorted_wnid_folders(root: str) -> List[str]:
    """The subfolders of ``root`` named like WordNet ids (``n01440764``), sorted: for ImageNet-1k's
    1000 class folders (its ``train/`` or ``val/`` tree), the i-th is class i (torchvision's
    ``ImageFolder`` numbers classes the same way)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if len(n) == 9 and n[0] == "n" and n[1:].isdigit()
                  and os.path.isdir(os.path.join(root, n)))


def _read_wnids(path: str) -> List[str]:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _WNID_CACHE:
        with open(path, encoding="utf-8") as fh:
            _WNID_CACHE[key] = [line.split()[0] for line in fh if line.strip()]
    return _WNID_CACHE[key]


def _wnid(index: int, wnids_file: Optional[str]) -> Optional[str]:
    """The WordNet id of an ImageNet class from ``wnids_file``: a ``wnids.txt`` (one id per line, in
    class order) or a ``LOC_synset_mapping.txt`` (id, then the names). ``None`` without a readable file
    or for an index past its end."""
    if not wnids_file or not os.path.isfile(wnids_file):
        return None
    try:
        ids = _read_wnids(wnids_file)
    except (OSError, UnicodeDecodeError):
        return None
    if 0 <= index < len(ids):
        return ids[index]
    return None


def find_wnid_file(root: str) -> Optional[str]:
    """A class-order WordNet id file in ``root`` (``wnids.txt``, ``LOC_synset_mapping.txt`` or
    ``synsets.txt``), or ``None``."""
    for name in WNID_FILES:
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None
