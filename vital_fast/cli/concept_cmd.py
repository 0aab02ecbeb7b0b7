"""``vital-fast concept``: a concept vector from two folders of images (a TCAV-style linear probe).

    vital-fast concept --model M --layer L --positive STRIPED/ --negative OTHER/ --out striped.pt
    vital-fast visualize --model M --target direction:L:striped.pt:0 --images POOL --out OUT

The probe is :func:`vital_fast.concepts.train_concept`; this module parses arguments, loads the model and
prints one line: the file, the held-out accuracy, the counts and the command that visualizes the direction.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, Callable, Dict

from vital_fast.cli.common import EXIT_OK, UsageError, add_model_args, device_from_args, groups, load_from_args
from vital_fast.cli.pyref import is_pyref, load_model_pyref


def register(sub) -> Dict[str, Callable[[Any], int]]:
    """Add the ``concept`` sub-command to ``sub``; return its handler."""
    p = sub.add_parser(
        "concept", help="a concept vector from images: a linear probe on a layer's features (TCAV-style)",
        description="Reads every image under --positive (the concept) and --negative (without it), averages the "
        "features of --layer over positions (or tokens) per image, holds out a seeded fraction of each side, and "
        "fits an L2-regularized logistic regression on the rest. Writes the direction and bias (acting on the raw "
        "features) with its held-out accuracy to --out, for `vital-fast visualize --target "
        "direction:LAYER:FILE.pt:0`.",
    )
    data, method, schedule, hw, output = groups(p)
    add_model_args(p, labels=False, family=False)
    data.add_argument("--layer", required=True, help="the layer whose features are probed (see `vital-fast layers`)")
    data.add_argument("--positive", required=True, metavar="DIR", help="folder of images showing the concept")
    data.add_argument("--negative", required=True, metavar="DIR", help="folder of images without it")
    output.add_argument("--out", required=True, metavar="FILE.pt", help="the direction file to write")
    schedule.add_argument("--size", type=int, default=None, help="image side fed to the model (default: the model's)")
    method.add_argument("--tokens", default="mean", metavar="mean|patches|cls|T",
                        help="on a token layer (B, N, C): probe the mean of every token, of the patch tokens (CLS, "
                        "distillation and register tokens left out), the CLS token or token T; the direction is "
                        "visualized the same way (default: mean)")
    method.add_argument("--holdout", type=float, default=0.25,
                        help="fraction of each side held out to measure the accuracy (default: 0.25)")
    schedule.add_argument("--seed", type=int, default=0, help="seeds the train/held-out split (default: 0)")
    hw.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes decoding images (default: $VITAL_FAST_WORKERS, else none for small folders)")
    hw.add_argument("--device", default="cpu", help="a torch device: cpu, cuda, cuda:1 ... (default: cpu)")
    output.add_argument("--force", action="store_true", help="replace an existing --out file")
    return {"concept": cmd_concept}


def _load_model(args):

    device = device_from_args(args)
    if is_pyref(args.model):
        loaded = load_model_pyref(args.model)
        loaded.model.to(device)
        return loaded
    return load_from_args(argparse.Namespace(model=args.model, random_weights=args.random_weights, arch=args.arch,
                                    device=device, labels=None))


def visualize_command(args) -> str:
    """The command that visualizes the written direction (``POOL``/``OUT``: the user's image pool and run folder)."""
    parts = ["vital-fast", "visualize", "--model", args.model]
    if args.random_weights:
        parts.append("--random-weights")
    if args.arch:
        parts += ["--arch", args.arch]
    parts += ["--target", f"direction:{args.layer}:{args.out}:0", "--images", "POOL", "--out", "OUT"]
    return " ".join(shlex.quote(s) for s in parts)


def cmd_concept(args) -> int:
    from vital_fast.concepts import check_out, check_tokens, train_concept

    if not 0.0 < args.holdout < 1.0:
        raise UsageError(f"--holdout must be a fraction between 0 and 1 (exclusive), got {args.holdout}")
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 pixels, got {args.size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    try:
        tokens = check_tokens(args.tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_out(args.out, force=args.force)  # before any work; nothing written on failure
    loaded = _load_model(args)
    probe = train_concept(loaded, args.layer, args.positive, args.negative, holdout=args.holdout, seed=args.seed,
                          size=args.size, workers=args.workers, tokens=tokens)
    path = probe.save(args.out, force=args.force)
    print(f"wrote {path}: held-out accuracy {probe.accuracy:.3f} on {probe.n_test} images (train "
          f"{probe.train_accuracy:.3f} on {probe.n_train}; {probe.n_positive} positive, {probe.n_negative} negative, "
          f"{probe.channels} channels of {args.layer}); visualize: {visualize_command(args)}")
    return EXIT_OK
