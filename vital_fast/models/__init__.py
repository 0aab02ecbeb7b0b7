"""Models: loading by name, feature taps on named layers, and matched-layer presets per family.

- :func:`load_model` returns a :class:`LoadedModel` (frozen eval-mode network, family, input
  size, mean/std, weights fingerprint). Names: ``"efficientnet-lite0"``, ``"torchvision:resnet50"``,
  a file path, or an ``nn.Module``. Nothing is ever downloaded.
- :class:`FeatureTaps` records the outputs of named layers through forward hooks that a context
  manager removes; :func:`list_layers` lists every layer with its output shape;
  :func:`resolve_layer` finds one by name (with close matches on a typo).
- :func:`default_layers` gives the matched layers and weights of a family (DESIGN.md §5);
  :func:`default_channel_layers` / :func:`layers_before` those for a channel target.
"""

from vital_fast.models.loading import (
    FAMILIES,
    LoadedModel,
    guess_family,
    load_model,
    weights_fingerprint,
)
from vital_fast.models.matched_layers import (
    class_logit_layer,
    default_channel_layers,
    default_layers,
    efficientnet_stage_ends,
    layers_before,
)
from vital_fast.models.taps import FeatureTaps, channel_dim, list_layers, resolve_layer

__all__ = [
    "FAMILIES",
    "FeatureTaps",
    "LoadedModel",
    "channel_dim",
    "class_logit_layer",
    "default_channel_layers",
    "default_layers",
    "efficientnet_stage_ends",
    "guess_family",
    "layers_before",
    "list_layers",
    "load_model",
    "resolve_layer",
    "weights_fingerprint",
]
