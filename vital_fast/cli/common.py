"""What the ``vital-fast`` subcommands share: the parser class, the option groups, the run options and the
helpers that turn parsed options into settings, a device, a model, a run folder. The subcommands
(:mod:`vital_fast.cli.main` and the ``*_cmd`` modules) import from here, never from each other.

Exit codes: 0 success; 2 bad usage or input (one line, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Every subcommand's options are shown under these headings, in this order (``--help``).
GROUPS = ("targets and data", "method", "schedule", "precision and device", "output")


def group(p: argparse.ArgumentParser, title: str):
    """The argument group ``title`` (one of :data:`GROUPS`) of parser ``p``, made on first use."""
    if title not in GROUPS:
        raise ValueError(f"unknown option group {title!r}; valid: {', '.join(GROUPS)}")
    groups = p.__dict__.get("_vf_groups")
    if groups is None:  # all at once, so that --help lists them in this order (empty ones are not shown)
        groups = p.__dict__["_vf_groups"] = {t: p.add_argument_group(t) for t in GROUPS}
    return groups[title]


class UsageError(Exception):
    """Bad usage or input: reported in one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: exit 2 with one line (plus usage)
        self.print_usage(sys.stderr)
        raise UsageError(message + did_you_mean(self, message))

    def format_help(self) -> str:
        if self.__dict__.get("_settings_epilog"):  # built only for --help: it imports the presets (and torch)
            from vital_fast.cli.settings_args import settings_epilog

            self.epilog = settings_epilog()
            self.formatter_class = argparse.RawDescriptionHelpFormatter
        return super().format_help()


def did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """``; did you mean ...?`` for a mistyped subcommand or option (argparse's own messages), else ''."""
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


def groups(p: argparse.ArgumentParser):
    """The five option groups of ``p``, in :data:`GROUPS` order: ``data, method, schedule, hw, out = groups(p)``."""
    return tuple(group(p, t) for t in GROUPS)


MODEL_HELP = ("efficientnet-lite0|1|2, torchvision:NAME, timm:NAME, hf:HUB_ID, openclip:ARCH[:TAG], a model file, or "
              "py:MODULE:CALLABLE (a function returning an nn.Module or a LoadedModel)")


def add_model_args(p: argparse.ArgumentParser, *, labels: bool = True, family: bool = True) -> None:
    """The options that name the model (``--model``, ``--random-weights``, ``--arch``, and ``--labels``,
    ``--family`` where the command uses them), under "targets and data"."""
    from vital_fast.cli.pyref import FAMILY_CHOICES

    data = group(p, "targets and data")
    data.add_argument("--model", required=True, help=MODEL_HELP)
    data.add_argument("--random-weights", action="store_true",
                      help="random weights (torchvision, timm, hf, openclip and efficientnet-lite names; hf: from its "
                      "cached config; nothing is downloaded)")
    data.add_argument("--arch", default=None, help="architecture of a state_dict or TorchScript model file "
                      "(e.g. torchvision:resnet50)")
    if labels:
        data.add_argument("--labels", default=None, metavar="FILE",
                          help="the model's class names, one a line (or a JSON list), in output order (default: the "
                          "weights' own metadata; none: 'class N')")
    if family:
        data.add_argument("--family", default=None, choices=list(FAMILY_CHOICES),
                          help="architecture family (picks the matched layers, the relevance rules and the token "
                          "layout; default: guessed from the model's class)")


