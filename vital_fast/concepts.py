"""Concept vectors from data: a TCAV-style linear probe on one layer's features.

:func:`train_concept` reads two image folders (``positive``: images of the concept; ``negative``: images
without it), takes each image's features at ``layer`` pooled to one vector (mean over spatial positions of a
``(B, C, H, W)`` output, mean over the tokens of a ``(B, N, C)`` one), splits each side deterministically into
training and held-out images, and fits an L2-regularized logistic regression (balanced classes, standardized
features, full-batch L-BFGS in float64: deterministic). The standardization is folded back, so the resulting
direction ``w`` (C,) and bias ``b`` act on the raw features: ``score = w . a + b`` is positive for the concept.
As the pooling is a mean, the pooled score is the mean of the per-position (per-token) scores ``w . a[:, y, x] + b``,
which is what a direction target (:mod:`vital_fast.optim.directions`) maximizes.

:meth:`ConceptProbe.save` writes the direction with :func:`~vital_fast.optim.directions.save_directions`
(one row, its bias, the held-out accuracy and where it came from), to be visualized with
``vital-fast visualize --target direction:LAYER:FILE.pt:0``.

Bad input is a ``ValueError`` in one line naming the problem: a missing folder, a folder without a readable
image, an unknown layer (with the closest names), too few images to train and measure (how many were found,
how many are needed). Unreadable images are skipped (the pool warns once).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch

from vital_fast.models import FeatureTaps, resolve_layer
from vital_fast.models.tokens import patches_layer
from vital_fast.optim.directions import save_directions
from vital_fast.references.pool import ImagePool

MIN_PER_SIDE = 4        # readable images per side, at the least
MIN_HELD_OUT = 2        # held-out images per side, at the least
MIN_TRAIN = 2           # training images per side, at the least
BATCH = 16              # images per forward pass

FolderLike = Union[str, "os.PathLike[str]", ImagePool]


@dataclass
class ConceptProbe:
    """A trained probe. ``direction`` (C,) float32 and ``bias`` act on the layer's raw features
    (``score = direction . a + bias``, positive for the concept); ``accuracy`` on the held-out images,
    ``train_accuracy`` on the training ones."""

    direction: torch.Tensor
    bias: float
    accuracy: float
    n_train: int
    n_test: int
    train_accuracy: float
    layer: str
    model: str = ""
    fingerprint: str = ""
    positive: str = ""
    negative: str = ""
    n_positive: int = 0     # readable images on each side (training and held-out together)
    n_negative: int = 0
    holdout: float = 0.25
    seed: int = 0
    size: int = 0
    l2: float = 0.0
    tokens: Union[str, int] = "mean"  # the features probed on a token layer: "mean", "cls" or one token's index

    @property
    def channels(self) -> int:
        return int(self.direction.numel())

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``w . a + b`` of pooled features ``(B, C)`` (or one ``(C,)``): positive means the concept."""
        f = torch.as_tensor(features)
        return f.to(torch.float64) @ self.direction.to(f.device, torch.float64) + self.bias

    def save(self, path: Union[str, "os.PathLike[str]"], *, force: bool = True) -> str:
        """Write the direction (one row) and its bias and metadata to ``path`` (``.pt``), atomically.
        ``force=False``: ``ValueError`` when ``path`` exists (nothing written). Returns the path."""
        p = os.fspath(path)
        _check_out(p, force)
        return save_directions(
            p, self.direction[None], torch.tensor([self.bias]), accuracy=float(self.accuracy), layer=self.layer,
            model=self.model, fingerprint=self.fingerprint, n_train=int(self.n_train), n_test=int(self.n_test),
            positive=self.positive, negative=self.negative, kind="probe", train_accuracy=float(self.train_accuracy),
            n_positive=int(self.n_positive), n_negative=int(self.n_negative), holdout=float(self.holdout),
            seed=int(self.seed), size=int(self.size), l2=float(self.l2), tokens=str(self.tokens),
            **({} if token_index(self.tokens) is None else {"token": token_index(self.tokens)}))


