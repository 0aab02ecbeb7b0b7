"""End-to-end optimizer speed: seconds per target per step, batched vs single vs the paper's loop.

    python -m benchmarks.bench_visualize [--models resnet50 efficientnet-lite0] [--size 224] [--steps 3]
                                         [--amp off bf16] [--compile off on] [--kinds class channel]
                                         [--relevance-forward shared separate shared-fp32]
                                         [--channels-last auto off]
                                         [--prototype-resample stage step]
                                         [--no-single] [--no-paper]
    python -m benchmarks.bench_visualize --overhead [--batches 1 8 64] [--steps 20] [--rounds 3]
    python -m benchmarks.bench_visualize --counts [--models efficientnet-lite0] [--size 64] [--batches 2 8]

For each model (ResNet-50 with random weights, since pretrained weights cannot be fetched here, and
efficientnet-lite0 with its ImageNet weights), in one process, interleaved:

* vital_fast, B = 8 targets in one pass, class targets and channel targets (relevance every step, from
  the step's own forward pass; ``--relevance-forward shared separate`` adds the way before, a second
  hooked forward, interleaved; ``shared-fp32`` the shared forward with its LRP rules in float32 under
  ``--amp bf16``, where they otherwise run in bfloat16);
* vital_fast, B = 1;
* for class targets, the network alone: a bare forward + backward up to the last matched layer
  (input gradient only, same batch, same precision): the floor a class step can reach;
* each of these once per ``--amp`` precision (``off`` float32, ``bf16``, ``fp16``), interleaved, and once
  per ``--channels-last`` layout (``Settings.channels_last``: ``auto``, the default, is channels-last for
  both models here; ``off`` the model's own);
* the vital_fast rows once per ``--compile`` value (``off`` eager, ``on`` inductor, or a torch dynamo
  backend), interleaved; with a compiled value the table adds the speed-up over the eager row of the same
  batch and precision (``vs eager``, eager s / compiled s) and ``compile s``: the time of the steps
  that compiled (the engine's ``compile_s``: the first step, forward and backward compiled in it),
  from the round that compiled; later rounds in the process reuse dynamo's compiled code. Compiled
  rows leave the first step out of the steady state like every row;
* a loop written the way the paper's public code works (DESIGN.md §5): one target at a time, the
  features of 50 reference images re-sorted inside the loss at every step, parameters requiring
  gradients; for channel targets, the reference features' graph retained and backpropagated
  through at every step, and relevance rebuilt every step on a deep copy of the model.

Only the optimization steps are timed (reference preparation is excluded for every row).

``--overhead`` prints only the engine's own overhead instead: a three-layer CNN at 32 px (random weights,
100 classes), where the network costs almost nothing, VITAL's ``fast`` preset with class targets at
B = 1, 8 and 64: seconds per step of the engine (timed between two reads of the loss record, as a run
goes) against the bare network's forward + backward at the same batch, their ratio, and the aten ops,
the ops on device tensors (kernel launches on a GPU) and the device reads per steady-state step
(:mod:`vital_fast.counting`). On a GPU this row decides throughput for small models.

``--counts`` prints only the ops and device reads per steady-state step of ``visualize`` for each of
``--models`` at ``--size``, class and channel targets, the ``fast`` preset, at each of ``--batches``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from vital_fast.models import FeatureTaps, default_layers, load_model
from vital_fast.optim import Settings, visualize
from vital_fast.models.facts import plan_layers_before
from vital_fast.oracle import paper_style_sort_match_loss
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, tensor_hash
from vital_fast.references.relevance import relevance_maps

CHANNEL_LAYER = {"resnet": "layer3", "efficientnet_lite": "_blocks.10"}
# --relevance-forward values: how a channel step's relevance is computed, as the table names it
RELEVANCE_HOW = {"shared": "shared forward", "separate": "separate forward",
                 "shared-fp32": "shared forward, float32 rules"}


def random_refs(key: str, n: int, size: int) -> ImageSet:
    g = torch.Generator().manual_seed(abs(hash(key)) % 2 ** 31)
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    return ImageSet(imgs, [f"{key}/{i}" for i in range(n)], [tensor_hash(i) for i in imgs])


PHASE_KEYS = ("views_s", "forward_s", "loss_s", "relevance_s", "backward_s", "update_s")
PHASES: dict = {}  # (batch, amp, compile) -> where the last timed run's step time went (the engine's phase timings)
COMPILE_S: dict = {}  # (batch, amp, compile) -> the largest compile_s seen (the round that compiled)


def time_network(loaded, targets, size, steps, amp: str = "off", layout: str = "auto") -> float:
    """A bare forward + backward of the network up to the last matched layer (input gradient only,
    same batch and precision): the floor a class step can reach. Seconds per target-step."""
    from vital_fast.optim.precision import autocast, resolve_amp

    from vital_fast.models.layout import ChannelsLast, resolve_channels_last

    layers = [l for l, _ in default_layers(loaded)]
    dtype = resolve_amp(amp, "cpu")
    x = torch.randn(max(2, len(targets)), 3, size, size)
    cl = resolve_channels_last(layout, loaded.family, "cpu")
    conv = ChannelsLast(loaded.model) if cl else None
    times = []
    try:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            xr = (ChannelsLast.input(x) if cl else x).clone().requires_grad_(True)
            with autocast(dtype, "cpu"), FeatureTaps(loaded.model, layers, stop_after=True) as taps:
                feats = taps.run(xr)
            sum(f.float().mean() for f in feats.values()).backward()
            if step:
                times.append(time.perf_counter() - t0)
    finally:
        if conv is not None:
            conv.restore()
    return statistics.median(times) / len(targets)


def time_vital(loaded, targets, size, steps, n_refs, amp: str = "off", compile: str = "off",
               relevance: str = "shared", layout: str = "auto", resample: str = "stage") -> float:
    # "step": the prototypes resampled to the features' row length inside the op at every step (the way before)
    # loss_every=1: a progress mark (and a loss read, free on the CPU) after every step, to time the steps after the first
    s = Settings(stages=[(1.0, steps + 1)], n_refs=n_refs, ref_crops=0, warmup=1, quantiles=256, lrp_every=1,
                 amp=amp, compile=compile, channels_last=layout, loss_every=1,
                 share_forward=relevance.startswith("shared"),
                 rules_dtype="float32" if relevance == "shared-fp32" else "auto",
                 resample_cache_mb=256 if resample == "stage" else 0)
    refs = {t: random_refs(t, n_refs, size) for t in targets}
    marks = []
    res = visualize(loaded, targets, refs, settings=s, size=size, cache=DiskCache(enabled=False),
                    progress=lambda i, n, l: marks.append(time.perf_counter()))
    key = (len(targets), amp, (compile if relevance == "shared" else f"{compile}/{relevance}")
           + ("" if layout == "auto" else f"/layout {layout}") + ("" if resample == "stage" else "/resample step"))
    PHASES[key] = {k: res.timings.get(k, 0.0) for k in PHASE_KEYS}
    if "compile_s" in res.timings:
        COMPILE_S[key] = max(COMPILE_S.get(key, 0.0), res.timings["compile_s"])
    # the first step warms up (allocations, relevance composite); time the rest
    return (marks[-1] - marks[0]) / (len(marks) - 1) / len(targets)


def time_paper_loop(loaded, target: str, size: int, steps: int, n_refs: int) -> float:
    """One target, the paper code's way. Returns seconds per step."""
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(True)  # the paper's code never freezes the model
    try:
        kind = target.split(":")[0]
        if kind == "class":
            layers = [l for l, _ in default_layers(loaded)]
        else:
            _, tl, ch = target.split(":")
            layers = [l for l, _ in plan_layers_before(loaded, tl, default_layers(loaded), 0.1)]
        refs = torch.stack(random_refs(target, n_refs, size).images)
        with FeatureTaps(model, layers) as taps:
            if kind == "class":
                with torch.no_grad():
                    ref_feats = {l: [] for l in layers}
                    for i in range(0, n_refs, 10):
                        out = taps.run(loaded.normalize(refs[i:i + 10]))
                        for l in layers:
                            ref_feats[l].append(out[l])
                    ref_feats = {l: torch.cat(v) for l, v in ref_feats.items()}
            else:
                # reference features kept with their graph (the paper's code backpropagates through it)
                out = taps.run(loaded.normalize(refs))
                ref_feats = {l: out[l] for l in layers}
        x = torch.randn(1, 3, size, size, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.05, betas=(0.5, 0.9))
        times = []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            xt = torch.roll(x, shifts=(3, -2), dims=(2, 3))
            if kind == "channel":
                # relevance rebuilt on a deep copy of the model every step
                rel = relevance_maps(copy.deepcopy(model), xt.detach(), tl, torch.tensor([int(ch)]), layers,
                                     family=loaded.family)
            with FeatureTaps(model, layers) as taps:
                feats = taps.run(xt)
            loss = 0
            for l in layers:
                f = feats[l] * (rel[l] / rel[l].amax().clamp_min(1e-6)) if kind == "channel" else feats[l]
                loss = loss + paper_style_sort_match_loss(f, ref_feats[l])
            opt.zero_grad()
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=kind == "channel")
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)


