"""Channels-last layout of the network during a run (Settings.channels_last, vital_fast.models.layout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

from vital_fast.models import load_model  # noqa: E402
from vital_fast.models.layout import ChannelsLast, resolve_channels_last  # noqa: E402
from vital_fast.optim import Settings, visualize  # noqa: E402
from vital_fast.references import lrp_rules  # noqa: E402
from vital_fast.references.cache import DiskCache  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model(torchvision.models.resnet18().eval(), input_size=48, resize_size=48, family="resnet")


def test_resolve():
    assert resolve_channels_last("auto", "resnet", "cpu") and resolve_channels_last(None, "convnext", "cpu")
    assert not resolve_channels_last("auto", "generic", "cpu") and not resolve_channels_last("auto", "vit", "cpu")
    assert resolve_channels_last("on", "generic", "cpu") and not resolve_channels_last("off", "resnet", "cpu")
    assert not resolve_channels_last("on", "resnet", "meta")
    with pytest.raises(ValueError, match="unknown channels_last 'yes'; valid: auto, on, off"):
        resolve_channels_last("yes", "resnet", "cpu")
    with pytest.raises(ValueError, match="unknown channels_last"):
        Settings(channels_last="nhwc")
    assert Settings().to_dict()["channels_last"] == "auto"
    assert Settings(channels_last="off").to_dict()["channels_last"] == "off"


def test_channels_last_converts_and_gives_the_tensors_back():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    conv_w = net[0].weight
    before = conv_w.data
    layout = ChannelsLast(net)
    assert net[0].weight is conv_w and conv_w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv_w, before)
    layout.restore()
    assert conv_w.data.data_ptr() == before.data_ptr() and conv_w.is_contiguous()


def test_runs_agree_across_layouts_and_leave_the_model_as_it_was(lm):
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    refs = torch.rand(3, 3, 52, 52, generator=torch.Generator().manual_seed(2))
    tg = ["class:3", "channel:layer3:4"]
    out, seen = {}, []
    # every pass of the auto run, the references' included, sees one layout (so no slot's prototypes
    # depend on whether it came first or refilled a slot)
    hook = lm.model.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    try:
        for cl in ("off", "auto"):
            seen.clear()
            s = Settings(stages=[(1.0, 3)], warmup=1, n_refs=3, quantiles=16, lr=0.1, channels_last=cl)
            out[cl] = visualize(lm, tg, {t: refs for t in tg}, settings=s, cache=DiskCache(enabled=False))
            # seen[0]: the target check's probe of layer shapes, before the engine (values unused); the last two:
            # the annotations of the finished images (a prediction, an activation ratio), in the model's own layout
            # again, once the run gave it back
            run = seen[1:-2]
            assert len(run) > 2 and all(run) == (cl == "auto") and any(seen) == (cl == "auto")
            assert not any(seen[-2:])
    finally:
        hook.remove()
    for a, b in zip(out["off"].images, out["auto"].images):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    assert {n: p.data_ptr() for n, p in lm.model.named_parameters()} == ptrs
    assert all(p.is_contiguous() for p in lm.model.parameters())
    # the z+ rules' clamped copies of the channels-last weights went with them
    assert not any(m in lrp_rules._PARAM_CACHE for m in lm.model.modules())


def test_cli_flag(capsys):
    from vital_fast.cli.main import main

    assert main(["visualize", "--channels-last", "sideways", "--target", "class:1"]) == 2
    assert "argument --channels-last: invalid choice: 'sideways'" in capsys.readouterr().err