def _check_out(path: str, force: bool) -> None:
    """Where a probe may be written: not a folder, not a .safetensors name, not an existing file without force."""
    if not path:
        raise ValueError("--out: give the file to write (e.g. concept.pt)")
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder; give the file to write (e.g. {os.path.join(path, 'concept.pt')})")
    if path.lower().endswith(".safetensors"):
        raise ValueError(f"--out {path}: concept vectors are written as a .pt file (torch.save), not .safetensors")
    if os.path.lexists(path) and not force:
        raise ValueError(f"--out {path} exists; pass --force to replace it")


def check_out(path: Union[str, "os.PathLike[str]"], force: bool = False) -> None:
    """``ValueError`` in one line when ``path`` cannot take a probe (a folder, ``.safetensors``, or an existing
    file without ``force``); writes nothing."""
    _check_out(os.fspath(path), force)


def split_counts(n: int, holdout: float) -> Tuple[int, int]:
    """``(train, held out)`` images of a side of ``n`` images at fraction ``holdout`` (held out rounded half up)."""
    n_test = int(math.floor(n * holdout + 0.5))
    return n - n_test, n_test


def images_needed(holdout: float) -> int:
    """The fewest images per side that give at least :data:`MIN_HELD_OUT` held-out and :data:`MIN_TRAIN`
    training images (and :data:`MIN_PER_SIDE` in all) at fraction ``holdout``."""
    n = MIN_PER_SIDE
    while True:
        tr, te = split_counts(n, holdout)
        if te >= MIN_HELD_OUT and tr >= MIN_TRAIN:
            return n
        n += 1


