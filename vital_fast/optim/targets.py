"""Targets: what a visualization shows: a class logit, one channel of a layer, a direction in a layer's
channel space (:mod:`vital_fast.optim.directions`), or one channel at one location (a spatial neuron).

Channel, direction and neuron targets are *unit* targets: their activation map at their layer is the
projection of the layer's features on a vector (:meth:`Target.unit_vector`; one-hot for a channel),
restricted to one location for a neuron. Their references are mined by that map and their relevance
starts from ``A * vector`` (and the location's mask).

Each kind is a class (:class:`ClassTarget`, :class:`ChannelTarget`, :class:`DirectionTarget`,
:class:`NeuronTarget`) that ``Target(kind, ...)`` builds, registered in :data:`TARGET_KINDS`
(:func:`register_target_kind` adds one); what differs by kind is asked of the target, never tested by its kind."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch

from vital_fast.models.facts import check_unit_target, layer_table
from vital_fast.models.heads import head_layer
from vital_fast.models.identity import OUTPUT_LAYER, is_embedding_model
from vital_fast.models.text import is_text_spec, text_embedding, text_key
from vital_fast.models.tokens import PATCHES, patches_layer, prefix_tokens
from vital_fast.optim.directions import Direction, load_directions

FORMS = ("'class:285', 'channel:LAYER:17', 'direction:LAYER:FILE[:ROW][@Y,X]', 'neuron:LAYER:C:Y:X', "
         "'head:BLOCK:H[:T]' (attention heads), 'text:PROMPT' (CLIP-like models)")

# kind -> its class (ClassTarget, ChannelTarget, DirectionTarget, NeuronTarget); register_target_kind adds one
TARGET_KINDS: Dict[str, type] = {}


def register_target_kind(cls: type) -> type:
    """Register a :class:`Target` subclass under its ``KIND`` (``Target(kind, ...)`` then builds it, and
    :func:`parse_target` reads its ``KIND:...`` text through its ``parse``). Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Target)) or not isinstance(getattr(cls, "KIND", None), str):
        raise ValueError(f"register_target_kind: {cls!r} is not a Target subclass with a KIND")
    TARGET_KINDS[cls.KIND] = cls
    return cls


