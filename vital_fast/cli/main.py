"""``vital-fast``: the command-line front end.

Exit codes: 0 success; 2 bad usage or input (one line, no traceback); 1 anything else (the
traceback only with ``--verbose``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import List, Optional

from vital_fast.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    UsageError,
    add_matching_args,
    add_model_args,
    add_run_args,
    cache_from_args,
    check_log_args,
    check_out,
    check_preset,
    device_from_args,
    group,
    groups,
    load_from_args,
    method_label,
    owned_folder,
    parse_layers,
    pending,
    run_targets,
    settings_from_args,
)
from vital_fast.cli.completion import SHELLS, hook_argcomplete, script


def version_text() -> str:
    """``vital-fast --version``: the package, torch and the backends that load here."""
    import torch

    import vital_fast

    backends = vital_fast.available_backends()
    have = ", ".join(f"{k} {'yes' if v['available'] else 'no'}" for k, v in backends.items())
    cuda = f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no CUDA device"
    return f"vital_fast {vital_fast.__version__} (torch {torch.__version__}, {cuda}; backends: {have})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vital-fast", description="Fast VITAL feature visualization: distribution-matched images of "
                "what a class or a channel of a network responds to.")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of unexpected errors")
    p.add_argument("--version", action=_VersionAction, help="print the version of vital_fast, torch and the backends")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)

    d = sub.add_parser("demo", help="visualize a few classes and channels of efficientnet-lite0 with offline photos",
                       description="Needs nothing from you and no network: efficientnet-lite0 and photographs that "
                       "ship in installed packages; writes a run folder with an HTML gallery.")
    output = group(d, "output")
    output.add_argument("--out", default=None, help="run folder (default: runs/demo-YYYYmmdd-HHMMSS)")
    add_run_args(d)

    l = sub.add_parser("layers", help="list a model's tappable layers with output shapes")
    l.add_argument("model", help="efficientnet-lite0|1|2, torchvision:NAME, timm:NAME, hf:HUB_ID, openclip:ARCH[:TAG], or a model file")
    l.add_argument("--size", type=int, default=None, help="input size for the shapes (default: the model's)")
    l.add_argument("--random-weights", action="store_true", help="random weights (torchvision, timm, hf and efficientnet-lite names; hf: from its cached config; nothing is downloaded)")
    l.add_argument("--arch", default=None, help="architecture of a state_dict or TorchScript model file "
                   "(e.g. torchvision:resnet50)")

    v = sub.add_parser("visualize", help="visualize class and channel targets of a model")
    data, method, _, _, output = groups(v)
    add_model_args(v)
    data.add_argument("--target", action="append", required=True, metavar="SPEC",
                      help="class:285, channel:LAYER:17, direction:LAYER:FILE[:ROW] (a vector in the layer's channel "
                      "space: .pt/.safetensors, e.g. from `vital-fast concept` or a sparse autoencoder's decoder), "
                      "neuron:LAYER:C:Y:X (channel C at row Y, column X of the layer's grid), head:BLOCK:H[:T] (an "
                      "attention head of a transformer block, or its token T) or text:PROMPT (CLIP-like models: the "
                      "text tower's direction in the image embedding; text:A|B averages prompts); repeat for more")
    data.add_argument("--images", required=True, help="folder: class subfolders (285/ or n02124075/); every image under "
                      "it is a candidate for channel top-k mining. Or py:MODULE:NAME: a map-style torch Dataset of images "
                      "(or a function returning one) to mine channel targets' references from")
    output.add_argument("--out", required=True, help="run folder to write")
    method.add_argument("--method", default="vital", help="vital (default), a baseline (actmax, fourier, maco, bnstats) "
                        "or a method registered with vital_fast.optim.methods.register_method")
    method.add_argument("--param", default=None, metavar="NAME",
                        help="image parametrization: pixel, fourier or maco (default: the method's own; vital: the preset's, "
                        "fourier for fast, pixel for paper)")
    add_matching_args(v)
    add_run_args(v)

    r = sub.add_parser("report", help="(re)build the HTML gallery of a run folder, or the runs index of a folder of runs")
    r.add_argument("run", help="run folder, or a folder of run folders (writes an index.html listing them)")

    c = sub.add_parser("compare", help="compare two runs of the same targets (e.g. two model versions)")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None, help="folder for the comparison gallery (default: RUN_B/compare-<name of A>)")
    c.add_argument("--force", action="store_true")

    for mod in _plugin_modules():
        COMMANDS.update(mod.register(sub))

    k = sub.add_parser("completion", help="print a shell completion script: eval \"$(vital-fast completion bash)\"",
                       description="Prints a completion script generated from this parser (subcommands, options, "
                       "option values). Add `eval \"$(vital-fast completion bash)\"` to ~/.bashrc (or `... zsh` to "
                       "~/.zshrc). With argcomplete installed, `eval \"$(register-python-argcomplete vital-fast)\"` "
                       "completes from the live parser instead.")
    k.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")

    b = sub.add_parser("bench", help="print the kernel benchmark table")
    b.add_argument("--quick", action="store_true", help="fewer rounds")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    b.add_argument("--device", default="cpu", help="cpu or a CUDA device (cuda, cuda:1): synchronized timings")
    for sp in sub.choices.values():  # the global option after the subcommand too
        if "--verbose" not in sp._option_string_actions:
            sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="show tracebacks of unexpected errors (also before the subcommand)")
        if "--version" not in sp._option_string_actions:
            sp.add_argument("--version", action=_VersionAction, help="print the versions and exit (also before the "
                            "subcommand)")
    return p


PLUGINS = ("vital_fast.cli.sweep_cmd", "vital_fast.cli.evaluate_cmd", "vital_fast.cli.concept_cmd")


def _plugin_modules():
    """Sub-commands that live in their own modules: each has ``register(sub)``
    returning ``{name: handler}``."""
    import importlib

    mods = []
    for name in PLUGINS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return mods


def cmd_demo(args) -> int:
    from vital_fast.cli.demo import demo_plan
    from vital_fast.models import load_model

    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    args.out = out
    settings = settings_from_args(args)
    check_out(args)
    loaded = load_model("efficientnet-lite0", device=device_from_args(args))
    print(f"vital-fast demo: efficientnet-lite0 ({loaded.fingerprint}), preset {args.preset}, "
          f"{settings.steps} steps -> {out}", file=sys.stderr)
    with owned_folder(args, loaded, settings, "vital") as identity:
        targets, refs = demo_plan(loaded, settings, cache_from_args(args))
        args.batch = max(args.batch, len(targets)) if args.batch == 8 else args.batch
        targets = pending(args, targets)
        return run_targets(args, loaded, targets, refs, settings, identity, extra={"demo": True})


def cmd_layers(args) -> int:
    from vital_fast.models import list_layers

    loaded = load_from_args(args)
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 pixels, got {args.size}")
    size = args.size or loaded.input_size
    rows = list_layers(loaded.model, size)
    w = max(len(r["name"]) for r in rows) if rows else 10
    print(f"{loaded.name}  input {size}x{size}  fingerprint {loaded.fingerprint}")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['type']:<28} {tuple(r['shape'])}")
    return EXIT_OK


def cmd_visualize(args) -> int:
    from vital_fast.cli.jobs import gather_references
    from vital_fast.optim import parse_target

    from vital_fast.models.text import is_text_spec, text_prompts
    from vital_fast.optim.targets import head_spec

    def check(t):  # text and head targets are read with the model: their form checked here, before loading it
        if is_text_spec(t):
            return text_prompts(t) and t
        return head_spec(t) and t if t.strip().startswith("head:") else parse_target(t)

    try:
        targets = [check(t) for t in args.target]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from vital_fast.cli.pyref import images_arg, is_pyref, load_model_pyref

    images = images_arg(args.images)
    settings = settings_from_args(args)
    method_label(args)
    check_out(args)
    if is_pyref(args.model):
        loaded = load_model_pyref(args.model, args.labels, args.family)
        loaded.model.to(device_from_args(args))
    else:
        loaded = load_from_args(args)
    from vital_fast.models.facts import check_targets
    from vital_fast.optim.targets import resolve_model_targets

    targets = resolve_model_targets(loaded, targets)
    check_targets(loaded, targets)
    args.class_layers = parse_layers(loaded, args.layers)
    if args.class_layers is None and method_label(args).startswith("vital"):
        check_preset(loaded)
    with owned_folder(args, loaded, settings, method_label(args)) as identity:
        targets = pending(args, targets)
        refs = gather_references(loaded, targets, images, settings, cache_from_args(args), args.size) if targets else {}
        return run_targets(args, loaded, targets, refs, settings, identity)


def cmd_report(args) -> int:
    from vital_fast.report.runs import build_report

    if not os.path.isdir(args.run):
        raise UsageError(f"no such run folder: {args.run}")
    print(build_report(args.run))
    return EXIT_OK


def cmd_compare(args) -> int:
    from vital_fast.report.compare import compare_runs

    for r in (args.run_a, args.run_b):
        if not os.path.isdir(r):
            raise UsageError(f"no such run folder: {r}")
    out = args.out or os.path.join(args.run_b, "compare-" + os.path.basename(os.path.normpath(args.run_a)))
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise UsageError(f"output folder {out} exists and is not empty; pass --force to replace it")
    path = compare_runs(args.run_a, args.run_b, out)
    print(path)
    return EXIT_OK


def cmd_bench(args) -> int:
    from vital_fast.bench import run

    try:
        run(args.batches, args.threads, 3 if args.quick else 7, device=args.device)
    except (RuntimeError, ValueError) as exc:  # no CUDA, a bad device string
        raise UsageError(f"--device {args.device}: {exc}") from None
    return EXIT_OK


def cmd_completion(args) -> int:
    print(script(args.shell, build_parser()), end="")
    return EXIT_OK


COMMANDS = {"demo": cmd_demo, "layers": cmd_layers, "visualize": cmd_visualize, "report": cmd_report,
            "compare": cmd_compare, "bench": cmd_bench, "completion": cmd_completion}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    if argv is None:
        hook_argcomplete(parser)  # answers a shell's completion request (argcomplete installed), else nothing
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        if not args.cmd:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if getattr(args, "workers", None) is not None:
            if args.workers < 0:
                raise UsageError(f"--workers must be >= 0, got {args.workers}")
            os.environ["VITAL_FAST_WORKERS"] = str(args.workers)  # read by vital_fast.references.pool
        check_log_args(args)
        return COMMANDS[args.cmd](args)
    except UsageError as exc:
        print(f"vital-fast: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        # Bad input found by the library: one line, no traceback.
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vital-fast: error: {msg}", file=sys.stderr)
        if verbose:
            traceback.print_exc()
        return EXIT_USAGE
    except FloatingPointError as exc:  # float16's loss scale collapsed: a run that cannot go on, said in one line
        print(f"vital-fast: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vital-fast: interrupted; finished targets are saved (use --resume to continue)", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001
        print(f"vital-fast: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if verbose:
            traceback.print_exc()
        else:
            print("run again with --verbose for the traceback", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