class OverheadNet(torch.nn.Module):
    """Three convolutions and a 100-class head: a network that costs almost nothing at 32 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32, 100)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


OVERHEAD_LAYERS = [("conv1", 1.0), ("conv2", 1.0), ("conv3", 1.0)]


def overhead_measure(batches, steps: int, rounds: int, device: str = "cpu", sync=lambda: None):
    """The engine's overhead over the bare network (see the module docstring) on ``device``: one dict a batch
    size (``B``, ``engine_s``, ``network_s``, ``ratio``, ``ops``, ``device_ops``, ``reads`` per step);
    ``sync`` ends each timed stretch (``torch.cuda.synchronize`` on a GPU)."""
    from vital_fast.counting import steady_state_counts
    from vital_fast.optim import get_preset

    torch.manual_seed(0)
    loaded = load_model(OverheadNet().eval(), input_size=32, resize_size=32, device=device)
    cache = DiskCache(enabled=False)

    def settings(n):
        return get_preset("fast").replace(stages=[(1.0, n)], n_refs=4, ref_crops=0)

    def targets(B):
        if B > 100:
            raise ValueError(f"overhead rows: at most 100 class targets, got B = {B}")
        tg = [f"class:{i}" for i in range(B)]
        return tg, {t: random_refs(t, 4, 32) for t in tg}

    def engine_step(B):
        tg, refs = targets(B)
        marks = []

        def mark(i, n, losses):
            sync()
            marks.append((i, time.perf_counter()))

        # reads (and marks) at steps `every`, 2 `every` and the end: timed from the first read to the end,
        # with the default loss_every when steps >= 20
        every = min(10, max(1, steps // 2))
        visualize(loaded, tg, refs, settings=settings(2 * every + 1).replace(loss_every=every), size=32, cache=cache,
                  class_layers=OVERHEAD_LAYERS, progress=mark)
        (i0, t0), (i1, t1) = marks[0], marks[-1]
        return (t1 - t0) / (i1 - i0)

    def network_step(B):
        x = torch.rand(B, 3, 32, 32, device=device, requires_grad=True)
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            x.grad = None
            loaded.model(x).sum().backward()
        sync()
        return (time.perf_counter() - t0) / steps

    got = {(B, k): [] for B in batches for k in ("engine", "network")}
    for _ in range(rounds):  # interleaved
        for B in batches:
            got[(B, "engine")].append(engine_step(B))
            got[(B, "network")].append(network_step(B))
    rows = []
    for B in batches:
        tg, refs = targets(B)
        c = steady_state_counts(lambda n: visualize(loaded, tg, refs, settings=settings(n), size=32, cache=cache,
                                                    class_layers=OVERHEAD_LAYERS, progress=False), 10, [loaded.model])
        e, n = statistics.median(got[(B, "engine")]), statistics.median(got[(B, "network")])
        rows.append({"B": B, "engine_s": e, "network_s": n, "ratio": e / n, "ops": c["ops"],
                     "device_ops": c["device_ops"], "reads": c["reads"]})
    return rows


def overhead_rows(batches, steps: int, rounds: int) -> None:
    """:func:`overhead_measure` on the CPU, as a markdown table."""
    rows = overhead_measure(batches, steps, rounds)
    print(f"overhead: 3-layer CNN, 32 px, fast preset, class targets, {steps} timed steps, median of {rounds} "
          f"interleaved rounds, {torch.get_num_threads()} threads")
    print("| B | engine s/step | network fwd+bwd s/step | engine / network | aten ops/step | device ops/step "
          "| device reads/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['B']} | {r['engine_s']:.5f} | {r['network_s']:.5f} | {r['ratio']:.1f}x | {r['ops']:.0f} | "
              f"{r['device_ops']:.0f} | {r['reads']:.2f} |", flush=True)


def count_rows(models, size: int, batches, kinds) -> None:
    """Aten ops, ops on device tensors and device reads per steady-state step (one 20-step and one 40-step
    run after a warm-up), as a markdown table."""
    from vital_fast.counting import steady_state_counts
    from vital_fast.optim import get_preset

    print(f"per steady-state step of visualize, fast preset, {size} px")
    print("| model | target kind | B | aten ops | device ops | device reads |")
    print("|---|---|---:|---:|---:|---:|")
    for name in models:
        loaded = load_model(name, weights="random" if name.startswith(("torchvision:", "timm:")) else "pretrained")
        layer = CHANNEL_LAYER.get(loaded.family, default_layers(loaded)[-2][0])
        for kind in kinds:
            for B in batches:
                tg = [f"class:{i * 7}" if kind == "class" else f"channel:{layer}:{i}" for i in range(B)]
                refs = {t: random_refs(t, 3, size) for t in tg}

                def run(n):
                    s = get_preset("fast").replace(stages=[(1.0, n)], n_refs=3, ref_crops=0)
                    visualize(loaded, tg, refs, settings=s, size=size, cache=DiskCache(enabled=False), progress=False)

                c = steady_state_counts(run, 20, [loaded.model])
                print(f"| {name} | {kind} | {B} | {c['ops']:.0f} | {c['device_ops']:.0f} | {c['reads']:.2f} |",
                      flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["torchvision:resnet50", "efficientnet-lite0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--refs", type=int, default=50, help="reference images per target (paper: 50)")
    ap.add_argument("--paper-refs", type=int, default=None, help="references in the paper loop (default: --refs)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    ap.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16", "auto"],
                    help="precisions to time (e.g. --amp off bf16: float32 and bfloat16 rows, interleaved)")
    ap.add_argument("--compile", nargs="+", default=["off"], metavar="off|on|BACKEND",
                    help="Settings.compile values to time (e.g. --compile off on: eager and inductor rows, "
                    "interleaved); adds the speed-up over eager and the compile time")
    ap.add_argument("--kinds", nargs="+", default=["class", "channel"], choices=["class", "channel"],
                    help="target kinds to time (default: both)")
    ap.add_argument("--relevance-forward", nargs="+", default=["shared"], choices=list(RELEVANCE_HOW),
                    help="channel rows: relevance from the step's own forward pass (shared, the default) and/or "
                    "from a second hooked forward (separate, the way before) and/or the shared forward with "
                    "float32 rules under bf16 (shared-fp32); several: interleaved rows")
    ap.add_argument("--channels-last", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                    help="Settings.channels_last values to time (e.g. --channels-last off auto: the model's own "
                    "layout and channels-last, interleaved; the network rows follow)")
    ap.add_argument("--prototype-resample", nargs="+", default=["stage"], choices=["stage", "step"],
                    help="B=8 rows: prototypes resampled to each layer's row length once per stage (the default) "
                    "and/or inside the op at every step (step, the way before); both: interleaved rows")
    ap.add_argument("--no-single", action="store_true", help="skip the B=1 rows")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-style loop rows")
    ap.add_argument("--overhead", action="store_true",
                    help="only the engine's overhead on a tiny CNN at 32 px (--batches, --steps, --rounds)")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="--overhead: batch sizes (default 1 8 64); --counts: (default 2 8)")
    ap.add_argument("--counts", action="store_true",
                    help="only the ops and device reads per steady-state step (--models, --size, --kinds, --batches)")
    a = ap.parse_args(argv)
    if a.counts:
        torch.set_num_threads(a.threads)
        count_rows(a.models, a.size, a.batches or [2, 8], a.kinds)
        return 0
    if a.overhead:
        torch.set_num_threads(a.threads)
        overhead_rows(a.batches or [1, 8, 64], max(a.steps, 10), a.rounds)
        return 0
    from vital_fast.models.compiled import resolve_compile

    for c in a.compile:
        try:
            resolve_compile(c)
        except ValueError as exc:
            ap.error(f"--compile {c}: {exc}")
    compiled = any(c != "off" for c in a.compile)
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, {a.size} px, {a.steps} timed steps, {a.refs} references per target"
          + (f", compile {' '.join(a.compile)}" if compiled else ""))
    extra_head, extra_rule = (" vs eager | compile s |", "---:|---:|") if compiled else ("", "")
    print(f"| model | target kind | provider | s per target-step | vs paper loop | vs B=1 |{extra_head}")
    print(f"|---|---|---|---:|---:|---:|{extra_rule}")
    for name in a.models:
        loaded = load_model(name, weights="random" if name.startswith(("torchvision:", "timm:")) else "pretrained")
        layer = CHANNEL_LAYER.get(loaded.family, default_layers(loaded)[-2][0])
        for kind in a.kinds:
            tg = [f"class:{i * 7}" if kind == "class" else f"channel:{layer}:{i}" for i in range(a.batch)]
            provs = {}
            if not a.no_paper:
                provs["paper-style loop (B=1)"] = lambda: time_paper_loop(loaded, tg[0], a.size, a.steps,
                                                                          a.paper_refs or a.refs)
            meta = {}  # provider -> (batch, amp, compile) of a vital_fast row
            for amp, lay in [(amp, lay) for lay in a.channels_last for amp in a.amp]:
                tag = ("" if amp == "off" else f" {amp}") + ("" if lay == "auto" else f" layout={lay}")
                for comp in a.compile:
                    ctag = tag + ("" if comp == "off" else f" compile={comp}")
                    if not a.no_single:
                        provs[f"vital_fast B=1{ctag}"] = lambda amp=amp, comp=comp, lay=lay: time_vital(
                            loaded, tg[:1], a.size, a.steps, a.refs, amp, comp, layout=lay)
                        meta[f"vital_fast B=1{ctag}"] = (1, f"{amp}/{lay}", comp)
                    provs[f"vital_fast B={a.batch}{ctag}"] = lambda amp=amp, comp=comp, lay=lay: time_vital(
                        loaded, tg, a.size, a.steps, a.refs, amp, comp, layout=lay)
                    meta[f"vital_fast B={a.batch}{ctag}"] = (a.batch, f"{amp}/{lay}", comp)
                    if "step" in a.prototype_resample:
                        if "stage" not in a.prototype_resample:
                            del provs[f"vital_fast B={a.batch}{ctag}"], meta[f"vital_fast B={a.batch}{ctag}"]
                        rs = f"vital_fast B={a.batch}{ctag} prototypes resampled every step"
                        provs[rs] = lambda amp=amp, comp=comp, lay=lay: time_vital(
                            loaded, tg, a.size, a.steps, a.refs, amp, comp, layout=lay, resample="step")
                        meta[rs] = (a.batch, f"{amp}/{lay}", comp + "/resample step")
                    if kind == "channel" and "shared" not in a.relevance_forward:
                        del provs[f"vital_fast B={a.batch}{ctag}"], meta[f"vital_fast B={a.batch}{ctag}"]
                    for how in a.relevance_forward if kind == "channel" else ():
                        if how == "shared":
                            continue
                        sep = f"vital_fast B={a.batch}{ctag} relevance: {RELEVANCE_HOW[how]}"
                        provs[sep] = lambda amp=amp, comp=comp, lay=lay, how=how: time_vital(
                            loaded, tg, a.size, a.steps, a.refs, amp, comp, how, lay)
                        meta[sep] = (a.batch, f"{amp}/{lay}", f"{comp}/{how}")
                if kind == "class":
                    provs[f"network fwd+bwd B={a.batch}{tag}"] = lambda amp=amp, lay=lay: time_network(
                        loaded, tg, a.size, a.steps, amp, lay)
            # interleaved rounds: machine noise hits every provider alike; the median per provider
            got = {k: [] for k in provs}
            for _ in range(a.rounds):
                for k, fn in provs.items():
                    got[k].append(fn())
            med = {k: statistics.median(v) for k, v in got.items()}
            paper, one = med.get("paper-style loop (B=1)"), med.get("vital_fast B=1", next(iter(med.values())))
            one = None if a.no_single else one
            eager = {m[:2]: med[p] for p, m in meta.items() if m[2] == "off"}  # "off/separate" is no eager row
            for prov, v in med.items():
                vs_paper = f"{paper / v:.1f}x" if paper else "-"
                extra = ""
                if compiled:
                    m = meta.get(prov)
                    if m is None or m[2].split("/")[0] == "off":  # the meta of a vital_fast row: (batch, amp, compile)
                        extra = " - | - |"
                    else:
                        vs_eager = f"{eager[m[:2]] / v:.2f}x" if m[:2] in eager else "-"
                        extra = f" {vs_eager} | {COMPILE_S.get(m, 0.0):.1f} |"
                vs_one = f"{one / v:.2f}x" if one else "-"
                print(f"| {name} | {kind} | {prov} | {v:.4f} | {vs_paper} | {vs_one} |{extra}", flush=True)
            for (b, amp, comp), ph in sorted(PHASES.items()):
                tot = sum(ph.values()) or 1.0
                base, *hows = comp.split("/")
                ctag = ("" if base == "off" else f", compile {base}") + "".join(
                    f", {h}" if h.startswith(("layout", "resample")) else f", relevance: {RELEVANCE_HOW[h]}" for h in hows)
                print(f"  where a {kind} step of B={b} ({amp}{ctag}) goes: "
                      + ", ".join(f"{k[:-2]} {100 * v / tot:.0f}%" for k, v in ph.items()), flush=True)
            PHASES.clear()
            COMPILE_S.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
