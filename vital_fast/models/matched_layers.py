"""Default matched layers per architecture family: where VITAL matches feature distributions.

The layers and weights of the paper's public code (DESIGN.md §5), per family:

============== ===================================================================== ==============
family         layers                                                                 weights
============== ===================================================================== ==============
resnet         ``conv1`` (stem conv, before BN), ``layer1`` .. ``layer4``              1 each
densenet       ``features.conv0``, ``features.denseblock1`` .. ``denseblock4``        100 on the last
convnext       ``features.0`` (stem), ``features.2.1`` / ``4.1`` / ``6.1`` (the        10 on the stem
               downsampling convs after stages 1-3), ``features.7`` (last stage);
               timm: ``stem``, ``stages.{1,2,3}.downsample.1``, ``stages.3``
efficientnet   ``_conv_stem`` and the stage ends ``_blocks.{i}`` (lite0: 0, 2, 4, 7,   1 each
_lite          10, 14, 15)
efficientnet   torchvision's and timm's EfficientNet / MobileNetV3: the stem and each    1 each
               stage (``features.0`` .. ``features.7``; ``conv_stem``, ``blocks.{i}``)
vit            ``conv_proj`` (patch embedding, ``(B, C, H, W)``) and four encoder      1 each (0.1 on
               layers (vit_b: 0, 4, 8, 11; vit_l: 2, 9, 20, 23) as tokens              the last for
               ``(B, N, C)``, CLS included                                             vit_l_32)
generic        up to 5 stage ends: the last complete layer at each spatial size         1 each
               (where the resolution changes); a network whose resolution never
               changes: up to 5 top-level layers with spatial outputs
============== ===================================================================== ==============

For ConvNeXt the paper's code taps the downsampling convolutions (``features.2.1``, ...) rather
than the stage outputs ``features.1/3/5``; those are kept here for faithfulness.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, TypeVar

from torch import nn

from vital_fast.models import taps
from vital_fast.models.facts import names_before, traced_layers
from vital_fast.models.hf import hf_default_layers
from vital_fast.models.identity import FAMILIES, guess_family, hf_family, is_hf_model

__all__ = [
    "stage_ends",
    "class_logit_layer",
    "default_channel_layers",
    "default_layers",
    "efficientnet_stage_ends",
    "layers_before",
]

Layers = List[Tuple[str, float]]
T = TypeVar("T", str, Tuple[str, float])

_GENERIC_MAX = 5


def _resolve_input(loaded_or_model: Any, family: Optional[str]) -> Tuple[nn.Module, str, str, int]:
    module, loaded = taps._unwrap(loaded_or_model)
    if family is None:
        family = loaded.family if loaded is not None else guess_family(module)
    if family not in FAMILIES:
        raise ValueError(f"default_layers: 'family' must be one of {', '.join(FAMILIES)}, got {family!r}")
    name = loaded.name if loaded is not None else type(module).__name__
    size = loaded.input_size if loaded is not None else 224
    return module, family, name, size


def efficientnet_stage_ends(model: Any) -> List[int]:
    """Indices into ``model._blocks`` of the last block of each stage.

    A stage is a run of blocks built from one block-args entry; its first block holds the
    scaled ``num_repeat``. Lite0 gives ``[0, 2, 4, 7, 10, 14, 15]``, lite1 and lite2 (deeper)
    ``[0, 3, 6, 10, 14, 19, 20]``.
    """
    module, _ = taps._unwrap(model)
    blocks = getattr(module, "_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("efficientnet_stage_ends: the model has no '_blocks' (not an EfficientNet)")
    ends: List[int] = []
    i = 0
    while i < len(blocks):
        args = getattr(blocks[i], "_block_args", None)
        repeat = int(getattr(args, "num_repeat", 1) or 1)
        i = min(i + repeat, len(blocks))
        ends.append(i - 1)
    return ends


def _vit_layers(module: nn.Module, name: str) -> Layers:
    names = {n for n, _ in module.named_modules()}
    if "encoder.layers" in names:  # torchvision
        prefix, stem = "encoder.layers.encoder_layer_", "conv_proj"
    elif "blocks" in names:  # timm
        prefix, stem = "blocks.", "patch_embed.proj"
    elif "transformer.resblocks" in names:  # OpenCLIP's image tower
        prefix, stem = "transformer.resblocks.", "conv1"
    else:
        raise ValueError(
            "default_layers: a 'vit' model needs encoder layers named 'encoder.layers.encoder_layer_<k>' "
            "(torchvision), 'blocks.<k>' (timm) or 'transformer.resblocks.<k>' (OpenCLIP); pass family='generic' or choose the layers yourself"
        )
    depth = sum(1 for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())
    if depth == 12:
        picks = [0, 4, 8, 11]  # the paper's vit_b choice
    elif depth == 24:
        picks = [2, 9, 20, 23]  # the paper's vit_l choice
    else:
        picks = sorted({round(f * (depth - 1)) for f in (0.0, 1 / 3, 2 / 3, 1.0)})
    weights = [1.0] * len(picks)
    if "vit_l_32" in name:
        weights[-1] = 0.1
    out: Layers = [(stem, 1.0)] if stem in names else []
    return out + [(f"{prefix}{k}", w) for k, w in zip(picks, weights)]


def stage_ends(module: nn.Module, input_size: int) -> List[str]:
    """The layer that ends each resolution of a CNN, in execution order: for each run of layers whose
    ``(B, C, H, W)`` outputs share one spatial size, the latest of those that share the least of their
    dotted path with the first layer at the next size, i.e. the last *whole* unit before the change
    (``layer1``, not ``layer2.0.relu``; ``features.1``, not ``features.2.0.block.0``)."""
    infos = [d for d in traced_layers(module, input_size) if len(d["shape"]) == 3 and d["shape"][1] * d["shape"][2] > 1]

    def shared(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a.split("."), b.split(".")):
            if x != y:
                break
            n += 1
        return n

    ends: List[str] = []
    run: List[str] = []
    for i, d in enumerate(infos):
        if run and tuple(d["shape"][1:]) != tuple(infos[i - 1]["shape"][1:]):
            least = min(shared(n, d["name"]) for n in run)
            ends.append([n for n in run if shared(n, d["name"]) == least][-1])
            run = []
        run.append(d["name"])
    if run:
        ends.append(run[-1])
    return list(dict.fromkeys(ends))


def _spread(names: List[str], k: int) -> List[str]:
    if len(names) <= k:
        return names
    n = len(names) - 1
    return [names[i] for i in sorted({round(j * n / (k - 1)) for j in range(k)})]


def _efficientnet_layers(module: nn.Module) -> Layers:
    names = {n for n, _ in module.named_modules()}
    blocks = getattr(module, "blocks", None)
    if "conv_stem" in names and isinstance(blocks, nn.Sequential):  # timm
        return [("conv_stem", 1.0)] + [(f"blocks.{i}", 1.0) for i in range(len(blocks))]
    feats = getattr(module, "features", None)
    if isinstance(feats, nn.Sequential) and len(feats) >= 3:  # torchvision: stem, stages, head conv
        return [(f"features.{i}", 1.0) for i in range(len(feats) - 1)]
    raise ValueError("default_layers: an 'efficientnet' model needs 'conv_stem' and 'blocks' (timm) or 'features' "
                     "(torchvision); pass family='generic' or choose the layers yourself")


def _generic_layers(module: nn.Module, input_size: int) -> Layers:
    ends = stage_ends(module, input_size)
    if len(ends) >= 3:
        return [(n, 1.0) for n in _spread(ends, _GENERIC_MAX)]
    infos = traced_layers(module, input_size)
    spatial = {
        d["name"] for d in infos if len(d["shape"]) == 3 and d["shape"][1] * d["shape"][2] > 1
    }
    order = [d["name"] for d in infos]

    def children(prefix: str) -> List[str]:
        depth = prefix.count(".") + 1 if prefix else 0
        return [
            n for n in order
            if n in spatial and n.count(".") == depth and (not prefix or n.startswith(prefix + "."))
        ]

    chosen = children("")
    # A model like (features, pool, classifier) or (stem, trunk, head) has too few spatial
    # children: replace the one with the most spatial children by those children.
    while len(chosen) < 3:
        inner = max(chosen, key=lambda n: len(children(n)), default=None)
        if inner is None or len(children(inner)) < 2:
            break
        i = chosen.index(inner)
        chosen = chosen[:i] + children(inner) + chosen[i + 1 :]
    if not chosen:
        raise ValueError(
            "default_layers: found no layer with a (B, C, H, W) output with H * W > 1; "
            "choose the matched layers yourself"
        )
    if len(chosen) > _GENERIC_MAX:
        n = len(chosen) - 1
        idx = sorted({round(k * n / (_GENERIC_MAX - 1)) for k in range(_GENERIC_MAX)})
        chosen = [chosen[i] for i in idx]
    return [(n, 1.0) for n in chosen]


def default_layers(loaded_or_model: Any, family: Optional[str] = None) -> Layers:
    """The matched layers and their weights for class targets.

    Parameters
    ----------
    loaded_or_model : LoadedModel or nn.Module
        The network. A ``LoadedModel`` gives the family and, for ``"generic"``, the probe size.
    family : str, optional
        Override the family (one of ``resnet``, ``densenet``, ``convnext``,
        ``efficientnet_lite``, ``efficientnet``, ``vit``, ``generic``).

    Returns
    -------
    list of (str, float)
        ``(layer name, weight)`` in execution order; every name resolves in the model.

    Raises
    ------
    ValueError
        If the family's layers do not exist in the model (the message suggests
        ``family='generic'``).

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import default_layers
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    >>> default_layers(net)
    [('0', 1.0), ('1', 1.0)]
    """
    module, family, name, size = _resolve_input(loaded_or_model, family)
    if is_hf_model(module) and family == hf_family(module) and family != "generic":
        layers = hf_default_layers(module)  # transformers' own layer names (models/hf.py)
    elif family == "resnet":
        layers = [("conv1", 1.0)] + [(f"layer{k}", 1.0) for k in range(1, 5)]
    elif family == "densenet":
        names = {n for n, _ in module.named_modules()}
        blocks = sorted(
            (n for n in names if n.startswith("features.denseblock") and n[19:].isdigit()),
            key=lambda n: int(n[19:]),
        )
        layers = [("features.conv0", 1.0)] + [(b, 1.0) for b in blocks]
        if blocks:
            layers[-1] = (blocks[-1], 100.0)
    elif family == "convnext":
        names = {n for n, _ in module.named_modules()}
        if "stem" in names and "stages.3" in names:  # timm
            down = [f"stages.{k}.downsample.1" if f"stages.{k}.downsample.1" in names else f"stages.{k}.downsample"
                    for k in (1, 2, 3)]
            layers = [("stem", 10.0)] + [(d, 1.0) for d in down] + [("stages.3", 1.0)]
        else:
            layers = [("features.0", 10.0), ("features.2.1", 1.0), ("features.4.1", 1.0),
                      ("features.6.1", 1.0), ("features.7", 1.0)]
    elif family == "efficientnet":
        layers = _efficientnet_layers(module)
    elif family == "efficientnet_lite":
        layers = [("_conv_stem", 1.0)] + [(f"_blocks.{i}", 1.0) for i in efficientnet_stage_ends(module)]
    elif family == "vit":
        layers = _vit_layers(module, name)
    else:
        return _generic_layers(module, size)
    for layer, _ in layers:
        try:
            taps.resolve_layer(module, layer)
        except ValueError as err:
            raise ValueError(
                f"default_layers: the {family} preset does not fit this model ({err}); "
                "pass family='generic' or choose the layers yourself"
            ) from None
    return layers


def class_logit_layer(loaded_or_model: Any) -> str:
    """Dotted name of the module whose output is the class logits: the last ``nn.Linear`` registered
    in the model (with ``num_classes`` outputs when that is known).

    Class targets start their LRP relevance there when ``Settings.class_relevance`` is on.

    Raises
    ------
    ValueError
        If the model has no such ``nn.Linear``.
    """
    module = loaded_or_model.model if hasattr(loaded_or_model, "model") else loaded_or_model
    n_cls = getattr(loaded_or_model, "num_classes", None)
    last = None
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and (n_cls is None or mod.out_features == n_cls):
            last = name
    if last is None:
        want = f" with {n_cls} outputs" if n_cls else ""
        raise ValueError(f"class_logit_layer: the model has no nn.Linear{want} to start class relevance from; "
                         "turn class_relevance off for this model")
    return last


def layers_before(layers: Sequence[T], target_layer: str, model: Any = None) -> List[T]:
    """The entries of ``layers`` that run strictly before ``target_layer``.

    A layer counts as before the target if its output comes earlier in the model's execution and
    it does not contain the target (``layer3`` is not before ``layer3.1.conv2``).

    Parameters
    ----------
    layers : sequence of str or (str, float)
        Candidate layers in execution order (e.g. :func:`default_layers`).
    target_layer : str
        The layer of the channel target.
    model : nn.Module or LoadedModel, optional
        Decides the order: the traced execution order the optimizer uses
        (:func:`vital_fast.models.facts.names_before`, one dry forward pass, cached per model; a
        ``LoadedModel`` is traced at its input size, a module at 224). Every name must exist in the
        model; a layer without a tensor output is never before the target. Without it the given
        list is the order, and the target must be one of ``layers`` or lie inside one of them.

    Returns
    -------
    list
        The kept entries, same form and order as given.

    Example
    -------
    >>> from vital_fast.models import layers_before
    >>> layers_before([("conv1", 0.1), ("layer1", 1.0), ("layer2", 1.0)], "layer2.0.conv1")
    [('conv1', 0.1), ('layer1', 1.0)]
    """
    def name_of(item: Any) -> str:
        return item if isinstance(item, str) else item[0]

    names = [name_of(item) for item in layers]
    if model is not None:
        module, _ = taps._unwrap(model)
        for n in names:
            taps.resolve_layer(module, n)  # raises with close matches
        kept = set(names_before(model, target_layer, names))
        return [item for item, n in zip(layers, names) if n in kept]
    for i, n in enumerate(names):
        if target_layer == n or target_layer.startswith(n + "."):
            return list(layers[:i])
    raise ValueError(
        f"layers_before: '{target_layer}' is not one of the layers {names} nor inside one of them; "
        "pass model=... so the model's execution order decides"
    )


def default_channel_layers(
    loaded_or_model: Any, target_layer: str, family: Optional[str] = None
) -> Layers:
    """Matched layers for a channel target at ``target_layer``: the default layers before it.

    Weights follow the paper's channel mode for ResNets (0.1 on the stem conv, 1 elsewhere) and
    are 1 for the other families.

    Raises
    ------
    ValueError
        If ``target_layer`` is unknown, or no default layer runs before it.

    Example
    -------
    >>> import torch
    >>> from vital_fast.models import default_channel_layers
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    >>> default_channel_layers(net, "2", family="generic")
    [('0', 1.0), ('1', 1.0)]
    """
    _, fam, _, _ = _resolve_input(loaded_or_model, family)
    base = default_layers(loaded_or_model, family=fam)
    kept = layers_before(base, target_layer, model=loaded_or_model)
    if not kept:
        raise ValueError(
            f"default_channel_layers: no default layer of this model runs before '{target_layer}' "
            f"(defaults: {[n for n, _ in base]}); choose the layers yourself"
        )
    if fam == "resnet":
        return [(n, 0.1 if n == "conv1" else 1.0) for n, _ in kept]
    return [(n, 1.0) for n, _ in kept]
