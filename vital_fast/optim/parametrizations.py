"""How an image is parametrized: pixels, a 1/f-scaled Fourier spectrum, or MACO's phase.

A :class:`Parametrization` makes one slot's parameters (:meth:`~Parametrization.init`), renders a
batch of them into images (:meth:`~Parametrization.render`), keeps them valid after a step
(:meth:`~Parametrization.project`), and carries them to the next stage's resolution
(:meth:`~Parametrization.resize`). The engine (:mod:`vital_fast.optim.engine`) does the rest, so
any method can run on any parametrization: ``visualize(..., param="fourier")``.

``pixel``
    The image itself in the model's normalized space (VITAL's, actmax's and DeepInversion's):
    ``randn · init_std`` at the first stage's size, clamped to the valid pixel range after each
    step, upsampled bilinearly between stages (the optimizer restarts at each stage).
``fourier``
    Lucid's (Olah et al. 2017): an ``rfft2`` spectrum scaled by ``1 / f^decay_power``, the inverse
    transform (orthonormal, divided by 4), decorrelated colour (the square root of ImageNet's
    colour correlation) and a sigmoid to [0, 1]; init ``N(0, init_std²)``. The parameters live at
    the final size; a smaller stage sees the image downsampled (antialiased).
``maco``
    MACO (Fel et al. 2023): a fixed magnitude spectrum (the mean ``|rfft2|`` of the target's own
    reference images in decorrelated colour, centre crop plus random resized crops) and an
    optimized phase; the image is ``sigmoid(recorrelate(standardize(irfft2(magnitude ·
    e^{i·standardize(phase)}))))``. Needs reference images.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from vital_fast.references.images import ImageSet, random_resized_crops, resize_center_crop

__all__ = ["PARAMETRIZATIONS", "Fourier", "Maco", "Parametrization", "Pixel", "get_parametrization",
           "register_parametrization"]

# The square root of ImageNet's color correlation (Lucid), normalized by its largest column norm:
# rgb = C · z for a decorrelated image z.
_COLOR_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SVD_SQRT / _COLOR_SVD_SQRT.norm(dim=0).max()


def recorrelate(z: torch.Tensor) -> torch.Tensor:
    """Decorrelated colour ``(B, 3, H, W)`` to RGB."""
    return torch.einsum("ck,bkhw->bchw", _COLOR.to(z.device, z.dtype), z)


def decorrelate(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` to decorrelated colour (the inverse of :func:`recorrelate`)."""
    inv = torch.linalg.inv(_COLOR.double()).float()
    return torch.einsum("ck,bkhw->bchw", inv.to(x.device, x.dtype), x)


