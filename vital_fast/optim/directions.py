"""Directions in a layer's channel space: sparse-autoencoder features, concept vectors, linear probes.

A direction target's unit is the projection of the layer's features on a vector ``d`` (C,), plus an
optional bias: ``u[b, y, x] = sum_c d[c] * A[b, c, y, x] + bias`` (for token layers ``(B, N, C)``: per
token). Its references are the images (or patches) where that projection is largest, and its relevance
starts from ``A * d`` (DESIGN.md §1 with the one-hot channel mask replaced by ``d``), so a one-hot ``d``
is exactly the channel it names.

Files (:func:`load_directions`, :func:`save_directions`): ``.pt`` (``torch.save``, read with
``weights_only=True``) or ``.safetensors``, holding either one tensor, ``(C,)`` or ``(N, C)``, or a
dict with ``directions`` (or a sparse autoencoder's ``W_dec``, ``(N, C)``), optionally ``bias``
(``(N,)`` or a scalar) and, in ``.pt`` files, metadata (``layer``, ``model``, ``accuracy`` of a probe,
...). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch

MATRIX_KEYS = ("directions", "W_dec", "w_dec", "decoder", "weight")
BIAS_KEYS = ("bias", "b")


@dataclass(frozen=True)
class Direction:
    """One direction: ``vector`` (C,) float32 and ``bias``, named by ``source`` (a file, or ``tensor-<digest>``)
    and ``row``; equal directions have equal :attr:`digest` (of the values, not the name)."""

    vector: torch.Tensor = field(compare=False, repr=False)
    bias: float = 0.0
    source: str = "tensor"
    row: int = 0
    digest: str = ""
    meta: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __hash__(self) -> int:
        return hash((self.source, self.row, self.digest, self.bias))

    @property
    def channels(self) -> int:
        return int(self.vector.numel())

    @staticmethod
    def of(vector: Any, bias: float = 0.0, source: Optional[str] = None, row: int = 0,
           meta: Optional[Dict[str, Any]] = None) -> "Direction":
        """A direction from a ``(C,)`` vector (``ValueError`` naming the problem: wrong shape, NaN, all zero)."""
        v = torch.as_tensor(vector).detach().to("cpu", torch.float32).contiguous()
        where = source or "direction"
        if v.dim() != 1 or v.numel() < 1:
            raise ValueError(f"{where}: a direction must be a vector (C,), got shape {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}{'' if source is None else f' row {row}'}: the direction holds NaN or Inf")
        if not bool((v != 0).any()):
            raise ValueError(f"{where}{'' if source is None else f' row {row}'}: the direction is all zeros")
        b = float(bias)
        if b != b or b in (float("inf"), float("-inf")):
            raise ValueError(f"{where}: the bias is not finite ({b})")
        h = hashlib.sha256(v.numpy().tobytes() + f"|{b!r}".encode()).hexdigest()[:16]
        return Direction(v, b, source or f"tensor-{h[:8]}", int(row), h, dict(meta or {}))


@dataclass
class Directions:
    """A matrix of directions read from a file: ``matrix`` (N, C), ``bias`` (N,), ``meta``."""

    matrix: torch.Tensor
    bias: torch.Tensor
    source: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def row(self, i: int) -> Direction:
        n = len(self)
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise ValueError(f"{self.source} holds {n} direction(s) (rows 0-{n - 1}); row {i} is out of range")
        return Direction.of(self.matrix[i], float(self.bias[i]), self.source, i, self.meta)


def _pick(d: Dict[str, Any], keys, what: str, path: str) -> Optional[torch.Tensor]:
    for k in keys:
        if k in d:
            if not isinstance(d[k], torch.Tensor):
                raise ValueError(f"{path}: {what} {k!r} must be a tensor, got {type(d[k]).__name__}")
            return d[k]
    return None


def load_directions(path: Union[str, "os.PathLike[str]"]) -> Directions:
    """The directions in ``path`` (see the module docstring); ``ValueError`` naming the file and the problem:
    missing, unreadable, no tensor, several tensors and none named ``directions``, a bias of the wrong length,
    NaN or Inf."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"direction file not found: {p}")
    meta: Dict[str, Any] = {}
    try:
        if p.lower().endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"{p}: reading .safetensors needs the package 'safetensors' "
                                 f"(pip install safetensors), or save the directions with torch.save") from None
            obj: Any = load_file(p)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except pickle.UnpicklingError:  # torch's own text invites turning the safety off: not repeated here
        raise ValueError(f"{p}: holds pickled Python objects, not just tensors; such files are refused (unpickling "
                         f"can run code). Save the directions as a tensor, or a dict of tensors, with torch.save, or "
                         f"as .safetensors") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line
        raise ValueError(f"{p}: not a torch.save or .safetensors file of directions (reading it failed with "
                         f"{type(exc).__name__})") from None
    bias = None
    if isinstance(obj, torch.Tensor):
        mat = obj
    elif isinstance(obj, dict):
        mat = _pick(obj, MATRIX_KEYS, "directions", p)
        if mat is None:
            tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise ValueError(f"{p}: holds {'no tensor' if not tensors else f'tensors {tensors[:6]}'}; expected one "
                                 f"tensor (C,) or (N, C), or a dict with 'directions' (or 'W_dec') and an optional "
                                 f"'bias'")
            mat = obj[tensors[0]]
        else:
            bias = _pick(obj, BIAS_KEYS, "bias", p)
        meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool)) and not isinstance(v, torch.Tensor)}
    else:
        raise ValueError(f"{p}: holds a {type(obj).__name__}, not a tensor of directions")
    if not mat.is_floating_point():
        raise ValueError(f"{p}: directions must be floating point, got {mat.dtype}")
    mat = mat.detach().float()
    if mat.dim() == 1:
        mat = mat[None]
    if mat.dim() != 2 or min(mat.shape) < 1:
        raise ValueError(f"{p}: directions must be (C,) or (N, C), got shape {tuple(mat.shape)}")
    n = mat.shape[0]
    if bias is None:
        b = torch.zeros(n)
    else:
        b = bias.detach().float().reshape(-1)
        if b.numel() == 1:
            b = b.expand(n).clone()
        if b.numel() != n:
            raise ValueError(f"{p}: a bias of {b.numel()} values for {n} directions")
    bad = (~torch.isfinite(mat)).any(1) | ~torch.isfinite(b)
    if bool(bad.any()):
        raise ValueError(f"{p}: direction row {int(bad.nonzero()[0])} holds NaN or Inf")
    return Directions(mat.contiguous(), b.contiguous(), p, meta)


def save_directions(path: Union[str, "os.PathLike[str]"], matrix: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    **meta: Any) -> str:
    """Write directions ``(N, C)`` (or ``(C,)``), ``bias`` and plain metadata (str, int, float, bool) to a ``.pt``
    file, atomically (a crash leaves the old file or none). Returns the path."""
    p = os.fspath(path)
    m = torch.as_tensor(matrix).detach().float().cpu()
    if m.dim() == 1:
        m = m[None]
    obj: Dict[str, Any] = {"directions": m.contiguous()}
    if bias is not None:
        obj["bias"] = torch.as_tensor(bias).detach().float().cpu().reshape(-1)
    for k, v in meta.items():
        if not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"save_directions: metadata {k!r} must be a str, int, float or bool")
        obj[k] = v
    from vital_fast.files import atomic_torch_save

    atomic_torch_save(obj, p)
    return p