def add_matching_args(p: argparse.ArgumentParser) -> None:
    """``--channel-refs`` and ``--layers``: what VITAL matches, under "method"."""
    method = group(p, "method")
    method.add_argument("--channel-refs", choices=["image", "patch"], default=None,
                        help="channel references: top-k full images or patches at the unit (default: the "
                        "preset's: patch for fast, image for paper)")
    method.add_argument("--layers", default=None, metavar="L1[:W],L2[:W],...",
                        help="matched layers (and weights, default 1) instead of the model family's preset, e.g. "
                        "layer1,layer2,layer3:2 (see `vital-fast layers MODEL`); unit targets match those before their "
                        "layer")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every run takes (demo, visualize, sweep), each under its heading of :data:`GROUPS`; the help
    ends with every setting ``--set`` and ``--config`` take."""
    p.__dict__["_settings_epilog"] = True
    _, method, schedule, hw, output = groups(p)
    method.add_argument("--preset", default="fast", help="settings preset: fast (CPU-practical) or paper (default: fast)")
    schedule.add_argument("--steps", type=int, default=None, help="total optimization steps (stages scaled to fit)")
    schedule.add_argument("--size", type=int, default=None, help="final resolution in pixels (default: the model's)")
    schedule.add_argument("--batch", type=int, default=8, help="targets optimized together in one pass (default: 8)")
    schedule.add_argument("--seed", type=int, default=0, help="run seed; each target's seed derives from it (default: 0)")
    hw.add_argument("--device", default="cpu", help="a torch device: cpu, cuda, cuda:1 ... (default: cpu)")
    hw.add_argument("--amp", default=None, choices=["off", "bf16", "fp16", "auto"],
                    help="mixed precision of the network: bf16, fp16, auto (bfloat16 on GPUs, float32 on CPUs) or "
                    "off (default: the preset's: auto for fast, off for paper); the image, optimizer and losses stay float32")
    hw.add_argument("--compile", default=None, metavar="off|on|BACKEND",
                    help="run the network under torch.compile: on (the inductor backend), a torch dynamo backend "
                    "name (aot_eager, eager: debug) or off (default: the preset's, off); the first step pays the "
                    "compile time")
    hw.add_argument("--channels-last", default=None, choices=["auto", "on", "off"],
                    help="memory layout of the network: channels-last for the known convolutional families (auto), "
                    "for any model (on), or the model's own (off); values are the same up to rounding (default: the "
                    "preset's, auto)")
    output.add_argument("--cache", default=None, help="prototype cache folder (default: ~/.cache/vital_fast)")
    hw.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes decoding candidate images while mining (default: $VITAL_FAST_WORKERS, else the "
                    "CPU cores minus one, at most 8; 0: decode in this process)")
    output.add_argument("--no-cache", action="store_true", help="do not read or write the prototype cache")
    output.add_argument("--force", action="store_true", help="write into an existing output folder, replacing its targets")
    output.add_argument("--resume", action="store_true", help="continue an interrupted run: skip finished targets")
    output.add_argument("--log", nargs=2, default=None, metavar=("KIND", "DIR"),
                        help="also log each target's loss curve, image and references: tensorboard DIR (the "
                        "tensorboard extra; `tensorboard --logdir DIR`), as batches finish (a sweep: at its end)")
    method.add_argument("--lrp-every", type=int, default=None, metavar="K",
                        help="relevance of the synthetic image every K steps (default: the preset's, 1)")
    schedule.add_argument("--loss-every", type=int, default=None, metavar="K",
                          help="read the losses from the device every K steps (progress and early stopping follow it; the "
                          "images do not; default: 10)")
    method.add_argument("--class-relevance", action="store_true",
                        help="weight class targets' features by LRP relevance from the class logit (off: the paper)")
    method.add_argument("--channel-relevance", action="store_true",
                        help="weight channel (unit) targets' features by LRP relevance to the unit, as the paper does (the "
                        "paper preset's default; the fast preset matches without it, which measured better)")
    method.add_argument("--config", default=None, metavar="FILE",
                        help="settings from a TOML or JSON file (.json: JSON, else TOML): setting names at the top level, "
                        "e.g. lr = 0.1 or stages = [[0.5, 60], [1.0, 90]]; applied over the preset")
    method.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="set_items",
                        help="one setting (repeatable), e.g. --set lr=0.1 --set flip=false --set 'stages=[[1.0, 50]]' "
                        "(lists as JSON). Order: the preset, then --config, then each --set, then --steps (which scales "
                        "the resulting stages), --lrp-every, --class-relevance, --channel-relevance, --channel-refs")


def settings_from_args(args):
    from vital_fast.cli.settings_args import apply_overrides
    from vital_fast.optim import get_preset, settings_with_param

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
        if s.channel_later_weight > 0:  # relevance starts at the unit's layer: the layers after it have none
            print(f"vital-fast: note: --channel-relevance leaves out the matched layers after the unit "
                  f"(channel_later_weight {s.channel_later_weight} of the {args.preset} preset set to 0)",
                  file=sys.stderr)
        s = s.replace(channel_relevance=True, channel_later_weight=0.0)
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
    if getattr(args, "param", None) is not None:  # VITAL's parametrization has one home, Settings.param
        try:
            s = settings_with_param(getattr(args, "method", "vital"), s, args.param)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    return s


def scaled_stages(s, steps: int) -> dict:
    """The stage schedule of settings ``s`` scaled to exactly ``steps`` steps (:meth:`Settings.with_steps`), as
    ``replace`` arguments."""
    t = s.with_steps(steps)
    return {"stages": t.stages, "warmup": t.warmup}


def cache_from_args(args):
    from vital_fast.references.cache import DiskCache

    return DiskCache(args.cache, enabled=not args.no_cache)


def check_out(args) -> None:
    """The run-folder checks that need no model: writable, not in use, ours to write (writes nothing)."""
    from vital_fast.runfolder import precheck_run_folder

    try:
        precheck_run_folder(args.out, resume=args.resume, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def owned_folder(args, loaded, settings, method: str):
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


def device_from_args(args):
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


def pending(args, targets):
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


def check_preset(loaded) -> None:
    """The family's matched layers fit the model, or one line saying how to pass them (exit 2)."""
    from vital_fast.models import default_layers

    try:
        default_layers(loaded)
    except ValueError as exc:
        raise UsageError(f"{str(exc).split(';')[0]}; pass the matched layers with --layers L1,L2,... "
                         f"(`vital-fast layers {loaded.name}` lists them)") from None


