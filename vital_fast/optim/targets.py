"""Targets: what a visualization shows (a class logit or one channel of a layer)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union


@dataclass(frozen=True)
class Target:
    """One unit to visualize.

    ``Target("class", 285)`` is the class neuron 285; ``Target("channel", 17, "layer3")`` is
    channel 17 of the output of module ``layer3``. ``key`` is the canonical text form
    (``class:285``, ``channel:layer3:17``) that :func:`parse_target` reads back.
    """

    kind: str
    index: int
    layer: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in ("class", "channel"):
            raise ValueError(f"target kind must be 'class' or 'channel', got {self.kind!r}")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"target index must be a non-negative int, got {self.index!r}")
        if self.kind == "channel" and not self.layer:
            raise ValueError("a channel target needs a layer name: channel:LAYER:INDEX")
        if self.kind == "class" and self.layer is not None:
            raise ValueError("a class target takes no layer")

    @property
    def key(self) -> str:
        return f"class:{self.index}" if self.kind == "class" else f"channel:{self.layer}:{self.index}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the key, distinct for distinct keys.

        Keys whose layer name is made of letters, digits and ``-_.`` map one to one
        (``channel:_blocks.10:3`` -> ``channel___blocks.10__3``); any other layer name (``a/b``,
        ``a b``) has its other characters replaced and a hash of the key appended, so that
        ``a/b`` and ``a_b`` never share a folder.
        """
        safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_"
                       for ch in self.key.replace(":", "__"))
        layer = self.layer or ""
        if all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in layer) and layer not in (".", ".."):
            return safe
        return f"{safe}-{hashlib.sha256(self.key.encode()).hexdigest()[:8]}"

    def label(self, class_names: Optional[Sequence[str]] = None) -> str:
        """What results and the gallery call the target: ``285 Egyptian cat`` with the model's class names
        (:attr:`vital_fast.models.LoadedModel.class_names`), ``class:285`` without; ``layer3 channel 17``."""
        if self.kind == "class":
            if class_names and self.index < len(class_names):
                return f"{self.index} {class_names[self.index]}"
            return self.key
        return f"{self.layer} channel {self.index}"

    def seed(self, base_seed: int) -> int:
        """A seed derived from the run's seed and the target: one target regenerates on its own."""
        h = hashlib.sha256(f"{int(base_seed)}|{self.key}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    def __str__(self) -> str:
        return self.key


def parse_target(spec: Union[str, Target]) -> Target:
    """Parse ``class:285`` or ``channel:LAYER:17`` (LAYER may contain dots, e.g. ``_blocks.10``).

    Raises
    ------
    ValueError
        For anything else, with the valid forms in the message.
    """
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a target must be a string like 'class:285' or 'channel:LAYER:17', got {spec!r}")
    parts = spec.strip().split(":")
    try:
        if parts[0] == "class" and len(parts) == 2:
            return Target("class", int(parts[1]))
        if parts[0] == "channel" and len(parts) == 3:
            return Target("channel", int(parts[2]), parts[1])
    except ValueError as exc:
        raise ValueError(f"bad target {spec!r}: {exc}; valid forms: 'class:285', 'channel:LAYER:17'") from None
    raise ValueError(f"bad target {spec!r}; valid forms: 'class:285', 'channel:LAYER:17'")