def _pool(source: FolderLike, what: str) -> Tuple[ImagePool, str]:
    if isinstance(source, ImagePool):
        return source, str(source.source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{what}: expected a folder of images, got {type(source).__name__}")
    folder = os.fspath(source)
    if not os.path.exists(folder):
        raise ValueError(f"{what}: no such folder: {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"{what}: {folder} is not a folder")
    return ImagePool.from_folder(folder, what=what), folder


def check_tokens(tokens: Union[str, int]) -> Union[str, int]:
    """``"mean"`` (every token or position), ``"patches"`` (the patch tokens: the prefix left out), ``"cls"``
    (token 0) or a token index; ValueError otherwise."""
    if isinstance(tokens, str) and tokens.strip().isdigit():
        tokens = int(tokens)
    if tokens in ("mean", "patches", "cls") or (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0):
        return tokens
    raise ValueError(f"--tokens must be mean, patches, cls or a token index >= 0, got {tokens!r}")


def token_index(tokens: Union[str, int]) -> Optional[int]:
    """The one token ``tokens`` reads (0 for ``cls``), or None for a mean."""
    return None if tokens in ("mean", "patches") else (0 if tokens == "cls" else int(tokens))


def pooled_features(loaded: Any, layer: str, pool: ImagePool, *, size: Optional[int] = None,
                    workers: Optional[int] = None, batch: int = BATCH, tokens: Union[str, int] = "mean") -> torch.Tensor:
    """One vector per readable image of ``pool``: ``layer``'s features averaged over positions (or tokens), or, on
    a token layer ``(B, N, C)``, one token (``tokens="cls"``: token 0, or an index); ``(N, C)`` float64 on the
    CPU, in the pool's order (unreadable images skipped)."""
    tokens = check_tokens(tokens)
    one = token_index(tokens)
    if tokens == "patches":
        if loaded.channel_dim_of(layer) != -1:
            raise ValueError(f"--tokens patches: layer '{layer}' is not a token layer (B, N, C)")
        layer = patches_layer(loaded, layer)  # the patch tokens alone: their mean leaves the prefix out
    size = int(size or loaded.input_size)
    resize = int(round(size * loaded.resize_size / loaded.input_size))
    cd = loaded.channel_dim_of(layer)
    device = loaded.device
    taps = FeatureTaps(loaded.model, [layer], detach=True, stop_after=True)
    out = []
    with torch.no_grad():
        for _, x in pool.batches(size, resize, batch, workers, mode=loaded.interpolation):
            a = taps.run(loaded.normalize(x.to(device)))[layer]
            if a.dim() < 2:
                raise ValueError(f"layer '{layer}' gives outputs of shape {tuple(a.shape)}; a probe needs "
                                 f"features (B, C, ...) or tokens (B, N, C)")
            if one is not None:
                if cd != -1 or a.dim() != 3:
                    raise ValueError(f"--tokens {tokens}: layer '{layer}' gives {tuple(a.shape)}, not tokens (B, N, C); "
                                     "one token is for token layers (the mean is for every layer)")
                if one >= a.shape[1]:
                    raise ValueError(f"--tokens {tokens}: layer '{layer}' has {a.shape[1]} tokens (0-{a.shape[1] - 1})")
                out.append(a[:, one].to(torch.float64).cpu())
                continue
            a = a.movedim(cd, -1)
            out.append(a.reshape(a.shape[0], -1, a.shape[-1]).to(torch.float64).mean(1).cpu())
    if not out:
        return torch.empty(0, 0, dtype=torch.float64)
    return torch.cat(out)


def _split(n: int, holdout: float, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    _, n_test = split_counts(n, holdout)
    perm = torch.randperm(n, generator=gen)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, max_iter: int = 500) -> Tuple[torch.Tensor, float]:
    """Balanced, L2-regularized logistic regression on features ``x`` (N, C) and labels ``y`` (N,) in {0, 1}:
    standardized with the mean and std of ``x``, fitted by full-batch L-BFGS in float64, then folded back so the
    returned ``(w (C,) float64, b)`` act on the raw ``x``: ``score = x @ w + b``. ``ValueError`` when no
    feature varies."""
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    live = sd > 1e-9 * max(float(sd.max()) if sd.numel() else 0.0, 1e-300)
    if not bool(live.any()):
        raise ValueError("the layer's pooled features are the same for every training image; no direction can "
                         "be learned (a dead layer, or identical images?)")
    sd = torch.where(live, sd, torch.ones_like(sd))
    z = torch.where(live, (x - mu) / sd, torch.zeros_like(x))
    sign = 2.0 * y - 1.0
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    weight = torch.where(y > 0.5, 0.5 / n_pos, 0.5 / n_neg)
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v, c], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = sign * (z @ v + c)
        loss = (weight * torch.nn.functional.softplus(-margin)).sum() + 0.5 * l2 * (v * v).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    v = torch.where(live, v.detach(), torch.zeros_like(v.detach()))
    w = v / sd
    b = float(c.detach()) - float(w @ mu)
    return w, b


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: float) -> float:
    pred = (x @ w + b) > 0
    return float((pred == (y > 0.5)).double().mean())


