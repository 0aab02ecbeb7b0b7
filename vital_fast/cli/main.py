"""``vital-fast``: the command-line front end.

Exit codes: 0 success; 2 bad usage or input (one line, no traceback); 1 anything else (the
traceback only with ``--verbose``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from typing import List, Optional

from vital_fast.cli.pyref import FAMILY_CHOICES

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or input: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: exit 2 with one line (plus usage)
        self.print_usage(sys.stderr)
        raise UsageError(message + _did_you_mean(self, message))


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """``; did you mean ...?`` for a mistyped subcommand or option (argparse's own messages), else ''."""
    import difflib
    import re

    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
        close = difflib.get_close_matches(m.group(1), choices, n=1)
        return f"; did you mean '{close[0]}'?" if close else ""
    m = re.search(r"unrecognized arguments: (.*)", message)
    if m:
        known = set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sp in action.choices.values():
                    known |= set(sp._option_string_actions)
        hints = []
        for arg in m.group(1).split():
            if arg.startswith("--"):
                close = difflib.get_close_matches(arg.split("=")[0], sorted(known), n=1)
                if close:
                    hints.append(f"{arg} -> {close[0]}")
        return f"; did you mean {', '.join(hints)}?" if hints else ""
    return ""


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


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="fast", help="settings preset: fast (CPU-practical) or paper (default: fast)")
    p.add_argument("--steps", type=int, default=None, help="total optimization steps (stages scaled to fit)")
    p.add_argument("--size", type=int, default=None, help="final resolution in pixels (default: the model's)")
    p.add_argument("--batch", type=int, default=8, help="targets optimized together in one pass (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each target's seed derives from it (default: 0)")
    p.add_argument("--device", default="cpu", help="a torch device: cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--amp", default=None, choices=["off", "bf16", "fp16", "auto"],
                   help="mixed precision of the network: bf16, fp16, auto (bfloat16 on GPUs, float32 on CPUs) or "
                   "off (default: the preset's: auto for fast, off for paper); the image, optimizer and losses stay float32")
    p.add_argument("--compile", default=None, metavar="off|on|BACKEND",
                   help="run the network under torch.compile: on (the inductor backend), a torch dynamo backend "
                   "name (aot_eager, eager: debug) or off (default: the preset's, off); the first step pays the "
                   "compile time")
    p.add_argument("--channels-last", default=None, choices=["auto", "on", "off"],
                   help="memory layout of the network: channels-last for the known convolutional families (auto, "
                   "the default), for any model (on), or the model's own (off); values are the same up to rounding")
    p.add_argument("--cache", default=None, help="prototype cache folder (default: ~/.cache/vital_fast)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes decoding candidate images while mining (default: $VITAL_FAST_WORKERS, else the "
                   "CPU cores minus one, at most 8; 0: decode in this process)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the prototype cache")
    p.add_argument("--force", action="store_true", help="write into an existing output folder, replacing its targets")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip finished targets")
    p.add_argument("--lrp-every", type=int, default=None, metavar="K",
                   help="relevance of the synthetic image every K steps (default: the preset's, 1)")
    p.add_argument("--loss-every", type=int, default=None, metavar="K",
                   help="read the losses from the device every K steps (progress and early stopping follow it; the "
                   "images do not; default: 10)")
    p.add_argument("--class-relevance", action="store_true",
                   help="weight class targets' features by LRP relevance from the class logit (off: the paper)")
    p.add_argument("--channel-relevance", action="store_true",
                   help="weight channel (unit) targets' features by LRP relevance to the unit, as the paper does (the "
                   "paper preset's default; the fast preset matches without it, which measured better)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a TOML or JSON file (.json: JSON, else TOML): setting names at the top level, "
                   "e.g. lr = 0.1 or stages = [[0.5, 60], [1.0, 90]]; applied over the preset")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="set_items",
                   help="one setting (repeatable), e.g. --set lr=0.1 --set flip=false --set 'stages=[[1.0, 50]]' "
                   "(lists as JSON). Order: the preset, then --config, then each --set, then --steps (which scales "
                   "the resulting stages), --lrp-every, --class-relevance, --channel-relevance, --channel-refs")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vital-fast", description="Fast VITAL feature visualization: distribution-matched images of "
                "what a class or a channel of a network responds to.")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of unexpected errors")
    p.add_argument("--version", action=_VersionAction, help="print the version of vital_fast, torch and the backends")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="visualize a few classes and channels of efficientnet-lite0 with offline photos",
                       description="Needs nothing from you and no network: efficientnet-lite0 and photographs that "
                       "ship in installed packages; writes a run folder with an HTML gallery.")
    d.add_argument("--out", default=None, help="run folder (default: runs/demo-YYYYmmdd-HHMMSS)")
    _common_run_args(d)

    l = sub.add_parser("layers", help="list a model's tappable layers with output shapes")
    l.add_argument("model", help="efficientnet-lite0|1|2, torchvision:NAME, timm:NAME, or a model file")
    l.add_argument("--size", type=int, default=None, help="input size for the shapes (default: the model's)")
    l.add_argument("--random-weights", action="store_true", help="random weights (torchvision, timm and efficientnet-lite names; nothing is downloaded)")
    l.add_argument("--arch", default=None, help="architecture of a state_dict or TorchScript model file "
                   "(e.g. torchvision:resnet50)")

    v = sub.add_parser("visualize", help="visualize class and channel targets of a model")
    v.add_argument("--model", required=True, help="efficientnet-lite0|1|2, torchvision:NAME, timm:NAME, a model file, or "
                   "py:MODULE:CALLABLE (a function returning an nn.Module or a LoadedModel)")
    v.add_argument("--target", action="append", required=True, metavar="SPEC",
                   help="class:285, channel:LAYER:17, direction:LAYER:FILE[:ROW] (a vector in the layer's channel "
                   "space: .pt/.safetensors, e.g. from `vital-fast concept` or a sparse autoencoder's decoder) or "
                   "neuron:LAYER:C:Y:X (channel C at row Y, column X of the layer's grid); repeat for more")
    v.add_argument("--images", required=True, help="folder: class subfolders (285/ or n02124075/); every image under "
                   "it is a candidate for channel top-k mining. Or py:MODULE:NAME: a map-style torch Dataset of images "
                   "(or a function returning one) to mine channel targets' references from")
    v.add_argument("--labels", default=None, metavar="FILE",
                   help="the model's class names, one a line (or a JSON list), in output order (default: the "
                   "weights' own metadata; none: 'class N')")
    v.add_argument("--out", required=True, help="run folder to write")
    v.add_argument("--random-weights", action="store_true", help="random weights (torchvision, timm and efficientnet-lite names; nothing is downloaded)")
    v.add_argument("--arch", default=None, help="architecture of a state_dict or TorchScript model file "
                   "(e.g. torchvision:resnet50)")
    v.add_argument("--method", default="vital", help="vital (default), a baseline (actmax, fourier, maco, bnstats) "
                   "or a method registered with vital_fast.optim.methods.register_method")
    v.add_argument("--param", default=None, metavar="NAME",
                   help="image parametrization: pixel, fourier or maco (default: the method's own; vital: the preset's, "
                   "fourier for fast, pixel for paper)")
    v.add_argument("--channel-refs", choices=["image", "patch"], default=None,
                   help="channel references: top-k full images or patches at the unit (default: the preset's)")
    v.add_argument("--family", default=None, choices=list(FAMILY_CHOICES),
                   help="architecture family (picks the matched layers, the relevance rules and the token layout; "
                   "default: guessed from the model's class)")
    v.add_argument("--layers", default=None, metavar="L1[:W],L2[:W],...",
                   help="matched layers (and weights, default 1) instead of the model family's preset, e.g. "
                   "layer1,layer2,layer3:2 (see `vital-fast layers MODEL`); unit targets match those before their layer")
    _common_run_args(v)

    r = sub.add_parser("report", help="(re)build the HTML gallery of a run folder, or the runs index of a folder of runs")
    r.add_argument("run", help="run folder, or a folder of run folders (writes an index.html listing them)")

    c = sub.add_parser("compare", help="compare two runs of the same targets (e.g. two model versions)")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None, help="folder for the comparison gallery (default: RUN_B/compare-<name of A>)")
    c.add_argument("--force", action="store_true")

    for mod in _plugin_modules():
        COMMANDS.update(mod.register(sub, _common_run_args))

    b = sub.add_parser("bench", help="print the kernel benchmark table")
    b.add_argument("--quick", action="store_true", help="fewer rounds")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    b.add_argument("--device", default="cpu", help="cpu or a CUDA device (cuda, cuda:1): synchronized timings")
    for sp in sub.choices.values():  # the global option after the subcommand too
        if "--verbose" not in sp._option_string_actions:
            sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="show tracebacks of unexpected errors (also before the subcommand)")
    return p


