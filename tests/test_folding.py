"""Batch norms folded into their convolutions for a step (Settings.fold_batchnorm, vital_fast.models.folding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vital_fast.models import load_model
from vital_fast.models.folding import BatchNormFold, resolve_fold
from vital_fast.optim import Settings, visualize
from vital_fast.references.cache import DiskCache


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))  # negative scales too
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


class Net(nn.Module):
    """conv-BN (no conv bias), depthwise conv-BN (with bias), and a conv whose output a skip also reads."""

    def __init__(self, skip_reads_conv: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), _bn(6, g), nn.ReLU())
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.dw_bn = _bn(6, g)
        self.proj = nn.Conv2d(6, 6, 1, bias=False)
        self.proj_bn = _bn(6, g)
        self.skip_reads_conv = skip_reads_conv
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        p = self.proj(x)
        y = self.proj_bn(p) + (p if self.skip_reads_conv else x)
        return self.head(y.mean((2, 3)))


def _run(net, x, fold=None, layers=()):
    xi = x.clone().requires_grad_(True)
    if fold is None:
        out = net(xi)
        n = 0
    else:
        with fold.applied(x, layers) as n:
            out = net(xi)
    out.square().sum().backward()  # after the block: the graph keeps the folded weights it saved
    return out.detach(), xi.grad, n


def test_folded_pass_and_its_gradient_equal_the_network_and_it_is_given_back():
    net = Net().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = {n: (p, p.detach().clone()) for n, p in net.named_parameters()}
    out0, g0, _ = _run(net, x)
    fold = BatchNormFold(net)
    for _ in range(2):  # the second call reuses the pairs found by the first
        out1, g1, n = _run(net, x, fold)
        assert n == 3
        torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    assert dict(net.named_parameters()).keys() == params.keys() and net.proj.bias is None
    for name, p in net.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1])
    assert not any("forward" in m.__dict__ for m in net.modules())


def test_a_tap_on_the_convolution_keeps_its_pair_unfolded():
    net = Net().double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    fold = BatchNormFold(net)
    seen = {}
    h = net.proj.register_forward_hook(lambda m, a, out: seen.update(proj=out.detach()))
    try:
        _run(net, x)
        plain = seen["proj"]
        _, _, n = _run(net, x, fold, layers=["proj"])
        assert n == 2  # the tapped conv reads as it is (up to the rounding of the folded layers before it)
        torch.testing.assert_close(seen["proj"], plain, rtol=1e-12, atol=1e-12)
        _, _, n = _run(net, x, fold, layers=["stem"])         # stem holds both its conv and its BN: folded
        assert n == 3 and (seen["proj"] - plain).abs().max() > 0.1
        _, _, n = _run(net, x, fold, layers=["stem.0"])
        assert n == 2
    finally:
        h.remove()


def test_nothing_is_folded_where_the_check_or_the_mode_says_no():
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    net = Net(skip_reads_conv=True).double().eval()  # proj's output is read twice: the check refuses
    out0, g0, _ = _run(net, x)
    out1, g1, n = _run(net, x, BatchNormFold(net))
    assert n == 0 and torch.equal(out1, out0) and torch.equal(g1, g0)
    train = Net().double().train()
    assert BatchNormFold(train)._probe(x) == []
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    assert BatchNormFold(plain)._probe(x.float()) == []


def test_an_error_inside_gives_the_network_back():
    net = Net().eval()
    w, b = net.proj.weight, net.proj.bias
    fold = BatchNormFold(net)
    with pytest.raises(RuntimeError, match="boom"):
        with fold.applied(torch.rand(1, 3, 8, 8)):
            assert net.proj.weight is not w
            raise RuntimeError("boom")
    assert net.proj.weight is w and net.proj.bias is b and not any("forward" in m.__dict__ for m in net.modules())


def test_setting_values():
    assert resolve_fold("auto") and resolve_fold(None) and not resolve_fold("off")
    with pytest.raises(ValueError, match="unknown fold_batchnorm 'yes'; valid: auto, off"):
        resolve_fold("yes")
    with pytest.raises(ValueError, match="fold_batchnorm"):
        Settings(fold_batchnorm="on")
    assert Settings().fold_batchnorm == "auto"


def test_runs_with_and_without_folding_agree():
    torch.manual_seed(0)
    lm = load_model(Net().eval(), input_size=16, resize_size=16, family="generic")
    refs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    tg = ["class:1", "channel:proj_bn:2"]
    out, folded = {}, []
    # the steps run folded (and the check of the first), the references' passes and the finished images' do not;
    # a generic model taps every convolution, so only the stem's pair (a tap holding both) folds
    h = lm.model.stem[1].register_forward_pre_hook(lambda m, a: folded.append("forward" in m.__dict__))
    try:
        for f in ("off", "auto"):
            folded.clear()
            s = Settings(stages=[(1.0, 4)], warmup=1, n_refs=3, quantiles=8, lr=0.05, fold_batchnorm=f,
                         channel_relevance=False)
            out[f] = visualize(lm, tg, {t: refs for t in tg}, settings=s, cache=DiskCache(enabled=False))
            assert folded.count(True) == (5 if f == "auto" else 0) and folded[0] is False
    finally:
        h.remove()
    for a, b in zip(out["off"].images, out["auto"].images):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_a_parametrized_convolution_is_left_alone():
    net = Net().double().eval()
    torch.nn.utils.parametrizations.weight_norm(net.proj)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    out0, g0, _ = _run(net, x)
    out1, g1, n = _run(net, x, BatchNormFold(net))
    assert n == 2
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


def test_a_network_whose_output_cannot_be_checked_is_left_alone():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net().eval()

        def forward(self, x):
            self.net(x)
            return object.__new__(type("Box", (), {}))  # no tensor to compare the folded network by

    net = Opaque().eval()
    assert BatchNormFold(net.net)._probe(torch.rand(1, 3, 8, 8))  # the same pairs are found and pass the check
    assert BatchNormFold(net)._probe(torch.rand(1, 3, 8, 8)) == []
