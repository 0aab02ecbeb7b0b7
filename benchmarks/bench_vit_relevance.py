"""Relevance in ViTs: the transformer rules against plain gradient x input and zennit's epsilon composite.

    python -m benchmarks.bench_vit_relevance [--models timm:vit_tiny_patch16_224 torchvision:vit_b_16] [--threads 2]

Random weights (pretrained ones cannot be fetched here), as built and with every bias and position
embedding zeroed (then nothing may absorb relevance and a conservative sweep keeps the whole sum). The
target is channel 5 of the block in the middle of the encoder; for each recorded layer (the patch
embedding and three earlier blocks) the table gives the sum of the relevance there over the sum of the
start relevance ``A * mask`` at the target (1.0 = conserved), the mean over 2 random images:

* ``rules``: :func:`vital_fast.references.relevance.relevance_maps` with ``family="vit"`` (the paper
  composite selects :mod:`vital_fast.references.lrp_transformer`'s conservative rules);
* ``grad x input``: the model's own backward, relevance = output x gradient;
* ``epsilon``: zennit's EpsilonPlusFlat (``composite="epsilon_plus_flat"``), attention as plain gradient.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from vital_fast.models import load_model
from vital_fast.references.relevance import relevance_maps


def grad_x_input(model, x, target, rec, ch):
    mods = dict(model.named_modules())
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in rec + [target]]
    try:
        with torch.enable_grad():
            model(x.clone().requires_grad_(True))
            a = seen[target]
            sel = a[..., ch] if a.dim() == 3 else a[:, ch]
            grads = torch.autograd.grad(sel.sum(), [seen[n] for n in rec], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return {n: (g * seen[n]).detach() for n, g in zip(rec, grads)}, sel.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["timm:vit_tiny_patch16_224", "torchvision:vit_b_16"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    print("| model | biases | recorded layer | rules | grad x input | epsilon |")
    print("|---|---|---|---:|---:|---:|")
    for name in a.models:
        for zero in (False, True):
            torch.manual_seed(0)
            lm = load_model(name, weights="random")
            m = lm.model
            if zero:
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if n.endswith("bias") or n in ("pos_embed", "cls_token", "class_token") or "pos_embedding" in n:
                            p.zero_()
            blocks = [n for n, _ in m.named_modules() if n.count(".") == (1 if n.startswith("blocks.") else 2)
                      and (n.startswith("blocks.") or n.startswith("encoder.layers.encoder_layer_"))]
            target = blocks[len(blocks) // 2]
            stem = "patch_embed.proj" if "patch_embed.proj" in dict(m.named_modules()) else "conv_proj"
            rec = [stem] + [blocks[i] for i in (0, len(blocks) // 4, len(blocks) // 2 - 1)]
            x = lm.normalize(torch.rand(2, 3, lm.input_size, lm.input_size, generator=torch.Generator().manual_seed(1)))
            ch = torch.tensor([5, 5])
            rules = relevance_maps(m, x, target, ch, rec, family="vit")
            eps = relevance_maps(m, x, target, ch, rec, family="vit", composite="epsilon_plus_flat")
            gxi, sel = grad_x_input(m, x, target, rec, 5)
            start = sel.flatten(1).sum(1)

            def ratio(r, layer):
                return float((r[layer].flatten(1).sum(1) / start).mean())

            for layer in rec:
                print(f"| {name} | {'zeroed' if zero else 'as built'} | {layer} | {ratio(rules, layer):.3g} | "
                      f"{ratio(gxi, layer):.3g} | {ratio(eps, layer):.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
