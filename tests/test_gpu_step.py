"""A step shaped for the GPU, checked on the CPU: no device reads in the steady state, ops that do not grow
with the batch, the loss-read interval that changes no image, and float16 that optimizes."""

from __future__ import annotations

import pytest
import torch

from _util import TinyNet, tiny_refs
from vital_fast.cli.main import main
from vital_fast.counting import StepCounter, steady_state_counts
from vital_fast.optim import Settings, visualize
from vital_fast.optim.presets import get_preset
from vital_fast.optim.precision import LossScale
from vital_fast.references.cache import DiskCache

pytestmark = pytest.mark.filterwarnings("ignore:relevance_maps:UserWarning")


@pytest.fixture(scope="module")
def lm():
    """:class:`TinyNet` with ten classes (eight class targets at once)."""
    from vital_fast.models import load_model

    torch.manual_seed(0)
    net = TinyNet()
    net.fc = torch.nn.Linear(8, 10)
    return load_model(net.eval(), input_size=32, resize_size=32)


def _targets(kind, n):
    return [f"class:{i}" if kind == "class" else f"channel:conv2:{i}" for i in range(n)]


def _counts(lm, kind, B, tmp_path, steps=20, **kw):
    targets = _targets(kind, B)
    refs = {t: tiny_refs() for t in targets}
    cache = DiskCache(str(tmp_path / "cache"))

    def run(n):
        s = get_preset("fast").replace(stages=[(1.0, n)], n_refs=3, ref_crops=2, quantiles=16, **kw)
        visualize(lm, targets, refs, settings=s, progress=False, cache=cache)

    return steady_state_counts(run, steps, [lm.model])


@pytest.mark.parametrize("kind", ["class", "channel"])
def test_steady_state_step_reads_the_device_once_every_ten_steps(lm, kind, tmp_path):
    c2, c8 = (_counts(lm, kind, B, tmp_path) for B in (2, 8))
    assert c2["reads"] <= 0.1 and c8["reads"] <= 0.1, (c2, c8)
    # the device's ops do not grow with the batch (one multi-tensor update); all ops at most 1.25x
    assert c8["device_ops"] == c2["device_ops"], (c2, c8)
    assert c8["ops"] <= 1.25 * c2["ops"], (c2, c8)


def test_channel_relevance_step_reads_nothing_either(lm, tmp_path):
    c = _counts(lm, "channel", 2, tmp_path, steps=10, channel_relevance=True, channel_later_weight=0.0)
    assert c["reads"] <= 0.1, c


def test_relevance_weighted_channel_step_of_a_real_network_reads_nothing(tmp_path):
    """efficientnet-lite0's LRP rules (z+ with its canonizers) in the shared forward: no device read per step (the
    z+ rule's check for negative inputs reads only where a read is free, and not while counting)."""
    from vital_fast.models import load_model

    lite = load_model("efficientnet-lite0")
    targets = ["channel:_blocks.4:0", "channel:_blocks.4:1"]
    refs = {t: tiny_refs() for t in targets}

    def run(n):
        s = get_preset("fast").replace(stages=[(1.0, n)], n_refs=3, ref_crops=0, quantiles=16, channel_relevance=True,
                                          channel_later_weight=0.0)
        visualize(lite, targets, refs, settings=s, size=48, progress=False, cache=DiskCache(str(tmp_path)))

    c = steady_state_counts(run, 10, [lite.model])
    assert c["reads"] <= 0.1, c


def test_counter_sees_a_read_per_step_when_every_step_reads(lm, tmp_path):
    c = _counts(lm, "class", 2, tmp_path, steps=5, loss_every=1)
    assert c["reads"] == 1.0, c


def test_loss_every_changes_no_image_and_keeps_every_loss(lm):
    refs = tiny_refs()
    targets = ["class:1", "class:3", "channel:conv2:2"]
    seen = []
    res = []
    for k in (1, 7):
        s = get_preset("fast").replace(stages=[(0.5, 5), (1.0, 9)], n_refs=3, ref_crops=2, quantiles=16, loss_every=k)
        res.append(visualize(lm, targets, {t: refs for t in targets}, settings=s, seed=2,
                             progress=lambda step, total, losses: seen.append((k, step, losses.shape))))
    a, b = res
    assert torch.equal(a.images, b.images) and torch.equal(a.transparency, b.transparency)
    assert torch.equal(a.losses, b.losses) and a.losses.shape == (3, 14)
    steps7 = [st for k, st, _ in seen if k == 7]
    # progress at each read: every 7 ticks, the stage's end and the end
    assert steps7 == [5, 7, 14] and all(shape == (3,) for _, _, shape in seen)
    assert [st for k, st, _ in seen if k == 1] == list(range(1, 15))