def run_targets(args, loaded, targets, refs, settings, identity, extra=None) -> int:
    from vital_fast.cli.jobs import run_into_folder
    from vital_fast.cli.progress_bar import Progress
    from vital_fast.report.gallery import build_gallery

    bar = Progress(max(1, len(range(0, len(targets), args.batch)) * settings.steps), label="optimizing")
    if targets:
        run_into_folder(loaded, targets, refs, args.out, settings, seed=args.seed, batch=args.batch,
                        cache=cache_from_args(args), preset=args.preset, size=args.size, on_step=bar.update,
                        extra=dict(extra or {}, run=identity), method=getattr(args, "method", "vital"),
                        param=getattr(args, "param", None), class_layers=getattr(args, "class_layers", None),
                        on_batch=lambda: log_run(args))
    if os.path.isfile(os.path.join(args.out, "manifest.json")):
        index = build_gallery(args.out)
        log_run(args)
        print(f"wrote {args.out} (gallery: {index})")
    return EXIT_OK


def check_log_args(args) -> None:
    """``--log KIND DIR``: a known logger whose package is installed (one line and exit 2 otherwise)."""
    if getattr(args, "log", None):
        from vital_fast.report.tensorboard import check_log

        try:
            check_log(*args.log)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def log_run(args) -> None:
    """``--log tensorboard DIR``: the run folder's targets not logged yet, to DIR."""
    if getattr(args, "log", None) and os.path.isfile(os.path.join(args.out, "manifest.json")):
        from vital_fast.report.tensorboard import log_run_folder

        n = log_run_folder(args.out, args.log[1])
        if n:
            print(f"logged {n} target(s) to {args.log[0]} {args.log[1]}", file=sys.stderr)


def load_from_args(args):
    from vital_fast.models import load_model

    weights = "random" if getattr(args, "random_weights", False) else "pretrained"
    return load_model(args.model, weights=weights, arch=getattr(args, "arch", None),
                      device=device_from_args(args) if hasattr(args, "device") else "cpu", labels=getattr(args, "labels", None),
                      family=getattr(args, "family", None))


def method_label(args) -> str:
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