PLUGINS = ("vital_fast.cli.sweep_cmd", "vital_fast.cli.evaluate_cmd", "vital_fast.cli.concept_cmd")


def _plugin_modules():
    """Sub-commands that live in their own modules: each has ``register(sub, common_run_args)``
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


def _settings(args):
    from vital_fast.cli.settings_args import apply_overrides
    from vital_fast.optim import get_preset

    try:
        s = get_preset(args.preset)
        # preset < --config < --set (in order) < the dedicated flags below
        s = apply_overrides(s, getattr(args, "config", None), getattr(args, "set_items", None) or ())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        s = s.replace(**scaled_stages(s, args.steps))
    if getattr(args, "size", None) is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 pixels, got {args.size}")
    if getattr(args, "channel_refs", None):
        s = s.replace(channel_refs=args.channel_refs)
    if getattr(args, "lrp_every", None) is not None:
        if args.lrp_every < 1:
            raise UsageError(f"--lrp-every must be >= 1, got {args.lrp_every}")
        s = s.replace(lrp_every=args.lrp_every)
    if getattr(args, "loss_every", None) is not None:
        if args.loss_every < 1:
            raise UsageError(f"--loss-every must be >= 1, got {args.loss_every}")
        s = s.replace(loss_every=args.loss_every)
    if getattr(args, "class_relevance", False):
        s = s.replace(class_relevance=True)
    if getattr(args, "channel_relevance", False):
        s = s.replace(channel_relevance=True)
    if getattr(args, "lrp_every", None) is not None and not (s.channel_relevance or s.class_relevance):
        print(f"vital-fast: note: --lrp-every {args.lrp_every} has no effect: the {args.preset} preset computes no "
              f"relevance (add --channel-relevance or --class-relevance)", file=sys.stderr)
    if getattr(args, "amp", None) is not None:
        s = s.replace(amp=args.amp)
    if getattr(args, "channels_last", None) is not None:
        s = s.replace(channels_last=args.channels_last)
    if getattr(args, "compile", None) is not None:
        from vital_fast.models.compiled import resolve_compile

        try:
            resolve_compile(args.compile)
        except ValueError as exc:
            raise UsageError(f"--compile {args.compile}: {exc}") from None
        s = s.replace(compile=args.compile)
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    return s


def scaled_stages(s, steps: int) -> dict:
    """The stage schedule of settings ``s`` scaled to exactly ``steps`` steps (:meth:`Settings.with_steps`), as
    ``replace`` arguments."""
    t = s.with_steps(steps)
    return {"stages": t.stages, "warmup": t.warmup}


def _cache(args):
    from vital_fast.references.cache import DiskCache

    return DiskCache(args.cache, enabled=not args.no_cache)


def _check_out(args) -> None:
    """The run-folder checks that need no model: writable, not in use, ours to write (writes nothing)."""
    from vital_fast.runfolder import precheck_run_folder

    try:
        precheck_run_folder(args.out, resume=args.resume, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def _owned_folder(args, loaded, settings, method: str):
    """Hold the run folder for this run: identity checked, lock held, cleared for --force.

    Yields the identity. A run that ends before writing anything leaves no lock file (nor the folder,
    when it made it) behind.
    """
    from vital_fast.runfolder import LOCK_FILES, prepare_run_folder, run_identity

    identity = run_identity(model=loaded.name, fingerprint=loaded.fingerprint, method=method, seed=args.seed,
                            settings=settings.to_dict(), size=args.size, preset=args.preset,
                            layers=getattr(args, "class_layers", None))
    existed = os.path.isdir(args.out)
    try:
        lock = prepare_run_folder(args.out, identity, resume=args.resume, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        yield identity
    finally:
        try:
            if set(os.listdir(args.out)) <= set(LOCK_FILES):  # nothing written: leave no trace
                for name in LOCK_FILES:
                    if os.path.lexists(os.path.join(args.out, name)):
                        os.unlink(os.path.join(args.out, name))
                if not existed:
                    os.rmdir(args.out)
        except OSError:
            pass
        lock.release()


def _device(args):
    """``--device`` as a torch device string that exists here (one line and exit 2 otherwise)."""
    import torch

    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {args.device}: this machine has {n} CUDA device(s) (cuda:0-cuda:{n - 1})")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise UsageError(f"--device {args.device}: no {dev.type} device on this machine")
    if getattr(args, "amp", None) not in (None, "off"):
        from vital_fast.optim.precision import resolve_amp

        try:
            resolve_amp(args.amp, dev)
        except ValueError as exc:
            raise UsageError(f"--amp {args.amp}: {exc}") from None
    return args.device


def _pending(args, targets):
    """Targets still to do: all of them, or with --resume those the folder has not finished."""
    from vital_fast.cli.jobs import finished_keys

    if not args.resume:
        return list(targets)
    done = set(finished_keys(args.out))
    pending = [t for t in targets if t.key not in done]
    if not pending:
        print(f"all targets already finished in {args.out}", file=sys.stderr)
    return pending


def parse_layers(loaded, spec):
    """``--layers L1[:W],L2[:W]``: matched layers (each must exist; a weight must be a number > 0), or None."""
    if spec is None:
        return None
    from vital_fast.models import resolve_layer

    out = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        name, sep, w = item.rpartition(":") if ":" in item else (item, "", "")
        name = name if sep else item
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise UsageError(f"--layers: bad weight {w!r} for layer {name!r} (use NAME or NAME:WEIGHT)") from None
        if not weight > 0:
            raise UsageError(f"--layers: the weight of {name!r} must be > 0, got {weight}")
        try:
            resolve_layer(loaded.model, name)
        except ValueError as exc:
            raise UsageError(f"--layers: {exc}") from None
        out.append((name, weight))
    if not out:
        raise UsageError("--layers: no layer given")
    from vital_fast.models.facts import check_matched_layers

    try:
        check_matched_layers(loaded, out, "--layers:")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return out


def _check_preset(loaded) -> None:
    """The family's matched layers fit the model, or one line saying how to pass them (exit 2)."""
    from vital_fast.models import default_layers

    try:
        default_layers(loaded)
    except ValueError as exc:
        raise UsageError(f"{str(exc).split(';')[0]}; pass the matched layers with --layers L1,L2,... "
                         f"(`vital-fast layers {loaded.name}` lists them)") from None