@pytest.mark.parametrize("bad, why", [(0, "must be >= 1, got 0"), (-3, "must be >= 1"), (1.5, "expects int"),
                                      (True, "expects int")])
def test_a_loss_interval_below_one_is_refused(bad, why):
    with pytest.raises(ValueError, match=f"setting loss_every {why}"):
        Settings(loss_every=bad)


def test_cli_loss_every_below_one_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "imgs" / "1").mkdir(parents=True)
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:1", "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "o"), "--loss-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--loss-every must be >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_fp16_optimizes_like_float32():
    """efficientnet-lite0 (ImageNet weights), 20 steps at 64 px: float16 with the dynamic loss scale ends within
    1.5x of float32's loss (the constant scale of before ended at 2.4x: every step overflowed)."""
    from vital_fast.models import load_model
    from vital_fast.references.images import load_images, offline_photo_path

    lite = load_model("efficientnet-lite0")
    refs = load_images([offline_photo_path("coffee")])
    final = {}
    for amp in ("off", "fp16"):
        s = get_preset("fast").replace(stages=[(1.0, 20)], n_refs=1, ref_crops=2, amp=amp)
        r = visualize(lite, ["class:967", "class:1"], {"class:967": refs, "class:1": refs}, settings=s, size=64,
                      seed=0, progress=False)
        final[amp] = r.losses[:, -1]
        if amp == "fp16":
            assert r.precision == "float16" and r.loss_scale["skipped_steps"] < 20
            assert LossScale.FLOOR < r.loss_scale["scale"] < LossScale.INIT
    assert (final["fp16"] <= 1.5 * final["off"]).all(), final


def test_fp16_whose_every_step_overflows_stops_naming_the_way_out(lm, monkeypatch):
    from vital_fast.optim.methods import get_objective

    monkeypatch.setattr(LossScale, "INIT", 1.0)
    s = get_preset("fast").replace(stages=[(1.0, 40)], amp="fp16", loss_every=5)
    with pytest.raises(FloatingPointError, match=r"amp fp16: the loss scale fell .* use|run with amp bf16"):
        visualize(lm, ["class:1"], objective=get_objective("actmax", s) * 1e38, settings=s, progress=False)


def test_counter_tells_device_reads_from_host_reads():
    w = torch.ones(3)
    with StepCounter([w]) as c:
        y = (w * 2).sum()
        float(y)
        float(torch.ones(1))
        (w + 1).tolist()
        g = torch.Generator().manual_seed(0)
        int(torch.randint(0, 5, (1,), generator=g))
    assert c.reads == 2 and [s.split(" @ ")[0] for s in c.read_sites] == ["aten._local_scalar_dense.default",
                                                                          "Tensor.tolist"]


def test_one_target_pads_only_where_a_convolution_would_leave_onednn():
    """A one-element CPU batch runs as two only when its pass would take PyTorch's native convolution path at batch
    1 (thread-schedule dependent) or a matrix product (another rounding at another batch size): TinyNet up to conv2
    pads at 32 px, not at 96 px (every input over 20480 values: oneDNN); its whole pass (the linear head) always
    pads. An unpadded image is the same run after run."""
    from vital_fast.models.padding import needs_padding

    torch.manual_seed(0)
    net = TinyNet().eval()
    assert needs_padding(net, torch.rand(1, 3, 32, 32), ["conv2"])
    assert not needs_padding(net, torch.rand(1, 3, 96, 96), ["conv2"])
    assert needs_padding(net, torch.rand(1, 3, 96, 96))  # the whole model: its nn.Linear head
    assert not needs_padding(net, torch.rand(2, 3, 32, 32))  # only one-element batches
    from vital_fast.models import load_model

    lm = load_model(net, input_size=96, resize_size=96)
    seen = []
    hook = net.conv1.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[0]))
    try:
        runs = []
        for size in (96, 96, 32):
            seen.clear()
            s = get_preset("fast").replace(stages=[(1.0, 4)], param="pixel")
            runs.append(visualize(lm, ["channel:conv2:3"], method="actmax", settings=s, size=size, progress=False))
            assert set(seen[-4:]) == ({1} if size == 96 else {2}), (size, seen)  # the steps (a probe may come first)
    finally:
        hook.remove()
    assert torch.equal(runs[0].images, runs[1].images)