@dataclass(frozen=True)
class Target:
    """One unit to visualize; ``Target(kind, ...)`` builds the class of its kind (:data:`TARGET_KINDS`).

    ``Target("class", 285)`` is the class neuron 285; ``Target("channel", 17, "layer3")`` is
    channel 17 of the output of module ``layer3``; ``Target.of_direction("layer3", vector)`` a direction
    (:func:`direction_target`); ``Target("neuron", 17, "layer3", loc=(5, 9))`` channel 17 at row 5,
    column 9 of ``layer3``'s grid (for a token layer ``(B, N, C)``: token 5, column 0). ``key`` is the
    canonical text form (``class:285``, ``channel:layer3:17``, ``direction:layer3:FILE:ROW``,
    ``neuron:layer3:17:5:9``) that :func:`parse_target` reads back.

    What differs by kind is the kind's to say, so that the engine, the sweep and the command line ask the target:
    its key, label and record; :attr:`is_unit` (a unit of a layer, whose references are mined by its activation,
    or a class, whose references are its photographs); :attr:`whole_channel`; :meth:`unit_vector`,
    :meth:`unit_at` and :meth:`unit_identity` (where its activation and relevance start); :meth:`check` (does it
    fit a model).
    """

    kind: str
    index: int
    layer: Optional[str] = None
    direction: Optional[Direction] = None
    loc: Optional[Tuple[int, int]] = None
    # a location on a token layer: (prefix tokens, side of the patch grid at the model's input size), so that a
    # patch token moves with the grid across sizes and a prefix token (CLS) stays (set with the model:
    # resolve_model_targets); not part of the key
    tokens: Optional[Tuple[int, int]] = dataclasses.field(default=None, compare=False, hash=False)

    KIND: ClassVar[str] = ""
    #: a unit of a layer (channel, direction, neuron: references mined by its activation map), not a class
    is_unit: ClassVar[bool] = False
    takes_direction: ClassVar[bool] = False

    def __new__(cls, kind: Any = None, *args: Any, **kwargs: Any) -> "Target":
        if cls is Target:
            if kind not in TARGET_KINDS:
                raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")
            cls = TARGET_KINDS[kind]
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.kind != self.KIND:
            raise ValueError(f"a {type(self).__name__} has kind {self.KIND!r}, got {self.kind!r}")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"target index must be a non-negative int, got {self.index!r}")
        if (self.direction is not None) != self.takes_direction:
            raise ValueError("a direction target needs its direction, and only it takes one")
        self._check_fields()

    def _check_fields(self) -> None:
        if not self.layer:
            raise ValueError(f"a {self.kind} target needs a layer name: {self.kind}:LAYER:...")
        if self.loc is not None:
            raise ValueError("only neuron and direction targets take a location")

    def _check_loc(self) -> None:
        if (not isinstance(self.loc, tuple) or len(self.loc) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.loc)):
            raise ValueError(f"a {self.kind} target's location (Y, X) is two non-negative ints, got {self.loc!r}")

    @classmethod
    def parse(cls, spec: str) -> "Target":
        """The target of the text ``spec`` (``KIND:...``); ValueError naming the forms."""
        raise ValueError(f"bad target {spec!r}; valid forms: {FORMS}")

    @property
    def key(self) -> str:
        raise NotImplementedError

    @property
    def whole_channel(self) -> Optional[int]:
        """The channel index when the unit is one whole channel of its layer (a channel target); None otherwise."""
        return None

    def unit_vector(self, channels: int) -> torch.Tensor:
        """The unit's weights over the layer's ``channels`` (float32): one-hot for a channel or a neuron, the
        direction's vector for a direction. ``ValueError`` when they do not fit the layer."""
        if self.index >= channels:
            raise ValueError(f"layer {self.layer!r} has {channels} channels (0-{channels - 1}); got channel "
                             f"{self.index}")
        v = torch.zeros(channels)
        v[self.index] = 1.0
        return v

    def unit_at(self, size: Optional[int] = None, native: Optional[int] = None) -> Union[int, "Target"]:
        """What activation, mining and relevance take for this unit on an image of ``size`` px: the channel index of
        a whole channel, else the target (its location on the grid at ``size``, :meth:`at_size`)."""
        if self.whole_channel is not None:
            return self.whole_channel
        return self if size is None or native is None else self.at_size(size, native)

    def unit_identity(self) -> tuple:
        """Equal for targets that are the same unit (they share a mined row)."""
        return (self.kind, self.index, self.loc)

    def check(self, loaded, shapes: Dict[str, tuple]) -> None:
        """Raise ValueError, naming the target, when it does not fit ``loaded`` (``shapes``: the output shape of
        each layer, batch left out): an unknown layer, an index out of range, a location off the grid."""
        check_unit_target(loaded, self, shapes)

    def at_size(self, size: int, native: int) -> "Target":
        """This target with a neuron's location moved from its layer's grid at ``native`` px (the model's input
        size, where locations are given) to the grid at ``size`` px (the grid scales with the image); other
        targets as they are. (The key changes with the location: keep the original's key.)"""
        if self.loc is None or size == native:
            return self
        if self.tokens is not None:  # a token: a prefix token stays, a patch token moves with its grid cell
            prefix, side = self.tokens
            t = self.loc[0]
            if t < prefix:
                return self
            row, col = divmod(t - prefix, side)
            new_side = max(1, size * side // native)
            row, col = (min(int((v + 0.5) * size / native), new_side - 1) for v in (row, col))
            return dataclasses.replace(self, loc=(prefix + row * new_side + col, 0))
        return dataclasses.replace(self, loc=tuple(int((v + 0.5) * size / native) for v in self.loc))

    @property
    def unit_bias(self) -> float:
        return 0.0

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
        rest = layer + (self.direction.source if self.direction is not None else "")  # a file path is in the key
        if all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in rest) and layer not in (".", ".."):
            return safe
        return f"{safe}-{hashlib.sha256(self.key.encode()).hexdigest()[:8]}"

    def label(self, class_names: Optional[Sequence[str]] = None) -> str:
        """What results and the gallery call the target: ``285 Egyptian cat`` with the model's class names
        (:attr:`vital_fast.models.LoadedModel.class_names`), ``class:285`` without; ``layer3 channel 17``."""
        return f"{self.layer} channel {self.index}"

    def record(self) -> dict:
        """What a result record says of the unit beyond its key: a direction's source, row, digest, bias and
        a probe's held-out accuracy (when its file has one); a neuron's location."""
        return {}

    def canonical(self) -> "Target":
        """The channel a one-hot direction with no bias names (it *is* that channel: same references, relevance,
        seed and image); any other target itself."""
        return self

    def seed(self, base_seed: int) -> int:
        """A seed derived from the run's seed and the target: one target regenerates on its own (a one-hot
        direction takes the seed of the channel it names, :meth:`canonical`)."""
        h = hashlib.sha256(f"{int(base_seed)}|{self.canonical().key}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    def __str__(self) -> str:
        return self.key


def _ints(spec: str, parts: Sequence[str]) -> List[int]:
    try:
        return [int(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"bad target {spec!r}: {exc}; valid forms: {FORMS}") from None


@register_target_kind
class ClassTarget(Target):
    """A class logit: ``class:N``. Its references are photographs of the class; its relevance starts at the
    logits."""

    KIND = "class"

    def _check_fields(self) -> None:
        if self.layer is not None:
            raise ValueError("a class target takes no layer")
        if self.loc is not None:
            raise ValueError("only neuron and direction targets take a location")

    @classmethod
    def parse(cls, spec: str) -> "Target":
        parts = spec.strip().split(":")
        if len(parts) != 2:
            return super().parse(spec)
        return cls("class", *_ints(spec, parts[1:]))

    @property
    def key(self) -> str:
        return f"class:{self.index}"

    def unit_vector(self, channels: int) -> torch.Tensor:
        raise ValueError(f"{self.key}: a class target has no unit vector")

    def unit_at(self, size: Optional[int] = None, native: Optional[int] = None) -> Union[int, "Target"]:
        return self.index

    def check(self, loaded, shapes: Dict[str, tuple]) -> None:
        n = loaded.num_classes
        if n is None and is_embedding_model(loaded.model):
            raise ValueError(f"target {self.key}: {loaded.name} has no classifier (its output is an embedding); "
                             "its units are channel:, neuron:, direction:, head: and text: targets")
        if n is not None and self.index >= n:
            raise ValueError(f"target {self.key}: the model has {n} classes (0-{n - 1})")

    def label(self, class_names: Optional[Sequence[str]] = None) -> str:
        if class_names and self.index < len(class_names):
            return f"{self.index} {class_names[self.index]}"
        return self.key


@register_target_kind
class ChannelTarget(Target):
    """One channel of a layer: ``channel:LAYER:C`` (its mean activation over the grid or the tokens)."""

    KIND = "channel"
    is_unit = True

    @classmethod
    def parse(cls, spec: str) -> "Target":
        parts = spec.strip().split(":")
        if len(parts) != 3:
            return super().parse(spec)
        return cls("channel", *_ints(spec, parts[2:]), parts[1])

    @property
    def key(self) -> str:
        return f"channel:{self.layer}:{self.index}"

    @property
    def whole_channel(self) -> Optional[int]:
        return self.index


@register_target_kind
class NeuronTarget(Target):
    """One channel at one location of its layer's grid: ``neuron:LAYER:C:Y:X`` (a token layer: ``Y`` the token,
    ``X`` 0)."""

    KIND = "neuron"
    is_unit = True

    def _check_fields(self) -> None:
        if not self.layer:
            raise ValueError(f"a {self.kind} target needs a layer name: {self.kind}:LAYER:...")
        self._check_loc()

    @classmethod
    def parse(cls, spec: str) -> "Target":
        parts = spec.strip().split(":")
        if len(parts) != 5:
            return super().parse(spec)
        c, y, x = _ints(spec, parts[2:])
        return cls("neuron", c, parts[1], loc=(y, x))

    @property
    def key(self) -> str:
        return f"neuron:{self.layer}:{self.index}:{self.loc[0]}:{self.loc[1]}"

    def label(self, class_names: Optional[Sequence[str]] = None) -> str:
        return f"{self.layer} channel {self.index} at ({self.loc[0]}, {self.loc[1]})"

    def record(self) -> dict:
        return {"loc": list(self.loc)}


@register_target_kind
class DirectionTarget(Target):
    """A direction in a layer's channel space (:class:`Direction`), over the grid or at one location:
    ``direction:LAYER:FILE[:ROW][@Y,X]``; attention heads (``head:``) and text prompts (``text:``) are directions
    too, read with the model (:func:`resolve_model_targets`)."""

    KIND = "direction"
    is_unit = True

    takes_direction = True

    def _check_fields(self) -> None:
        if not self.layer:
            raise ValueError(f"a {self.kind} target needs a layer name: {self.kind}:LAYER:...")
        if self.loc is not None:
            self._check_loc()

    @classmethod
    def parse(cls, spec: str) -> "Target":
        parts = spec.strip().split(":")
        if not (len(parts) >= 3 and parts[1] and parts[2]):
            return super().parse(spec)
        rest = spec.strip().split(":", 2)[2]
        m = re.fullmatch(r"(.*)@(\d+),(\d+)", rest)
        if m:  # a direction read at one location (a token: Y = its index, X = 0)
            t = cls.parse(f"direction:{parts[1]}:{m.group(1)}")
            return dataclasses.replace(t, loc=(int(m.group(2)), int(m.group(3))))
        path, sep, row = rest.rpartition(":")
        if sep and row.strip().lstrip("-").isdigit():
            dirs, i = load_directions(path), int(row)
        else:
            dirs, i = load_directions(rest), 0
            if len(dirs) != 1:
                raise ValueError(f"{rest} holds {len(dirs)} directions: name one, direction:{parts[1]}:{rest}:ROW "
                                 f"(0-{len(dirs) - 1})")
        token = dirs.meta.get("token")  # a probe of one token (vital_fast.concepts): read there
        loc = (int(token), 0) if isinstance(token, int) and not isinstance(token, bool) and token >= 0 else None
        layer = parts[1]
        if dirs.meta.get("tokens") == PATCHES and not layer.endswith("." + PATCHES):
            layer = f"{layer}.{PATCHES}"  # a probe of the patch tokens: their mean, the prefix left out
        return cls("direction", i, layer, direction=dirs.row(i), loc=loc)

    @property
    def key(self) -> str:
        src = self.direction.source
        if src.startswith(("text:", "head:")):  # read with the model: text:PROMPTS, head:LAYER:H[:T]
            return src + (f":{self.loc[0]}" if self.loc is not None and src.startswith("head:") else "")
        return f"direction:{self.layer}:{src}:{self.index}" + (
            f"@{self.loc[0]},{self.loc[1]}" if self.loc is not None else "")

    def unit_vector(self, channels: int) -> torch.Tensor:
        if self.direction.channels != channels:
            raise ValueError(f"{self.key}: the direction has {self.direction.channels} values but layer "
                             f"{self.layer!r} has {channels} channels")
        return self.direction.vector

    def unit_identity(self) -> tuple:
        return (self.kind, self.direction.digest, self.loc)

    @property
    def unit_bias(self) -> float:
        return self.direction.bias

    def label(self, class_names: Optional[Sequence[str]] = None) -> str:
        if self.direction.source.startswith("text:"):
            return "text " + " | ".join(f'"{p}"' for p in self.direction.source[5:].split("|"))
        if self.direction.source.startswith("head:"):
            _, block, h = self.direction.source.split(":")
            return f"{block} head {h}" + (f" at token {self.loc[0]}" if self.loc is not None else "")
        name = self.direction.source.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{self.layer} direction {name}:{self.index}"

    def record(self) -> dict:
        d = self.direction
        out = {"source": d.source, "row": d.row, "digest": d.digest, "bias": d.bias}
        for k in ("accuracy", "n_test"):
            if isinstance(d.meta.get(k), (int, float)) and not isinstance(d.meta.get(k), bool):
                out["probe_" + k] = d.meta[k]
        return {"direction": out}

    def canonical(self) -> "Target":
        if self.direction.bias == 0.0:
            v = self.direction.vector
            nz = torch.nonzero(v).flatten()
            if nz.numel() == 1 and float(v[nz[0]]) == 1.0:
                if self.loc is not None:
                    return Target("neuron", int(nz[0]), self.layer, loc=self.loc)
                return Target("channel", int(nz[0]), self.layer)
        return self


KINDS = tuple(TARGET_KINDS)
UNIT_KINDS = tuple(k for k, c in TARGET_KINDS.items() if c.is_unit)


def direction_target(layer: str, direction, row: int = 0, bias: float = 0.0, source: Optional[str] = None) -> Target:
    """A direction target: ``direction`` a :class:`Direction`, a ``(C,)`` tensor, an ``(N, C)`` matrix with
    ``row``, or a file (``.pt``/``.safetensors``, see :func:`load_directions`) with ``row``."""
    import os

    if isinstance(direction, Direction):
        return Target("direction", direction.row, layer, direction=direction)
    if isinstance(direction, (str, os.PathLike)):
        return Target("direction", int(row), layer, direction=load_directions(direction).row(int(row)))
    v = torch.as_tensor(direction)
    if v.dim() == 2:
        if not 0 <= int(row) < v.shape[0]:
            raise ValueError(f"direction matrix of {v.shape[0]} rows: row {row} is out of range")
        v = v[int(row)]
    return Target("direction", int(row), layer, direction=Direction.of(v, bias, source, int(row)))


def parse_target(spec: Union[str, Target]) -> Target:
    """Parse a target: ``class:285``, ``channel:LAYER:17`` (LAYER may contain dots, e.g. ``_blocks.10``),
    ``direction:LAYER:FILE[:ROW]`` (row 0 of a one-direction file may be left out) or ``neuron:LAYER:C:Y:X``.

    Raises
    ------
    ValueError
        For anything else, with the valid forms in the message; for a direction, a missing or unreadable
        file, a row out of range, NaN in the direction.
    """
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a target must be a string like 'class:285' or 'channel:LAYER:17', got {spec!r}")
    kind = spec.strip().split(":", 1)[0]
    if kind in ("text", "head"):
        raise ValueError(f"target {spec!r}: a {kind} target is read with the model: pass it to visualize() or the "
                         f"command line with the model (vital_fast.optim.targets.resolve_model_targets)")
    if kind not in TARGET_KINDS:
        raise ValueError(f"bad target {spec!r}; valid forms: {FORMS}")
    return TARGET_KINDS[kind].parse(spec)


def text_target(loaded, spec: str) -> Target:
    """The target of ``text:PROMPT[|PROMPT...]`` on ``loaded`` (a CLIP-like model): a direction on its ``output``
    layer (the image embedding) given by the text tower (:mod:`vital_fast.models.text`); key ``text:PROMPTS``."""
    vector = text_embedding(loaded, spec)
    return Target("direction", 0, OUTPUT_LAYER, direction=Direction.of(vector, 0.0, source=text_key(spec)))


HEAD_FORM = "head:BLOCK:H[:T] (head H of the attention of transformer block BLOCK; T: one token)"


def head_spec(spec: str) -> Tuple[str, int, Optional[int]]:
    """``(block, head, token or None)`` of ``head:BLOCK:H[:T]``; ValueError naming the form."""
    parts = spec.strip().split(":")
    try:
        if parts[0] == "head" and len(parts) in (3, 4) and parts[1]:
            h, tok = int(parts[2]), (int(parts[3]) if len(parts) == 4 else None)
            if h >= 0 and (tok is None or tok >= 0):
                return parts[1], h, tok
    except ValueError:
        pass
    raise ValueError(f"bad target {spec!r}: expected {HEAD_FORM}")


def head_target(loaded, spec: str) -> Target:
    """The target of ``head:BLOCK:H[:T]``: the mean output of attention head ``H`` of transformer block ``BLOCK``
    before the output projection (:func:`vital_fast.models.heads.head_layer`), over every token or at token ``T``;
    a direction on the block's ``heads`` layer, uniform over the head's channels."""
    block, h, tok = head_spec(spec)
    layer, heads, d = head_layer(loaded, block)
    if h >= heads:
        raise ValueError(f"target {spec!r}: the attention of {block!r} has {heads} heads (0-{heads - 1})")
    v = torch.zeros(heads * d)
    v[h * d:(h + 1) * d] = 1.0 / d
    return Target("direction", h, layer, direction=Direction.of(v, 0.0, source=f"head:{block}:{h}"),
                  loc=None if tok is None else (tok, 0))


def resolve_model_targets(loaded, targets: Sequence[Union[str, Target]]) -> List[Target]:
    """``targets`` as :class:`Target` objects, the specs read with the model too (``text:``, :func:`text_target`;
    ``head:``, :func:`head_target`); a unit of a token layer's patch tokens (``LAYER.patches``) gets that layer
    made on the model (:func:`vital_fast.models.tokens.patches_layer`)."""
    out: List[Target] = []
    for t in targets:
        if is_text_spec(t):
            out.append(text_target(loaded, t))
        elif isinstance(t, str) and t.strip().startswith("head:"):
            out.append(head_target(loaded, t))
        else:
            out.append(parse_target(t))
    module = getattr(loaded, "model", loaded)
    names = None
    for t in out:
        if t.layer and t.layer.endswith("." + PATCHES):
            names = names if names is not None else {n for n, _ in module.named_modules()}
            if t.layer not in names:
                patches_layer(loaded, t.layer[: -len(PATCHES) - 1])
                names = None
    return [_with_tokens(loaded, t) for t in out]


def _with_tokens(loaded, t: Target) -> Target:
    """``t`` with its token layout (:attr:`Target.tokens`) when it has a location on a token layer whose tokens
    are a prefix and a square patch grid; as it is otherwise."""
    if t.loc is None or not hasattr(loaded, "channel_dim_of"):
        return t
    try:
        if loaded.channel_dim_of(t.layer) != -1:
            return t
        shape = {d["name"]: d["shape"] for d in layer_table(loaded)}.get(t.layer)
    except ValueError:
        return t  # an unknown layer: check_targets names it
    if not shape or len(shape) != 2:
        return t
    prefix = 0 if t.layer.endswith("." + PATCHES) else prefix_tokens(loaded)
    side = int(round(math.sqrt(max(0, shape[0] - prefix))))
    return dataclasses.replace(t, tokens=(prefix, side)) if side * side == shape[0] - prefix and side else t