def fft_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    """Lucid's 1/f^decay scaling of an rfft2 spectrum ``(h, w // 2 + 1)``."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power


def maco_magnitude(refs: ImageSet, size: int, loaded, crops: int, n_refs: int, gen: torch.Generator) -> torch.Tensor:
    """Mean |rfft2| ``(3, size, size // 2 + 1)`` of reference crops in decorrelated color space."""
    imgs = refs.images[:max(1, n_refs)]
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    per_image = -(-crops // max(1, len(imgs))) if crops > 0 else 0
    xs = []
    for img in imgs:
        xs.append(resize_center_crop(img, size, resize, loaded.interpolation)[None])
        if per_image > 1:
            xs.append(random_resized_crops(img, size, per_image - 1, gen))
    z = decorrelate(torch.cat(xs) - 0.5)
    return torch.fft.rfft2(z, norm="ortho").abs().mean(0)


class Parametrization:
    """One small interface: parameters per slot, rendered per batch.

    Attributes
    ----------
    name : str
    space : {"normalized", "unit"}
        What :meth:`render` gives: the model's normalized space or RGB in [0, 1].
    per_stage : bool
        True: the parameters live at each stage's size and :meth:`resize` carries them over (the
        optimizer restarts and the learning-rate schedule runs per stage); False: they live at
        the final size and one optimizer runs over all stages.
    needs_references : bool
        :meth:`init` uses the target's reference images.
    lr : float or None
        The learning rate this parametrization is usually optimized with, used when a method runs
        on a parametrization other than its own (None: the method's).
    """

    name = "custom"
    space = "normalized"
    per_stage = True
    needs_references = False
    lr: Optional[float] = None

    def init(self, gen: torch.Generator, size: int, final: int, loaded, slot) -> Dict[str, torch.Tensor]:
        """One slot's parameters (key ``"p"``, optimized, shape ``(1, ...)``) and fixed buffers
        (other keys), on the CPU; ``size`` is the first stage's side, ``final`` the last's."""
        raise NotImplementedError

    def render(self, p: torch.Tensor, buffers: Dict[str, torch.Tensor], loaded) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` of a batch of parameters (``buffers`` stacked alike)."""
        raise NotImplementedError

    def project(self, p: torch.Tensor, loaded) -> None:
        """Keep parameters valid after a step (in place, no grad)."""

    def project_many(self, ps: List[torch.Tensor], loaded) -> None:
        """:meth:`project` of every slot's parameters of a step (the engine's call); override it with
        multi-tensor ops where :meth:`project` does something, so that a step's ops do not grow with the batch."""
        if type(self).project is not Parametrization.project:
            for p in ps:
                self.project(p, loaded)

    def resize(self, p: torch.Tensor, size: int, loaded) -> torch.Tensor:
        """A slot's parameters at a new stage's side."""
        return p

    def to_unit(self, img: torch.Tensor, loaded) -> torch.Tensor:
        """A rendered image as RGB in [0, 1]."""
        return loaded.denormalize(img) if self.space == "normalized" else img

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name}


def _bounds(loaded, dev, dtype=torch.float32):
    lo = torch.tensor([(0 - m) / s for m, s in zip(loaded.mean, loaded.std)], device=dev, dtype=dtype)
    hi = torch.tensor([(1 - m) / s for m, s in zip(loaded.mean, loaded.std)], device=dev, dtype=dtype)
    return lo.view(1, 3, 1, 1), hi.view(1, 3, 1, 1)


class Pixel(Parametrization):
    """The image in the model's normalized space, clamped to the valid pixel range."""

    name = "pixel"

    def __init__(self, init_std: float = 1.0) -> None:
        self.init_std = float(init_std)
        self._bounds: Dict[Any, Any] = {}

    def bounds(self, loaded, dev):
        key = (tuple(float(v) for v in loaded.mean), tuple(float(v) for v in loaded.std), str(dev))
        if key not in self._bounds:
            self._bounds[key] = _bounds(loaded, dev)
        return self._bounds[key]

    def init(self, gen, size, final, loaded, slot):
        return {"p": torch.randn(3, size, size, generator=gen)[None] * self.init_std}

    def render(self, p, buffers, loaded):
        return p

    def project(self, p, loaded):
        lo, hi = self.bounds(loaded, p.device)
        p.copy_(torch.max(torch.min(p, hi), lo))

    def project_many(self, ps, loaded):
        if ps:
            lo, hi = self.bounds(loaded, ps[0].device)
            torch._foreach_minimum_(ps, [hi] * len(ps))
            torch._foreach_maximum_(ps, [lo] * len(ps))

    def resize(self, p, size, loaded):
        if p.shape[-1] == size:
            return p
        return F.interpolate(p.detach(), size=(size, size), mode="bilinear", align_corners=False)

    def describe(self):
        return {"name": self.name, "init_std": self.init_std}


class Fourier(Parametrization):
    """Lucid's 1/f-scaled spectrum with decorrelated colour and a sigmoid."""

    name = "fourier"
    space = "unit"
    per_stage = False
    lr = 0.05

    def __init__(self, decay_power: float = 1.0, init_std: float = 0.01) -> None:
        self.decay_power = float(decay_power)
        self.init_std = float(init_std)
        self._scale: Dict[Any, torch.Tensor] = {}

    def init(self, gen, size, final, loaded, slot):
        return {"p": torch.randn(3, final, final // 2 + 1, 2, generator=gen)[None] * self.init_std}

    def render(self, p, buffers, loaded):
        n = p.shape[-3]
        key = (n, str(p.device))
        if key not in self._scale:
            self._scale[key] = fft_scale(n, n, self.decay_power).to(p.device)
        spec = torch.view_as_complex(p) * self._scale[key]
        img = torch.fft.irfft2(spec, s=(n, n), norm="ortho") / 4.0
        return torch.sigmoid(recorrelate(img))

    def describe(self):
        return {"name": self.name, "decay_power": self.decay_power, "init_std": self.init_std}


class Maco(Parametrization):
    """MACO's optimized phase over a magnitude spectrum taken from the target's references."""

    name = "maco"
    space = "unit"
    per_stage = False
    needs_references = True
    lr = 1.0

    def __init__(self, ref_crops: int = 16, n_refs: int = 8) -> None:
        self.ref_crops = int(ref_crops)
        self.n_refs = int(n_refs)

    def init(self, gen, size, final, loaded, slot):
        mgen = torch.Generator().manual_seed(int(gen.initial_seed()) ^ 0x5EED)
        mag = maco_magnitude(slot.refset, final, loaded, self.ref_crops, self.n_refs, mgen)[None]
        return {"p": torch.randn(3, final, final // 2 + 1, generator=gen)[None], "magnitude": mag}

    def render(self, p, buffers, loaded):
        n = p.shape[-2]
        mag = buffers["magnitude"]
        ph = (p - p.mean(dim=(1, 2, 3), keepdim=True)) / (p.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        spec = torch.complex(mag * torch.cos(ph), mag * torch.sin(ph))
        img = torch.fft.irfft2(spec, s=(n, n), norm="ortho")
        img = (img - img.mean(dim=(1, 2, 3), keepdim=True)) / (img.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return torch.sigmoid(recorrelate(img))

    def describe(self):
        return {"name": self.name, "ref_crops": self.ref_crops, "n_refs": self.n_refs}


PARAMETRIZATIONS: Dict[str, Callable[..., Parametrization]] = {"pixel": Pixel, "fourier": Fourier, "maco": Maco}


def register_parametrization(name: str, factory: Callable[..., Parametrization]) -> None:
    """Make ``factory(**options)`` available as ``param=name`` (CLI ``--param NAME``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a parametrization name must be a non-empty string, got {name!r}")
    PARAMETRIZATIONS[name] = factory


def get_parametrization(param: Any, **options: Any) -> Parametrization:
    """A :class:`Parametrization` from a name (``pixel``, ``fourier``, ``maco``, or a registered
    one) and its options, or the instance itself.

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones) or option.
    """
    if isinstance(param, Parametrization):
        return param
    if param not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {param!r}; valid: {', '.join(sorted(PARAMETRIZATIONS))}")
    try:
        return PARAMETRIZATIONS[param](**options)
    except TypeError as exc:
        raise ValueError(f"parametrization {param!r}: {exc}") from None