def _run_targets(args, loaded, targets, refs, settings, identity, extra=None) -> int:
    from vital_fast.cli.jobs import run_into_folder
    from vital_fast.cli.progress import Progress
    from vital_fast.report.gallery import build_gallery

    bar = Progress(max(1, len(range(0, len(targets), args.batch)) * settings.steps), label="optimizing")
    if targets:
        run_into_folder(loaded, targets, refs, args.out, settings, seed=args.seed, batch=args.batch,
                        cache=_cache(args), preset=args.preset, size=args.size, on_step=bar.update,
                        extra=dict(extra or {}, run=identity), method=getattr(args, "method", "vital"),
                        param=getattr(args, "param", None), class_layers=getattr(args, "class_layers", None))
    if os.path.isfile(os.path.join(args.out, "manifest.json")):
        index = build_gallery(args.out)
        print(f"wrote {args.out} (gallery: {index})")
    return EXIT_OK


def cmd_demo(args) -> int:
    from vital_fast.cli.demo import demo_plan
    from vital_fast.models import load_model

    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    args.out = out
    settings = _settings(args)
    _check_out(args)
    loaded = load_model("efficientnet-lite0", device=_device(args))
    print(f"vital-fast demo: efficientnet-lite0 ({loaded.fingerprint}), preset {args.preset}, "
          f"{settings.steps} steps -> {out}", file=sys.stderr)
    with _owned_folder(args, loaded, settings, "vital") as identity:
        targets, refs = demo_plan(loaded, settings, _cache(args))
        args.batch = max(args.batch, len(targets)) if args.batch == 8 else args.batch
        targets = _pending(args, targets)
        return _run_targets(args, loaded, targets, refs, settings, identity, extra={"demo": True})