def train_concept(loaded: Any, layer: str, positive: FolderLike, negative: FolderLike, *, holdout: float = 0.25,
                  seed: int = 0, size: Optional[int] = None, workers: Optional[int] = None,
                  l2: float = 1e-2, tokens: Union[str, int] = "mean") -> ConceptProbe:
    """Train a linear probe for the concept that ``positive``'s images show and ``negative``'s do not.

    Parameters
    ----------
    loaded : LoadedModel
        The network (:func:`vital_fast.models.load_model`).
    layer : str
        The layer whose features are probed (see ``vital-fast layers``).
    positive, negative : str or ImagePool
        Folders (every image file under each) or pools of images.
    holdout : float
        Fraction of each side held out to measure the accuracy (default 0.25; rounded half up).
    seed : int
        Seeds the split of each side (the fit itself is deterministic).
    size : int, optional
        Image side fed to the model (default: the model's input size).
    workers : int, optional
        Decoding processes (default: the pool's rule; none for small folders).
    l2 : float
        Strength of the L2 penalty on the standardized weights (default 0.01).
    tokens : "mean", "patches", "cls" or int
        On a token layer ``(B, N, C)``: the mean over every token (default), over the patch tokens (the CLS,
        distillation and register tokens left out: the layer ``LAYER.patches``), the CLS token (0) or one token's
        index. The file records the choice (``tokens``, and ``token`` for one token): its direction target is read
        the same way (``direction:LAYER.patches:FILE``, ``direction:LAYER:FILE@T,0``).

    Returns
    -------
    ConceptProbe
    """
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"--layer: give a layer name, got {layer!r}")
    if not (isinstance(holdout, (int, float)) and 0.0 < float(holdout) < 1.0):
        raise ValueError(f"--holdout must be a fraction between 0 and 1 (exclusive), got {holdout!r}")
    if size is not None and int(size) < 16:
        raise ValueError(f"--size must be at least 16 pixels, got {size}")
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    holdout = float(holdout)
    tokens = check_tokens(tokens)
    resolve_layer(loaded.model, layer)
    pos_pool, pos_src = _pool(positive, "positive images")
    neg_pool, neg_src = _pool(negative, "negative images")
    if (not isinstance(positive, ImagePool) and not isinstance(negative, ImagePool)
            and os.path.realpath(pos_src) == os.path.realpath(neg_src)):
        raise ValueError(f"the positive and negative images are the same folder ({pos_src}); give images without "
                         f"the concept as negatives")
    need = images_needed(holdout)
    for pool in (pos_pool, neg_pool):
        pool.check()
        if len(pool) < need:
            raise ValueError(f"{pool.what}: {len(pool)} image file(s) under {pool.source}; a probe needs at least "
                             f"{need} per side (at --holdout {holdout:g}: {MIN_HELD_OUT} held out, "
                             f"{MIN_TRAIN} to train)")
    feats = []
    for pool in (pos_pool, neg_pool):
        f = pooled_features(loaded, layer, pool, size=size, workers=workers, tokens=tokens)
        if f.shape[0] < need:
            raise ValueError(f"{pool.what}: {f.shape[0]} readable image(s) of {len(pool)} under {pool.source}; a "
                             f"probe needs at least {need} per side (at --holdout {holdout:g}: {MIN_HELD_OUT} held "
                             f"out, {MIN_TRAIN} to train)")
        feats.append(f)
    fp, fn = feats
    gen = torch.Generator().manual_seed(int(seed))
    tr_p, te_p = _split(fp.shape[0], holdout, gen)
    tr_n, te_n = _split(fn.shape[0], holdout, gen)
    x_tr = torch.cat([fp[tr_p], fn[tr_n]])
    y_tr = torch.cat([torch.ones(len(tr_p)), torch.zeros(len(tr_n))]).double()
    x_te = torch.cat([fp[te_p], fn[te_n]])
    y_te = torch.cat([torch.ones(len(te_p)), torch.zeros(len(te_n))]).double()
    w, b = fit_logistic(x_tr, y_tr, l2=float(l2))
    if not bool(torch.isfinite(w).all()) or not math.isfinite(b) or not bool((w != 0).any()):
        raise ValueError(f"layer '{layer}': the probe did not converge to a usable direction (features with "
                         f"NaN/Inf, or no signal)")
    direction = w.float()
    bias = float(torch.tensor(b, dtype=torch.float32))
    w64 = direction.double()  # measure what is saved
    return ConceptProbe(
        direction=direction.contiguous(), bias=bias, accuracy=_accuracy(x_te, y_te, w64, bias),
        n_train=int(x_tr.shape[0]), n_test=int(x_te.shape[0]), train_accuracy=_accuracy(x_tr, y_tr, w64, bias),
        layer=layer, model=str(getattr(loaded, "name", "")), fingerprint=str(getattr(loaded, "fingerprint", "")),
        positive=pos_src, negative=neg_src, n_positive=int(fp.shape[0]), n_negative=int(fn.shape[0]),
        holdout=holdout, seed=int(seed), size=int(size or loaded.input_size), l2=float(l2), tokens=tokens)
