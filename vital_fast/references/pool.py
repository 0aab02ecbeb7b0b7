"""Candidate-image pools for top-k mining, read lazily: never held whole in memory.

An :class:`ImagePool` is a list of images that are decoded only when needed:

- a folder tree (:meth:`ImagePool.from_folder`, every image file under it, sorted) or a list of
  files (:meth:`ImagePool.from_files`), read with :func:`~vital_fast.references.images.load_image`
  (any Pillow mode, EXIF orientation applied);
- any map-style ``torch.utils.data.Dataset`` whose items are images (:meth:`ImagePool.from_dataset`):
  a ``(3, H, W)`` or ``(1, H, W)`` tensor (float in [0, 1] or ``uint8``), a PIL image or an
  ``(H, W, 3)`` ``uint8`` array, alone or as the first element of a tuple (``(image, label)``, as
  torchvision's ``ImageFolder`` returns);
- an in-memory :class:`~vital_fast.references.images.ImageSet` (:meth:`ImagePool.from_imageset`),
  so that code written for pools also takes the small sets of before.

:meth:`ImagePool.batches` streams the pool in index order as preprocessed batches (resize and
center crop to the mining size), decoded in ``torch.utils.data.DataLoader`` workers; only the
batches in flight are in memory. An unreadable file (or a dataset item whose loading raises) is
skipped and counted, with one warning at the end naming the first; never fatal. A dataset item of
the wrong type or shape is a programming error: a ``ValueError`` naming its index.

:meth:`ImagePool.check` runs before any work: it fails, naming the folder, the file or the dataset
index, when no image of the pool can be read, or when the dataset's first item is not an image.

The :attr:`ImagePool.fingerprint` keys the mining cache: for files, a hash of their paths (relative
to the folder a pool was listed from), sizes and modification times; pixel contents are not read.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vital_fast.references.images import ImageSet, list_image_files, load_image, resize_center_crop, tensor_hash

_ENV_WORKERS = "VITAL_FAST_WORKERS"
_SMALL = 64  # pools smaller than this are decoded in the main process (no worker start-up)


def default_workers() -> int:
    """DataLoader workers for decoding: ``$VITAL_FAST_WORKERS`` when set, else the usable CPU cores
    less one (one is left for the model), at most 8, at least 1."""
    env = os.environ.get(_ENV_WORKERS, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"${_ENV_WORKERS} must be a whole number of workers, got {env!r}") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def _pil_to_tensor(im) -> torch.Tensor:
    from vital_fast.references.images import _unit_gray

    if im.mode.startswith("I") or im.mode == "F":
        arr = np.repeat(_unit_gray(im)[:, :, None], 3, axis=2)
    else:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()


def as_image(item: Any, where: str) -> torch.Tensor:
    """A dataset item as a ``(3, H, W)`` float32 tensor in [0, 1]; ``ValueError`` naming ``where`` else."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    try:
        from PIL import Image

        if isinstance(item, Image.Image):
            return _pil_to_tensor(item)
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"{where}: an image array must be (H, W, 3) uint8, got {item.shape} {item.dtype}")
        item = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1)
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"{where}: expected an image (a (3, H, W) tensor, a PIL image or an (image, label) "
                         f"pair), got {type(item).__name__}")
    if item.dim() != 3 or item.shape[0] not in (1, 3) or min(item.shape[1:]) < 1:
        raise ValueError(f"{where}: an image tensor must be (3, H, W) (channels first), got {tuple(item.shape)}")
    x = item.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        lo, hi = float(x.min()), float(x.max())
        if not (lo == lo and hi == hi) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{where}: image values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] (a normalized "
                             f"tensor? give the images before normalization)")
    else:
        raise ValueError(f"{where}: an image tensor must be float in [0, 1] or uint8, got {x.dtype}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.clamp(0, 1).contiguous()


class _Skip(Exception):
    """An item that cannot be read: skipped and counted."""


class ImagePool:
    """A lazily read pool of images (see the module docstring). Build it with a ``from_*`` method."""

    def __init__(self, *, files: Optional[List[str]] = None, dataset: Any = None,
                 imageset: Optional[ImageSet] = None,
                 names: Sequence[str], fingerprint: Optional[str], source: str, what: str,
                 workers: Optional[int] = None) -> None:
        self._files = files
        self._dataset = dataset
        self._set = imageset
        self.names: List[str] = list(names)
        self.fingerprint = fingerprint
        self.source = source
        self.what = what
        self.workers = workers
        self.skipped = 0          # unreadable items met by the latest pass of batches()
        self.first_skip = ""
        self._checked = False

    # construction ------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, files: Sequence[Union[str, os.PathLike]], *, root: Optional[str] = None,
                   what: str = "candidate images", workers: Optional[int] = None) -> "ImagePool":
        """A pool of image files. ``root``: the folder they were listed from (their fingerprint then uses
        paths relative to it, so a moved or remounted tree keeps its cache). ``ValueError`` for a missing file."""
        paths = [os.fspath(f) for f in files]
        h = hashlib.sha256(b"files\n")
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                raise ValueError(f"{what}: no such file: {p}") from None
            name = os.path.relpath(p, root) if root is not None else os.path.abspath(p)
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        src = root if root is not None else (paths[0] if len(paths) == 1 else f"the list of {len(paths)} files")
        return cls(files=paths, names=paths, fingerprint=h.hexdigest()[:32], source=src, what=what,
                   workers=workers)

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike], *, recursive: bool = True,
                    what: str = "candidate images", workers: Optional[int] = None) -> "ImagePool":
        """Every image file under ``folder`` (sorted). ``ValueError`` for a missing folder or one without
        images."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"{what}: no such folder: {folder}")
        files = list_image_files(folder, recursive=recursive)
        if not files:
            raise ValueError(f"{what}: no image files under {folder}")
        return cls.from_files(files, root=folder, what=what, workers=workers)

    @classmethod
    def from_dataset(cls, dataset: Any, *, fingerprint: Optional[str] = None, what: str = "candidate images",
                     workers: Optional[int] = None) -> "ImagePool":
        """A map-style dataset of images (``len(dataset)`` and ``dataset[i]``). ``fingerprint``: a string that
        changes whenever its images do (the cache key); without one, a dataset with ``samples`` (torchvision's
        ``ImageFolder``) is fingerprinted by those files and its transform's ``repr``, any other is not cached."""
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ValueError(f"{what}: a dataset must be map-style (len(ds) and ds[i]), "
                             f"got {type(dataset).__name__}")
        n = len(dataset)
        kind = type(dataset).__name__
        samples = getattr(dataset, "samples", None)
        if fingerprint is None and isinstance(samples, (list, tuple)) and len(samples) == n:
            try:
                paths = [os.fspath(s[0] if isinstance(s, (tuple, list)) else s) for s in samples]
                files = cls.from_files(paths, root=getattr(dataset, "root", None), what=what)
                fingerprint = hashlib.sha256(f"{kind}|{files.fingerprint}|{getattr(dataset, 'transform', None)!r}"
                                             .encode()).hexdigest()[:32]
            except (TypeError, ValueError):
                fingerprint = None
        elif fingerprint is not None:
            fingerprint = hashlib.sha256(f"dataset|{kind}|{n}|{fingerprint}".encode()).hexdigest()[:32]
        names = [f"{kind}[{i}]" for i in range(n)]
        if isinstance(samples, (list, tuple)) and len(samples) == n:
            names = [str(s[0]) if isinstance(s, (tuple, list)) else str(s) for s in samples]
        return cls(dataset=dataset, names=names, fingerprint=fingerprint, source=f"the {kind} dataset", what=what,
                   workers=workers)

    @classmethod
    def from_imageset(cls, images: ImageSet, what: str = "candidate images") -> "ImagePool":
        """An in-memory :class:`ImageSet` as a pool (cached by the images' content hashes, as before)."""
        return cls(imageset=images, names=images.names, fingerprint=None, source="the given images", what=what)

    # access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    @property
    def in_memory(self) -> bool:
        return self._set is not None

    def cache_parts(self) -> Optional[dict]:
        """What identifies the pool in a cache key, or ``None`` when it cannot be identified (no caching)."""
        if self._set is not None:
            return {"images": self._set.hashes}
        return None if self.fingerprint is None else {"pool": self.fingerprint}

    def identity(self) -> Optional[str]:
        """One string for the pool: its fingerprint, or an in-memory set's content digest."""
        return self._set.digest() if self._set is not None else self.fingerprint

    def _read(self, i: int) -> torch.Tensor:
        """Image ``i``; ``_Skip`` when it cannot be read, ``ValueError`` for a dataset item that is no image."""
        if self._set is not None:
            return self._set.images[i]
        if self._files is not None:
            try:
                return load_image(self._files[i])
            except Exception as exc:  # noqa: BLE001 - load_image raises ValueError; an OSError may slip through
                raise _Skip(str(exc)) from exc
        try:
            item = self._dataset[i]
        except Exception as exc:  # noqa: BLE001 - a damaged item: skipped like a damaged file
            raise _Skip(f"{self.source} item {i}: {type(exc).__name__}: {exc}") from exc
        return as_image(item, f"{self.what}: {self.source} item {i}")

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` at full resolution, ``(3, H, W)`` float32 in [0, 1]. ``ValueError`` when unreadable."""
        try:
            return self._read(int(i))
        except _Skip as exc:
            raise ValueError(str(exc)) from None

    def hash(self, i: int, image: Optional[torch.Tensor] = None) -> str:
        """A content hash of image ``i`` (a file's bytes, as :func:`load_images` hashes it; else the pixels)."""
        if self._set is not None:
            return self._set.hashes[i]
        if self._files is not None:
            with open(self._files[i], "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()[:16]
        return tensor_hash(image if image is not None else self.load(i))

    def subset(self, idx: Sequence[int]) -> ImageSet:
        """Images ``idx`` read into an :class:`ImageSet` (names and content hashes as :func:`load_images`
        gives)."""
        imgs = [self.load(i) for i in idx]
        return ImageSet(imgs, [self.names[i] for i in idx], [self.hash(i, im) for i, im in zip(idx, imgs)])

    def check(self) -> None:
        """Fail before any work when no image of the pool can be read (naming the folder or file), or the
        dataset's first readable item is not an image (naming its index). Reads up to the first good item."""
        if self._checked:
            return
        if len(self) == 0:
            raise ValueError(f"{self.what}: no images in {self.source}")
        first = ""
        for i in range(len(self)):
            try:
                self._read(i)
            except _Skip as exc:
                first = first or str(exc)
                continue
            self._checked = True
            return
        raise ValueError(f"{self.what}: no usable image among the {len(self)} in {self.source} (first: {first})")

    # streaming ---------------------------------------------------------------------------------

    def batches(self, size: int, resize: Optional[int] = None, batch: int = 8, workers: Optional[int] = None,
                on_item: Optional[Callable[[int], None]] = None, mode: str = "bilinear"
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(indices (B,), images (B, 3, size, size))`` over the whole pool in index order, every batch but the
        last of exactly ``batch`` readable images (as mining an in-memory set batches them). Decoding and
        ``resize_center_crop`` run in ``workers`` DataLoader processes (default: the pool's, else
        :func:`default_workers`; 0 for in-memory and small pools). Unreadable items are skipped and counted
        (:attr:`skipped`; one warning at the end). ``on_item(n)``: called with the items read so far."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if workers is None:
            workers = self.workers
        if workers is None:
            workers = 0 if (self._set is not None or len(self) < _SMALL) else default_workers()
        self.skipped, self.first_skip = 0, ""
        seen = 0
        buf_i: List[int] = []
        buf_x: List[torch.Tensor] = []
        for idx, x, errors in self._chunks(size, resize, batch, workers, mode):
            for err in errors:
                self.skipped += 1
                self.first_skip = self.first_skip or err
            seen += len(idx) + len(errors)
            if len(idx):
                buf_i.extend(idx)
                buf_x.extend(x.unbind(0))
            while len(buf_i) >= batch:
                out_i, out_x = torch.tensor(buf_i[:batch], dtype=torch.long), torch.stack(buf_x[:batch])
                del buf_i[:batch], buf_x[:batch]
                yield out_i, out_x
            if on_item is not None:
                on_item(seen)
        if buf_i:
            yield torch.tensor(buf_i, dtype=torch.long), torch.stack(buf_x)
        if self.skipped:
            warnings.warn(f"{self.what}: skipped {self.skipped} of {len(self)} images that could not be read "
                          f"(unreadable, truncated or past Pillow's decompression-bomb limit; first: "
                          f"{self.first_skip})", UserWarning, stacklevel=3)

    def _chunks(self, size, resize, batch, workers, mode="bilinear"):
        ds = _Preprocessed(self, size, resize, mode)
        if workers <= 0:
            for s in range(0, len(self), batch):
                res = _collate([ds[i] for i in range(s, min(len(self), s + batch))])
                _raise_fatal(res)
                yield res[:3]
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=int(workers), collate_fn=_collate,
                            prefetch_factor=2, persistent_workers=False)
        for res in loader:
            _raise_fatal(res)
            yield res[:3]


class _Preprocessed:
    """``pool[i]`` read and resized for mining: ``(i, image or None, why not, fatal error or None)``."""

    def __init__(self, pool: ImagePool, size: int, resize: Optional[int], mode: str = "bilinear") -> None:
        self.pool, self.size, self.resize, self.mode = pool, size, resize, mode

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int):
        try:
            img = self.pool._read(i)
            return i, resize_center_crop(img, self.size, self.resize, self.mode), "", None
        except _Skip as exc:
            return i, None, str(exc), None
        except ValueError as exc:  # a dataset item that is no image: stop, naming it
            return i, None, "", str(exc)


def _collate(items):
    good = [(i, x) for i, x, _, _ in items if x is not None]
    errors = [e for _, x, e, f in items if x is None and not f]
    fatal = next((f for _, _, _, f in items if f), None)
    idx = [i for i, _ in good]
    x = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return idx, x, errors, fatal


def _raise_fatal(res) -> None:
    if res[3]:
        raise ValueError(res[3])


PoolLike = Union[ImagePool, ImageSet, str, os.PathLike, Sequence[str], Any]


def as_pool(source: PoolLike, what: str = "candidate images", workers: Optional[int] = None) -> ImagePool:
    """An :class:`ImagePool` from a pool, an :class:`ImageSet`, a folder, a list of files or a dataset."""
    if isinstance(source, ImagePool):
        return source
    if isinstance(source, ImageSet):
        return ImagePool.from_imageset(source, what=what)
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if os.path.isdir(p):
            return ImagePool.from_folder(p, what=what, workers=workers)
        return ImagePool.from_files([p], what=what, workers=workers)
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        if not source:
            raise ValueError(f"{what}: an empty list of files")
        return ImagePool.from_files(source, what=what, workers=workers)
    return ImagePool.from_dataset(source, what=what, workers=workers)
