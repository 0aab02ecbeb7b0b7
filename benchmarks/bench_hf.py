"""The step on a Hugging Face ``transformers`` ViT against the same architecture from timm (issue 25: the wrappers
add nothing to the hot path), and relevance conservation on the transformers families.

    python -m benchmarks.bench_hf [--steps 4] [--batch 2] [--rounds 3] [--size 224] [--threads 2]

Step: ViT-B/16 at 224 px, random weights, built from ``transformers.ViTConfig()`` (loaded as ``hf:`` from a
``save_pretrained`` folder) and from ``timm:vit_base_patch16_224``; VITAL's class target and a channel target in
one batch, the fast preset's matching, seconds per target-step of the steps after the first, the two models
interleaved round by round in one process (:func:`benchmarks.bench_visualize.time_vital`). The table gives the
median of each and hf / timm.

Relevance: as ``benchmarks.bench_vit_relevance`` for the transformers families (ViT, DeiT, DINOv2, CLIP's and
SigLIP's vision towers; small configs) and OpenCLIP's ViT-B-32 with QuickGELU (random weights, biases and position
embeddings zeroed): the sum of the
relevance at each recorded block over the sum at the start (1.0 = conserved).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings

import torch

from benchmarks.bench_visualize import time_vital
from vital_fast.models import load_model
from vital_fast.references.relevance import relevance_maps


def step_ratio(steps: int, batch: int, rounds: int, size: int) -> None:
    import transformers

    folder = tempfile.mkdtemp(prefix="vf-hf-vit-")
    torch.manual_seed(0)
    transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).save_pretrained(folder)
    models = {"hf ViT-B/16": load_model(f"hf:{folder}"),
              "timm vit_base_patch16_224": load_model("timm:vit_base_patch16_224", weights="random")}
    units = {"hf ViT-B/16": "channel:vit.layers.8:5", "timm vit_base_patch16_224": "channel:blocks.8:5"}
    times = {k: [] for k in models}
    for r in range(rounds + 1):  # round 0 warms both up
        for name, lm in models.items():
            targets = (["class:1", units[name]] * batch)[:batch]
            t = time_vital(lm, targets, size, steps, n_refs=4)
            if r:
                times[name].append(t)
    print("| model | s per target-step (median) |")
    print("|---|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.4f} |")
    hf, timm = med["hf ViT-B/16"], med["timm vit_base_patch16_224"]
    print(f"\nhf / timm = {hf / timm:.3f} ({rounds} interleaved rounds, B = {batch}, {steps} steps, {size} px)\n")


def _families():
    import transformers as t

    small = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, intermediate_size=128, image_size=64,
                 patch_size=8)
    return {
        "ViT": t.ViTForImageClassification(t.ViTConfig(**small)),
        "DeiT": t.DeiTForImageClassification(t.DeiTConfig(**small)),
        "DINOv2": t.Dinov2Model(t.Dinov2Config(**small)),
        "CLIP vision": t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(**small)),
        "SigLIP vision": t.SiglipVisionModel(t.SiglipVisionConfig(**small)),
        "OpenCLIP ViT-B-32-quickgelu": "openclip:ViT-B-32-quickgelu",
    }


def conservation() -> None:
    print("| family | recorded layer | rules: sum / start |")
    print("|---|---|---:|")
    for name, module in _families().items():
        torch.manual_seed(0)
        lm = load_model(module, weights="random") if isinstance(module, str) else load_model(module)
        m = lm.model
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias") or any(k in n for k in ("position_embedding", "positional_embedding", "cls_token",
                                                              "register_tokens", "class_embedding",
                                                              "distillation_token")):
                    p.zero_()
        blocks = [n for n, _ in m.named_modules() if n.rsplit(".", 1)[0].endswith(("layers", "layer", "resblocks"))
                  and n.rsplit(".", 1)[-1].isdigit()]
        target = blocks[len(blocks) // 2]
        rec = [blocks[0], blocks[len(blocks) // 4], blocks[len(blocks) // 2 - 1]]
        side = 64 if not isinstance(module, str) else lm.input_size
        x = lm.normalize(torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)))
        seen = {}
        h = dict(m.named_modules())[target].register_forward_hook(lambda mod, a, o: seen.__setitem__("a", o))
        with torch.no_grad():
            m(x)
        h.remove()
        start = seen["a"][..., 5].flatten(1).sum(1)
        rel = relevance_maps(m, x, target, torch.tensor([5, 5]), rec, family="vit")
        for layer in rec:
            ratio = float((rel[layer].flatten(1).sum(1) / start).mean())
            print(f"| {name} | {layer} | {ratio:.3g} |", flush=True)
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-step", action="store_true", help="only the relevance table")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    conservation()
    if not a.skip_step:
        step_ratio(a.steps, a.batch, a.rounds, a.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
