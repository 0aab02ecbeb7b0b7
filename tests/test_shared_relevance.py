"""Relevance from the step's own forward pass: SortMatch shares the engine's forward with the LRP sweep.

The maps equal a second hooked forward's (tests/test_relevance.py checks the op bit for bit); here the
engine runs one forward per step instead of two, the images agree with the way before up to the
convolutions' rounding, and the cases that cannot share (a minority of due rows, a compiled network,
the stock composites) still take the second forward.
"""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from vital_fast.models import load_model  # noqa: E402
from vital_fast.optim import Settings, visualize  # noqa: E402
from vital_fast.references.cache import DiskCache  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model(torchvision.models.resnet18().eval(), input_size=64, resize_size=64, family="resnet")


@pytest.fixture(scope="module")
def refs():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 72, 72, generator=g)


def _run(lm, refs, targets, share, monkeypatch, **kw):
    """visualize with Settings.share_forward set; (result, forward passes of the network that record a graph)."""
    calls = []
    h = lm.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].requires_grad))
    try:
        s = Settings(stages=[(1.0, 3)], warmup=1, n_refs=3, quantiles=16, lr=0.1, lrp_every=1, share_forward=share, **kw)
        res = visualize(lm, targets, {t: refs for t in targets}, settings=s, cache=DiskCache(enabled=False))
    finally:
        h.remove()
    return res, sum(calls)


def test_channel_steps_run_one_forward_and_agree_with_the_second_forward(lm, refs, monkeypatch):
    tg = ["channel:layer3:1", "channel:layer3:5", "channel:layer3:9"]
    shared, n_shared = _run(lm, refs, tg, True, monkeypatch)
    separate, n_separate = _run(lm, refs, tg, False, monkeypatch)
    # each of the 3 steps runs the network once (shared) instead of twice; everything else is the same
    assert n_separate - n_shared == 3
    for a, b in zip(shared.images, separate.images):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    assert shared.timings["relevance_s"] > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_class_relevance_shares_and_a_minority_of_due_rows_does_not(lm, refs, monkeypatch):
    cls = ["class:1", "class:4"]
    _, n_shared = _run(lm, refs, cls, True, monkeypatch, class_relevance=True)
    _, n_separate = _run(lm, refs, cls, False, monkeypatch, class_relevance=True)
    assert n_separate - n_shared == 3
    # one channel target among three class targets: its relevance runs on its own row, in a second forward
    mixed = ["channel:layer3:2", "class:1", "class:2", "class:3"]
    _, n_mixed_shared = _run(lm, refs, mixed, True, monkeypatch)
    _, n_mixed_separate = _run(lm, refs, mixed, False, monkeypatch)
    assert n_mixed_shared == n_mixed_separate


def test_stock_composites_keep_the_second_forward(lm, refs, monkeypatch):
    tg = ["channel:layer3:1", "channel:layer3:5"]
    _, n_shared = _run(lm, refs, tg, True, monkeypatch, lrp_composite="epsilon_plus_flat")
    _, n_separate = _run(lm, refs, tg, False, monkeypatch, lrp_composite="epsilon_plus_flat")
    assert n_shared == n_separate


def test_a_start_module_that_runs_twice_tries_sharing_once_then_takes_the_second_forward(lm, refs, monkeypatch):
    """BasicBlock's ReLU runs twice per forward: its first step's shared pass does not serve (relevance_maps
    explains the first call), and later steps do not try again."""
    from vital_fast.references import shared_relevance

    built = []
    real = shared_relevance.SharedRelevance.__init__

    def counting(self, *a, **k):
        built.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(shared_relevance.SharedRelevance, "__init__", counting)
    # the layer3 target takes the forward past the ReLU's second call (its own start is a minority: separate)
    tg = ["channel:layer2.0.relu:1", "channel:layer2.0.relu:5", "channel:layer3:2"]
    shared, n_shared = _run(lm, refs, tg, True, monkeypatch)
    assert len(built) == 1
    separate, n_separate = _run(lm, refs, tg, False, monkeypatch)
    assert n_shared == n_separate  # the failed attempt cost no forward of its own
    for a, b in zip(shared.images, separate.images):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
