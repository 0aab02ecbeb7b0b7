"""The sort-matching loss as a regularizer in a compiled training step (plain PyTorch, no visualization).

    python examples/compiled_regularizer.py [--steps 20] [--backend inductor|aot_eager] [--weight 0.1]

A small CNN learns a random 10-class task while its second block's channel distributions are pulled toward a
fixed prototype (as a style or feature-statistics prior would be). The whole step, network, cross-entropy and
``vital_fast.sort_match_loss`` forward and backward, runs under ``torch.compile(fullgraph=True)``: the loss is a
PyTorch operator with its autograd and fake kernels registered, so the graph has no break. The first step is
compared with the same step in eager mode.
"""

from __future__ import annotations

import argparse
import shutil

import torch
from torch import nn

import vital_fast


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        f = self.block2(self.block1(x))
        return self.head(f.mean((2, 3))), f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="inductor" if shutil.which("c++") or shutil.which("g++") else "aot_eager")
    ap.add_argument("--weight", type=float, default=0.1)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    proto = vital_fast.sorted_prototype(torch.rand(8, 32, 8, 8, generator=g), q=32)  # the target statistics
    crit = vital_fast.SortMatchLoss(proto)

    def loss_fn(net, xb, yb):
        logits, f = net(xb)
        ce = nn.functional.cross_entropy(logits, yb)
        reg = crit(f)
        return ce + a.weight * reg, ce.detach(), reg.detach()

    def train(compiled: bool):
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        fn = torch.compile(loss_fn, fullgraph=True, backend=a.backend) if compiled else loss_fn
        hist = []
        for _ in range(a.steps):
            opt.zero_grad(set_to_none=True)
            total, ce, reg = fn(net, x, y)
            total.backward()
            opt.step()
            hist.append((float(ce), float(reg)))
        return hist

    eager, compiled = train(False), train(True)
    print(f"compiled ({a.backend}) training step with the sort-matching regularizer, {a.steps} steps: "
          f"cross-entropy {compiled[0][0]:.4f} -> {compiled[-1][0]:.4f}, regularizer {compiled[0][1]:.4f} -> "
          f"{compiled[-1][1]:.4f}; first step eager {eager[0][0]:.4f} / {eager[0][1]:.4f}")
    return eager, compiled


if __name__ == "__main__":
    main()
