"""The batched optimizer update (vital_fast.optim.update) against torch.optim, and the fp16 skip."""

from __future__ import annotations

import pytest
import torch

from vital_fast.optim.update import SlotMoments, multi_step


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_multi_step_is_bit_identical_to_torch_optim(name):
    """Three slots with their own learning rates, schedules and step counts (one joins late), updated
    together, equal ``torch.optim`` run per slot bit for bit."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 5, 2)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10 ** (k % 3 - 1) for s in shapes] for k in range(12)]
    betas, eps = (0.5, 0.9), 1e-8
    lr = lambda i, k: 0.2 * (i + 1) * (1 - k / 20)  # noqa: E731
    join = {0: 0, 1: 0, 2: 4}  # slot 2 starts at step 4

    ref = [p.clone() for p in init]
    cls = torch.optim.Adam if name == "adam" else torch.optim.NAdam
    opts = [cls([p], lr=1.0, betas=betas, eps=eps) for p in ref]
    mine = [p.clone() for p in init]
    states = [SlotMoments(p) for p in mine]
    for k in range(12):
        live = [i for i in range(3) if k >= join[i]]
        for i in live:
            ref[i].grad = grads[k][i].clone()
            opts[i].param_groups[0]["lr"] = lr(i, k)
            opts[i].step()
        multi_step(name, [mine[i] for i in live], [grads[k][i] for i in live], [states[i] for i in live],
                   [lr(i, k) for i in live], betas, eps)
        for i in live:
            assert torch.equal(mine[i], ref[i]), (name, k, i, (mine[i] - ref[i]).abs().max())


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_a_skipped_step_changes_nothing(name):
    p = torch.randn(2, 3, 4, 4)
    states = [SlotMoments(p[:1]), SlotMoments(p[1:])]
    ps = [p[:1].clone(), p[1:].clone()]
    g = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    multi_step(name, ps, g, states, [0.1, 0.2], (0.9, 0.999), 1e-8, ok=torch.tensor(1.0))
    before = [t.clone() for t in ps] + [s.exp_avg.clone() for s in states] + [s.exp_avg_sq.clone() for s in states]
    multi_step(name, ps, [torch.zeros_like(t) for t in g], states, [0.1, 0.2], (0.9, 0.999), 1e-8,
               ok=torch.tensor(0.0))
    after = ps + [s.exp_avg for s in states] + [s.exp_avg_sq for s in states]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    multi_step(name, ps, g, states, [0.1, 0.2], (0.9, 0.999), 1e-8, ok=torch.tensor(1.0))
    assert not torch.equal(ps[0], before[0])


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid: adam, nadam"):
        multi_step("sgd", [torch.zeros(1)], [torch.zeros(1)], [SlotMoments(torch.zeros(1))], [0.1], (0.9, 0.99), 1e-8)
