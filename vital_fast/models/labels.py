"""Class names from the model's own metadata, never guessed from the number of classes.

A :class:`~vital_fast.models.LoadedModel` carries ``class_names``: the names of its outputs, or
``None`` when nothing about the model says what they are. They come from, in order:

- the caller: ``load_model(..., labels=...)`` (a list of names, or a text file with one name a line,
  or a JSON list); the CLI's ``--labels FILE``;
- the weights' metadata: torchvision's ``Weights.meta["categories"]`` (also for random weights of the
  same architecture, whose outputs keep that label space), ImageNet's names for EfficientNet-Lite
  (trained on ImageNet-1k), the architecture's names for a weights file loaded into it when the file
  keeps its number of outputs.

A model without names shows ``class N``: a 1,000-output model of the user's is not given ImageNet's
names because it has 1,000 outputs.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple, Union

LabelsLike = Union[Sequence[str], str, "os.PathLike[str]"]


def imagenet_labels() -> List[str]:
    """The 1,000 ImageNet-1k class names in class-index order (torchvision's metadata, offline)."""
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    except Exception:  # pragma: no cover - torchvision is a dependency
        return [f"class {i}" for i in range(1000)]


def read_labels(path: Union[str, "os.PathLike[str]"]) -> List[str]:
    """Class names from a file: a JSON list (``.json``) or text with one name a line (blank lines at the
    end ignored). ``ValueError`` naming the file when it is missing, empty or not a list of names."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"labels: no such file: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"labels: cannot read {p}: {exc}") from None
    if p.lower().endswith(".json"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"labels: {p} is not valid JSON ({exc})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"labels: {p} must hold a JSON list of class names (strings)")
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if not names:
        raise ValueError(f"labels: {p} holds no class names")
    return list(names)


def check_labels(labels: LabelsLike, num_classes: Optional[int], where: str = "load_model") -> Tuple[str, ...]:
    """``labels`` (names, or a file of them) as a tuple, checked against the model's number of outputs."""
    if isinstance(labels, (str, os.PathLike)):
        names = read_labels(labels)
    else:
        try:
            names = list(labels)
        except TypeError:
            raise ValueError(f"{where}: 'labels' must be a list of class names or a file of them, "
                             f"got {type(labels).__name__}") from None
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: 'labels' must be class names (strings), got {type(bad).__name__} {bad!r}")
        if not names:
            raise ValueError(f"{where}: 'labels' is empty")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{where}: {len(names)} labels for a model with {num_classes} outputs; give one name per "
                         f"output, in output order")
    return tuple(names)


def class_label(names: Optional[Sequence[str]], index: int) -> str:
    """The name of class ``index`` (``"class N"`` without names or past their end)."""
    if names and 0 <= index < len(names):
        return str(names[index])
    return f"class {index}"