def _load(args):
    from vital_fast.models import load_model

    weights = "random" if getattr(args, "random_weights", False) else "pretrained"
    return load_model(args.model, weights=weights, arch=getattr(args, "arch", None),
                      device=_device(args) if hasattr(args, "device") else "cpu", labels=getattr(args, "labels", None),
                      family=getattr(args, "family", None))


def cmd_layers(args) -> int:
    from vital_fast.models import list_layers

    loaded = _load(args)
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 pixels, got {args.size}")
    size = args.size or loaded.input_size
    rows = list_layers(loaded.model, size)
    w = max(len(r["name"]) for r in rows) if rows else 10
    print(f"{loaded.name}  input {size}x{size}  fingerprint {loaded.fingerprint}")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['type']:<28} {tuple(r['shape'])}")
    return EXIT_OK


def _method_label(args) -> str:
    """The recorded method: ``vital``, ``fourier``..., or ``vital+fourier`` for a method on another
    parametrization; an unknown method or parametrization is a usage error listing the valid ones."""
    from vital_fast.optim.methods import get_method
    from vital_fast.optim.parametrizations import get_parametrization

    try:
        m = get_method(args.method)
        if args.param is None or args.param == m.param:
            return m.name
        return f"{m.name}+{get_parametrization(args.param).name}"
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_visualize(args) -> int:
    from vital_fast.cli.jobs import gather_references
    from vital_fast.optim import parse_target

    try:
        targets = [parse_target(t) for t in args.target]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from vital_fast.cli.pyref import images_arg, is_pyref, load_model_pyref

    images = images_arg(args.images)
    settings = _settings(args)
    _method_label(args)
    _check_out(args)
    if is_pyref(args.model):
        loaded = load_model_pyref(args.model, args.labels, args.family)
        loaded.model.to(_device(args))
    else:
        loaded = _load(args)
    from vital_fast.models.facts import check_targets

    check_targets(loaded, targets)
    args.class_layers = parse_layers(loaded, args.layers)
    if args.class_layers is None and _method_label(args).startswith("vital"):
        _check_preset(loaded)
    with _owned_folder(args, loaded, settings, _method_label(args)) as identity:
        targets = _pending(args, targets)
        refs = gather_references(loaded, targets, images, settings, _cache(args), args.size) if targets else {}
        return _run_targets(args, loaded, targets, refs, settings, identity)


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


COMMANDS = {"demo": cmd_demo, "layers": cmd_layers, "visualize": cmd_visualize, "report": cmd_report,
            "compare": cmd_compare, "bench": cmd_bench}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
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
