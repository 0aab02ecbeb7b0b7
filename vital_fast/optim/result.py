"""What an optimization returns, and the progress callback's type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from vital_fast.optim.presets import Settings
from vital_fast.optim.targets import Target
from vital_fast.references.images import ImageSet

__all__ = ["ProgressFn", "VisualizationResult"]


@dataclass(repr=False)
class VisualizationResult:
    """What :func:`visualize` returns: one image per target, and how it was made.

    In a notebook it shows itself (``_repr_html_``: each target's image, its references and its final loss);
    :meth:`show` draws the images with matplotlib; :meth:`save` writes the run folder and its HTML gallery, as
    the command line does.
    """

    targets: List[Target]
    images: torch.Tensor          # (B, 3, H, W) in [0, 1]
    transparency: torch.Tensor    # (B, 1, H, W): accumulated |dL/dx|, per element scaled to [0, 1]
    losses: torch.Tensor          # (B, steps): each target's total loss at every step
    settings: Settings
    seeds: List[int]
    references: List[ImageSet]    # the reference images (or patches) each target used
    layers: List[List[Tuple[str, float]]]  # matched layers and weights per target
    timings: Dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    fingerprint: str = ""
    method: str = "vital"         # the recipe that ran ("vital", a baseline, "vital+fourier", "custom:...")
    param: Dict[str, object] = field(default_factory=dict)  # the parametrization and its options
    precision: str = "float32"    # what the network ran in (Settings.amp resolved on the device)
    loss_scale: Dict[str, float] = field(default_factory=dict)  # float16: final loss scale and skipped steps
    # what the model says of each image (models.predict.annotate): class targets' top-5 predictions, unit
    # targets' activation ratio; written into the run's records and shown in notebooks
    annotations: Dict[str, Dict[str, Any]] = field(default_factory=dict)


    # --- display --------------------------------------------------------------------------------

    def __repr__(self) -> str:
        keys = [t.key for t in self.targets]
        shown = keys if len(keys) <= 6 else keys[:5] + [f"... ({len(keys)} targets)"]
        return (f"VisualizationResult(method={self.method!r}, model={self.model_name!r}, targets={shown}, "
                f"images={tuple(self.images.shape)}, steps={self.losses.shape[1] if self.losses.dim() == 2 else 0}, "
                f"precision={self.precision!r})")

    def _repr_html_(self) -> str:
        """A labelled grid: per target its image, its label, what the model says of it (its top prediction for a
        class target, its activation ratio for a unit), its reference images (up to 8) and its final loss."""
        import html

        cells = []
        for i, t in enumerate(self.targets):
            refs = "".join(f'<img src="{png_data_uri(r, 48)}" width="48" height="48" title="{html.escape(n)}" '
                           f'style="margin:1px">' for r, n in list(zip(self.references[i].images,
                                                                           self.references[i].names))[:8])
            final = float(self.losses[i, -1]) if self.losses.dim() == 2 and self.losses.shape[1] else float("nan")
            said = _said(self.annotations.get(t.key, {}))
            cells.append(
                f'<figure style="display:inline-block;margin:6px;vertical-align:top;text-align:center">'
                f'<img src="{png_data_uri(self.images[i], 192)}" width="192" height="192" alt="{html.escape(t.key)}">'
                f'<figcaption><b>{html.escape(t.key)}</b><br>{said}final loss {final:.4g}<br>{refs}</figcaption></figure>')
        head = (f"<p><b>vital_fast</b> {html.escape(self.method)} on {html.escape(self.model_name or 'a model')}: "
                f"{len(self.targets)} target{'s' if len(self.targets) != 1 else ''}, {self.settings.steps} steps, "
                f"{html.escape(self.precision)}</p>")
        return f'<div class="vital-fast-result">{head}{"".join(cells)}</div>'

    def show(self, columns: int = 4):
        """Draw the images (titled by target) with matplotlib; returns the figure.

        Raises
        ------
        ImportError
            matplotlib is not installed (``pip install matplotlib``, or the ``demo`` extra).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("VisualizationResult.show() needs matplotlib: pip install matplotlib "
                              "(or vital_fast[demo])") from None
        n = len(self.targets)
        cols = max(1, min(columns, n))
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                ax.imshow(self.images[k].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
                ax.set_title(self.targets[k].key, fontsize=9)
        fig.tight_layout()
        return fig

    def save(self, out_dir: str, *, seed: Optional[int] = None, labels: Optional[Dict[str, str]] = None) -> str:
        """Write the run folder (targets, grid, manifest) and its HTML gallery into ``out_dir``, as
        ``vital-fast visualize`` does; returns the gallery's ``index.html``. A folder holding another run is
        refused (:func:`vital_fast.save_result`)."""
        from vital_fast.results import save_run

        return save_run(self, out_dir, seed=seed if seed is not None else (self.seeds[0] if self.seeds else None),
                        labels=labels)


def _said(ann: Dict[str, Any]) -> str:
    """One line of what the model says of an image: its top prediction, or a unit's activation ratio."""
    import html

    preds = ann.get("predictions")
    if preds:
        idx, name, prob = preds[0]
        return f"model: {html.escape(str(name))} ({int(idx)}) {100 * float(prob):.0f} %<br>"
    ratio = ann.get("activation_ratio")
    if isinstance(ratio, (int, float)):
        return f"activation {float(ratio):.2f}x its references<br>"
    return ""


def png_data_uri(img: torch.Tensor, side: int) -> str:
    """``(3, H, W)`` in [0, 1], scaled down to at most ``side`` pixels, as a ``data:image/png;base64`` URI."""
    import base64
    import io

    from PIL import Image

    img = img.detach().float().cpu().clamp(0, 1)
    _, h, w = img.shape
    if max(h, w) > side:
        s = side / max(h, w)
        img = torch.nn.functional.interpolate(img[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                                              mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


ProgressFn = Callable[[int, int, torch.Tensor], None]
