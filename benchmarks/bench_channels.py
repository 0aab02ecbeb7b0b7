"""Channel quality: do channel visualizations show what the channel sees? (issue: weak channel images)

    python -m benchmarks.bench_channels [--layers _blocks.4 _blocks.10] [--channels 16] [--seeds 0 1 2]
                                        [--methods vital actmax fourier maco] [--vital NAME:KEY=VALUE;...]
                                        [--out runs/bench-channels] [--figure channels.png] [--threads 2]

The pool: a few hundred crops of real photographs that work offline: the nine photographs shipped in
scikit-image, scikit-learn and matplotlib, plus the photographs of Debian's wallpaper packages when they
are installed (``apt-get install mate-backgrounds lomiri-wallpapers plasma-workspace-wallpapers``; :data:`DEBIAN_PHOTOS` names the
files; without them the pool is the nine photographs' crops and the table says so). Each photograph
gives ``--crops`` seeded random resized crops at the model's input size.

The channels, by a rule fixed in advance: for each layer, every channel's spatial-max activation on every
pool image; a channel's selectivity is (mean of its top-k − mean over the pool) / std over the pool; the
``--channels`` most selective are visualized. Their references are the top-k patches at the unit, from ``k``
distinct photographs (the best crop of each; ``--no-distinct``: any crops, the earlier benchmark, which copying
one photograph's crops could win)
(``channel_refs`` of the settings: patches around the best location, sized to the receptive field, or
the full crops); the minimally activating patches are the k images with the lowest spatial max, cut the
same way around their own best location.

Every method runs at the same step budget (the ``fast`` preset's schedule) on the same targets, references
and seeds. Per layer and method, over all seeds:

- 2-AFC own vs other (:func:`vital_fast.evaluate.afc.two_afc`, judge efficientnet-lite2): is a
  visualization closer, in the judge's penultimate features, to its own channel's top-k patches than to
  another channel's? ``n (n − 1)`` trials per seed; Wilson 95 % interval.
- 2-AFC max vs min: is it closer to its channel's maximally than to its minimally activating patches?
  One trial per channel and seed.
- activation: the channel's spatial max on the visualization over its mean on the top-k references.
- specificity: how often a channel's visualization drives that channel harder than the other channels'
  visualizations do, and the median ratio of its own drive to the strongest other's
  (:mod:`vital_fast.evaluate.specificity`);
- copy: the judge-feature similarity of a visualization to its nearest reference patch over the patches' own
  nearest-neighbour similarity (well above 1: it reproduces one patch);
- FD: Fréchet distance, in the judge's features, between the visualizations and the reference patches.

Besides the methods, with the patch row (the default): ``patch (held out)``, a real top-k patch in place of a
visualization against the channels' other patches; ``mosaic of 4 top-k``, four of a channel's top-k patches
pasted as the quadrants of one image, against all k (what an image made of pieces of its references scores);
and ``mosaic, other 4 held out``, the same images against the four patches they hold none of. ``--crop-row``: for
each VITAL variant, ``NAME, strongest crop``, the square of the receptive field around the channel's strongest
position on its visualization, resized as the patches are (the image cut as its references were).

``--vital NAME:KEY=VALUE;...`` adds a VITAL variant with settings overrides (e.g.
``--vital images:channel_refs=image`` or ``--vital lrp4:lrp_every=4``); values are parsed as Python
literals. The key ``size`` sets the visualization's side instead (pixels, or ``rf``: the layer's
receptive field, so that patches are matched at their own scale, not enlarged to the input size); the key
``rules`` (``bfloat16``, the default, or ``float32``) the precision of the shared forward's LRP rules under
``amp='bf16'`` (``Settings.rules_dtype``), e.g. ``--vital "fp32rules:amp='bf16';rules='float32'"``. Runs are saved under ``--out`` (one ``.pt`` per layer, method and seed) and reused when the
same command is repeated, so a table can be recomputed without optimizing again.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from vital_fast.evaluate.afc import judge_features, max_min_afc, two_afc, wilson_interval
from vital_fast.evaluate.metrics import frechet_distance
from vital_fast.evaluate.specificity import copy_index, specificity
from vital_fast.models import FeatureTaps, load_model
from vital_fast.optim import get_preset, visualize
from vital_fast.references.cache import DiskCache
from vital_fast.references.images import ImageSet, load_image, offline_photo_paths, random_resized_crops
from vital_fast.references.mining import crop_patch, receptive_field

# Photographs (not drawings) among the wallpapers of Debian's packages mate-backgrounds and lomiri-wallpapers.
DEBIAN_PHOTOS = [
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
    "/usr/share/backgrounds/Dragonfly_by_Bolly.jpg",
    "/usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg",
    "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
    "/usr/share/backgrounds/Picture_0B_by_freespace.jpg",
    "/usr/share/backgrounds/Picture_1A_by_freespace.jpg",
    "/usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg",
    "/usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",
    "/usr/share/backgrounds/free_by_Peter_Nerlich.jpg",
    "/usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
    "/usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
] + [f"/usr/share/backgrounds/mate/nature/{n}.jpg" for n in (
    "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
    "TwoWings", "Wood", "YellowFlower")] + [f"/usr/share/wallpapers/{n}/contents/images/{s}.jpg" for n, s in (
    # photographs of plasma-workspace-wallpapers (the largest size of each)
    ("ColdRipple", "2560x1600"), ("DarkestHour", "2560x1600"), ("EveningGlow", "2560x1600"),
    ("FallenLeaf", "2560x1600"), ("Grey", "2560x1600"), ("Kite", "2560x1600"), ("OneStandsOut", "2560x1600"),
    ("Path", "2560x1600"), ("Volna", "5120x2880"), ("summer_1am", "2560x1600"))]

METHODS = ("vital", "actmax", "fourier", "maco")


def build_pool(size: int, crops: int, seed: int = 0) -> Tuple[ImageSet, int]:
    """Seeded random resized crops of every offline photograph; returns the pool and the photograph count."""
    paths = offline_photo_paths() + [p for p in DEBIAN_PHOTOS if os.path.isfile(p)]
    g = torch.Generator().manual_seed(seed)
    images, names = [], []
    for p in paths:
        img = load_image(p)
        short = min(img.shape[1:])
        if short > 2 * size:  # large wallpapers: bring the short side to 2x the input size first
            img = torch.nn.functional.interpolate(img[None], scale_factor=2 * size / short, mode="bilinear",
                                                  antialias=True, align_corners=False)[0].clamp(0, 1)
        for j, c in enumerate(random_resized_crops(img, size, crops, g)):
            images.append(c)
            names.append(f"{os.path.basename(p)}#{j}")
    hashes = [hashlib.sha256(n.encode()).hexdigest()[:16] for n in names]
    return ImageSet(images, names, hashes), len(paths)


@torch.no_grad()
def pool_scores(model, layer: str, pool: ImageSet, batch: int = 16):
    """Every channel's spatial max on every pool image, ``(N, C)``, with its location ``(N, C, 2)`` and the grid."""
    scores, locs, grid = [], [], None
    with FeatureTaps(model.model, [layer], detach=True, stop_after=True) as taps:
        for i in range(0, len(pool), batch):
            x = torch.stack(pool.images[i:i + batch])
            a = taps.run(model.normalize(x))[layer].float()
            grid = tuple(a.shape[2:])
            flat = a.flatten(2)
            s, idx = flat.max(2)
            scores.append(s)
            locs.append(torch.stack([idx // grid[1], idx % grid[1]], -1))
    return torch.cat(scores), torch.cat(locs), grid


def pick_channels(scores: torch.Tensor, k: int, n: int) -> List[int]:
    """The ``n`` most selective channels: (mean of the top k − pool mean) / pool std, highest first."""
    top = scores.topk(k, dim=0).values.mean(0)
    sel = (top - scores.mean(0)) / scores.std(0).clamp_min(1e-6)
    return sel.topk(min(n, scores.shape[1])).indices.tolist()


def patches(model, pool: ImageSet, idx, locs, grid, rf: int, size: int, mode: str) -> List[torch.Tensor]:
    if mode == "image":
        return [pool.images[i] for i in idx]
    return [crop_patch(model, pool.images[i], loc, grid, rf, size) for i, loc in zip(idx, locs)]


# Settings that only VITAL's loss reads: a baseline's saved run is keyed without them, so that a change to the
# preset's VITAL terms does not rerun the baselines.
VITAL_ONLY = ("channel_activation_weight", "channel_activation_norm", "channel_activation_top", "channel_activation_rfs",
              "channel_later_weight",
              "channel_later_layers", "channel_later_stages", "channel_later_every", "class_logit_weight")
# Settings added after runs were saved: left out of the key at their default, so that those runs stay valid
# (fold_batchnorm changes images only by rounding).
KEY_OMITS_AT_DEFAULT = {"channel_later_stages": 0, "channel_later_every": 1, "fold_batchnorm": "auto",
                        "channel_prototype": "mean", "channel_activation_top": 1.0, "channel_activation_rfs": 0.0}


def run_key(model: str, layer: str, chans: Sequence[int], method: str, s, vsize, seed: int, n_pool: int,
            k: int) -> str:
    """The saved run's key: everything that makes its images."""
    d = s.to_dict()
    for f, default in KEY_OMITS_AT_DEFAULT.items():
        if d.get(f) == default:
            d.pop(f)
    if method != "vital":
        for f in VITAL_ONLY:
            d.pop(f, None)
    return hashlib.sha256(json.dumps([model, layer, list(chans), method, sorted(d.items()), vsize, seed, n_pool, k],
                                     default=str).encode()).hexdigest()[:12]


def parse_variant(text: str) -> Tuple[str, Dict]:
    name, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(";")):
        key, _, val = item.partition("=")
        try:
            kw[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            kw[key.strip()] = val.strip()
    return name, kw


def drive_matrix(model, images: torch.Tensor, layer: str, chans: Sequence[int]) -> torch.Tensor:
    """``(n, n)``: the spatial max of channel ``chans[j]`` on image ``i`` (image i made for channel ``chans[i]``)."""
    with torch.no_grad(), FeatureTaps(model.model, [layer], stop_after=True) as taps:
        a = taps.run(model.normalize(images))[layer].float()
    return a[:, torch.tensor(chans)].flatten(2).amax(2)


def channel_activation(model, images: torch.Tensor, layer: str, chans: Sequence[int]) -> torch.Tensor:
    return drive_matrix(model, images, layer, chans).diagonal()


def patch_row(model, layer: str, chans: Sequence[int], maxp, ref_feats, mean_top) -> dict:
    """The row of a real patch shown in place of a visualization (leave-one-out): for each ``j`` of the top-k, channel
    c's ``j``-th patch against every channel's other patches. What a method that drew one more top-k patch would
    score: the ceiling the benchmark's judge and pool allow, printed as method ``patch (held out)``."""
    k = min(len(maxp[c]) for c in chans)
    afc_k = afc_n = 0.0
    spec, ratios, acts = [], [], []
    for j in range(k):
        keep = [i for i in range(k) if i != j]
        r = two_afc([ref_feats[c][j] for c in chans], [ref_feats[c][keep] for c in chans])
        afc_k, afc_n = afc_k + r["n_correct"], afc_n + r["n_trials"]
        drive = drive_matrix(model, torch.stack([maxp[c][j] for c in chans]), layer, chans)
        acts.append(drive.diagonal() / mean_top.clamp_min(1e-6))
        frac, _, rat = specificity(drive.double().numpy())
        spec.append(frac)
        ratios += [float(v) for v in rat if np.isfinite(v)]
    lo, hi = wilson_interval(afc_k, int(afc_n))
    row = {"layer": layer, "method": "patch (held out)", "afc": afc_k / afc_n, "afc_ci": [lo, hi],
           "afc_trials": int(afc_n), "minmax": float("nan"), "minmax_ci": [float("nan")] * 2, "minmax_trials": 0,
           "activation": float(torch.cat(acts).mean()), "activation_median": float(torch.cat(acts).median()),
           "fd": float("nan"), "specificity": float(np.mean(spec)), "spec_ratio": float(np.median(ratios)),
           "copy": float("nan"), "s_per_target_step": float("nan"), "settings": {}}
    print(f"| {layer} | {row['method']} | {100 * row['afc']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] | - | "
          f"{row['activation']:.2f} | {100 * row['specificity']:.0f} % | {row['spec_ratio']:.2f} | - | - | - |",
          flush=True)
    return row


def strongest_crops(model, images: torch.Tensor, layer: str, chans: Sequence[int], rf: int, size: int):
    """Image i's square of ``rf`` pixels around channel ``chans[i]``'s strongest position, resized to ``size``:
    the visualization cut as its references were."""
    with torch.no_grad(), FeatureTaps(model.model, [layer], stop_after=True) as taps:
        a = taps.run(model.normalize(images))[layer].float()
    h, w = a.shape[-2:]
    side = max(1, min(rf, images.shape[-1]))
    out = []
    for i, c in enumerate(chans):
        y, x = divmod(int(a[i, c].flatten().argmax()), w)
        cy, cx = (y + 0.5) * images.shape[-2] / h, (x + 0.5) * images.shape[-1] / w
        y0 = int(round(min(max(cy - side / 2, 0), images.shape[-2] - side)))
        x0 = int(round(min(max(cx - side / 2, 0), images.shape[-1] - side)))
        out.append(torch.nn.functional.interpolate(images[i:i + 1, :, y0:y0 + side, x0:x0 + side], size=(size, size),
                                                   mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1))
    return out


def mosaic(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Four images as the quadrants of one ``size`` x ``size`` image."""
    h = size // 2
    t = [torch.nn.functional.interpolate(im[None], size=(h, h), mode="bilinear", antialias=True,
                                         align_corners=False)[0] for im in images]
    out = torch.cat([torch.cat(t[:2], 2), torch.cat(t[2:4], 2)], 1)
    return torch.nn.functional.interpolate(out[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def mosaic_rows(judge, layer: str, chans: Sequence[int], maxp, ref_feats, size: int) -> List[dict]:
    """Two rows of real patches pasted together in place of a visualization: each channel's first four top-k
    patches as the quadrants of one image (and its last four), judged against all k (``mosaic of 4 top-k``:
    what an image made of pieces of its references scores) and against the other four only (``mosaic, other 4
    held out``). The first says how much this 2-AFC rewards reproducing the references, the second what the
    same kind of image scores on patches it was not made of."""
    k = min(len(maxp[c]) for c in chans)
    if k < 8:
        return []
    halves = [list(range(4)), list(range(4, 8))]
    rows = []
    for name, held in (("mosaic of 4 top-k", False), ("mosaic, other 4 held out", True)):
        afc_k = afc_n = 0.0
        feats = []
        for h, rest in (halves, halves[::-1]):
            vf = judge_features(judge, [mosaic([maxp[c][i] for i in h], size) for c in chans], "vis")
            refs = [ref_feats[c][rest] if held else ref_feats[c] for c in chans]
            r = two_afc(list(vf), refs)
            afc_k, afc_n = afc_k + r["n_correct"], afc_n + r["n_trials"]
            feats.append(vf)
        lo, hi = wilson_interval(afc_k, int(afc_n))
        copies = [copy_index(f[i], ref_feats[c]) for f in feats for i, c in enumerate(chans)]
        fd = frechet_distance(np.concatenate(feats), np.concatenate([ref_feats[c] for c in chans]))
        row = {"layer": layer, "method": name, "afc": afc_k / afc_n, "afc_ci": [lo, hi], "afc_trials": int(afc_n),
               "minmax": float("nan"), "minmax_ci": [float("nan")] * 2, "minmax_trials": 0,
               "activation": float("nan"), "activation_median": float("nan"), "fd": fd, "specificity": float("nan"),
               "spec_ratio": float("nan"), "copy": float(np.mean(copies)), "s_per_target_step": float("nan"),
               "settings": {}}
        print(f"| {layer} | {name} | {100 * row['afc']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] | - | - | - | - | "
              f"{row['copy']:.2f} | {fd:.1f} | - |", flush=True)
        rows.append(row)
    return rows


def topk_indices(scores: torch.Tensor, k: int, crops: int, distinct: bool, largest: bool = True) -> torch.Tensor:
    """Per channel (a column of ``scores`` ``(N, n)``), the ``k`` highest (or lowest) crops; with ``distinct``, from
    ``k`` different photographs (crop ``i`` comes from photograph ``i // crops``): the best crop of each."""
    order = scores.argsort(dim=0, descending=largest)  # (N, n)
    if not distinct:
        return order[:k].t()
    out = []
    for j in range(scores.shape[1]):
        seen, picked = set(), []
        for i in order[:, j].tolist():
            if i // crops not in seen:
                seen.add(i // crops)
                picked.append(i)
                if len(picked) == k:
                    break
        out.append(picked)
    if min(len(p) for p in out) < k:
        raise SystemExit(f"--distinct: the pool has fewer than k = {k} photographs; lower --k or add photographs")
    return torch.tensor(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--judge", default="efficientnet-lite2")
    ap.add_argument("--layers", nargs="+", default=["_blocks.4", "_blocks.10"])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--k", type=int, default=8, help="top-k (and bottom-k) patches per channel")
    ap.add_argument("--crops", type=int, default=8, help="random resized crops per photograph")
    ap.add_argument("--no-distinct", dest="distinct", action="store_false",
                    help="top-k (and bottom-k) crops may come from one photograph (the old benchmark: a channel's "
                    "references are then often crops of one or two photographs, which copying wins)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--vital", nargs="*", default=[], metavar="NAME:KEY=VALUE;...",
                    help="VITAL variants with settings overrides")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--out", default=os.path.join("runs", "bench-channels"))
    ap.add_argument("--figure", default=None, help="write a PNG or JPEG: for the first four channels of each layer, "
                    "every method's visualization (first seed) beside the channel's top patches")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-patch-row", dest="patch_row", action="store_false",
                    help="leave out the row of real top-k patches held out in turn (the judge's ceiling)")
    ap.add_argument("--crop-row", action="store_true",
                    help="for each VITAL variant a row more: the 2-AFC of each visualization's receptive-field square "
                    "around its channel's strongest position, cut as its references were")
    ap.add_argument("--json", default=None, help="write the table's numbers as JSON")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    model = load_model(a.model)
    judge = load_model(a.judge)
    size = model.input_size
    cache = DiskCache(os.path.join(a.out, "cache"))
    pool, n_photos = build_pool(size, a.crops)
    print(f"pool: {len(pool)} crops of {n_photos} photographs"
          + ("" if n_photos > 9 else " (install mate-backgrounds lomiri-wallpapers for the full pool)"), flush=True)
    base = get_preset(a.preset)
    variants: Dict[str, Tuple[str, Dict]] = {m: (m, {}) for m in a.methods}
    for v in a.vital:
        name, kw = parse_variant(v)
        variants[name] = ("vital", kw)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    figure_rows = []
    for layer in a.layers:
        scores, locs, grid = pool_scores(model, layer, pool)
        chans = pick_channels(scores, a.k, a.channels)
        rf = receptive_field(model, layer, size)
        top = topk_indices(scores[:, chans], a.k, a.crops, a.distinct)               # (n, k)
        bot = topk_indices(scores[:, chans], a.k, a.crops, a.distinct, largest=False)
        mean_top = scores[:, chans].gather(0, top.t()).mean(0)
        print(f"\n{layer}: channels {chans} (receptive field {rf} px, grid {grid})", flush=True)
        maxp = {c: patches(model, pool, top[j].tolist(), [locs[i, c].tolist() for i in top[j].tolist()], grid, rf,
                           size, "patch") for j, c in enumerate(chans)}
        minp = {c: patches(model, pool, bot[j].tolist(), [locs[i, c].tolist() for i in bot[j].tolist()], grid, rf,
                           size, "patch") for j, c in enumerate(chans)}
        ref_feats = {c: judge_features(judge, maxp[c], "ref") for c in chans}
        min_feats = {c: judge_features(judge, minp[c], "ref") for c in chans}
        targets = [f"channel:{layer}:{c}" for c in chans]
        if a.patch_row:
            rows.append(patch_row(model, layer, chans, maxp, ref_feats, mean_top))
            rows += mosaic_rows(judge, layer, chans, maxp, ref_feats, size)
        for vname, (method, kw) in variants.items():
            kw = dict(kw)
            vsize = kw.pop("size", None)  # the visualization's side: pixels, or "rf" (the receptive field's)
            vsize = None if vsize is None else (min(size, rf) if vsize == "rf" else int(vsize))
            rules = kw.pop("rules", "bfloat16")
            if rules not in ("bfloat16", "float32"):
                ap.error(f"--vital {vname}: rules must be 'bfloat16' or 'float32', got {rules!r}")
            kw["rules_dtype"] = "auto" if rules == "bfloat16" else "float32"
            s = base.replace(**kw)
            if vsize is not None:
                kw["size"] = vsize
            mode = s.channel_refs
            refs = {t: ImageSet(patches(model, pool, top[j].tolist(), [locs[i, c].tolist() for i in top[j].tolist()],
                                        grid, rf, vsize or size, mode), [], [])
                    for j, (t, c) in enumerate(zip(targets, chans))}
            for t in refs:
                refs[t].names = [f"{t}#{i}" for i in range(len(refs[t]))]
                refs[t].hashes = [hashlib.sha256(im.numpy().tobytes()).hexdigest()[:16] for im in refs[t].images]
            afc_k = afc_n = mm_k = crop_k = crop_n = 0.0
            acts, vis_all, secs, spec, ratios, copies = [], [], [], [], [], []
            for seed in a.seeds:
                key = run_key(a.model, layer, chans, method, s, vsize, seed, len(pool), a.k)
                path = os.path.join(a.out, f"{layer}-{vname}-s{seed}-{key}.pt")
                if os.path.isfile(path):
                    saved = torch.load(path, weights_only=True)
                    images, spt = saved["images"], float(saved["s_per_target_step"])
                else:
                    t0 = time.perf_counter()
                    res = visualize(model, targets, refs, settings=s, seed=seed, cache=cache, method=method,
                                    size=vsize)
                    images, spt = res.images.float(), res.timings.get("s_per_target_step", float("nan"))
                    tmp = path + ".tmp"
                    torch.save({"images": images, "s_per_target_step": spt, "chans": chans}, tmp)
                    os.replace(tmp, path)
                    print(f"  {vname} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
                secs.append(spt)
                vf = judge_features(judge, list(images), "vis")
                r = two_afc(list(vf), [ref_feats[c] for c in chans])
                afc_k += r["n_correct"]
                afc_n += r["n_trials"]
                mm_k += max_min_afc(list(vf), [ref_feats[c] for c in chans], [min_feats[c] for c in chans])["n_correct"]
                drive = drive_matrix(model, images, layer, chans)
                acts.append(drive.diagonal() / mean_top.clamp_min(1e-6))
                frac, _, rat = specificity(drive.double().numpy())
                spec.append(frac)
                ratios += [float(v) for v in rat if np.isfinite(v)]
                copies += [copy_index(vf[i], ref_feats[c]) for i, c in enumerate(chans)]
                vis_all.append(vf)
                if a.crop_row and method == "vital":
                    cf = judge_features(judge, strongest_crops(model, images, layer, chans, rf, size), "vis")
                    r = two_afc(list(cf), [ref_feats[c] for c in chans])
                    crop_k, crop_n = crop_k + r["n_correct"], crop_n + r["n_trials"]
                if seed == a.seeds[0]:
                    figure_rows.append((layer, vname, chans, images, maxp))
            mm_n = len(chans) * len(a.seeds)
            lo, hi = wilson_interval(afc_k, int(afc_n))
            mlo, mhi = wilson_interval(mm_k, mm_n)
            fd = frechet_distance(np.concatenate(vis_all), np.concatenate([ref_feats[c] for c in chans]))
            act = torch.cat(acts)
            row = {"layer": layer, "method": vname, "afc": afc_k / afc_n, "afc_ci": [lo, hi], "afc_trials": int(afc_n),
                   "minmax": mm_k / mm_n, "minmax_ci": [mlo, mhi], "minmax_trials": mm_n,
                   "activation": float(act.mean()), "activation_median": float(act.median()), "fd": fd,
                   "specificity": float(np.mean(spec)), "spec_ratio": float(np.median(ratios)) if ratios else float("nan"),
                   "copy": float(np.mean(copies)),
                   "s_per_target_step": float(np.nanmean(secs)), "settings": kw}
            rows.append(row)
            print(f"| {layer} | {vname} | {100 * row['afc']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] | "
                  f"{100 * row['minmax']:.0f} % [{100 * mlo:.0f}, {100 * mhi:.0f}] | {row['activation']:.2f} | "
                  f"{100 * row['specificity']:.0f} % | {row['spec_ratio']:.2f} | {row['copy']:.2f} | "
                  f"{fd:.1f} | {row['s_per_target_step']:.3f} |", flush=True)
            if crop_n:
                lo, hi = wilson_interval(crop_k, int(crop_n))
                nan = float("nan")
                rows.append({"layer": layer, "method": f"{vname}, strongest crop", "afc": crop_k / crop_n,
                             "afc_ci": [lo, hi], "afc_trials": int(crop_n), "minmax": nan, "minmax_ci": [nan] * 2,
                             "minmax_trials": 0, "activation": nan, "activation_median": nan, "fd": nan,
                             "specificity": nan, "spec_ratio": nan, "copy": nan, "s_per_target_step": nan,
                             "settings": kw})
                print(f"| {layer} | {vname}, strongest crop | {100 * crop_k / crop_n:.0f} % [{100 * lo:.0f}, "
                      f"{100 * hi:.0f}] | - | - | - | - | - | - | - |", flush=True)
    print("\n| layer | method | 2-AFC own vs other, 95 % CI | 2-AFC max vs min | activation / top-k mean | "
          "specificity | own / strongest other | copy | FD to patches | s per target-step |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mm = ("-" if not r["minmax_trials"] else f"{100 * r['minmax']:.0f} % [{100 * r['minmax_ci'][0]:.0f}, "
              f"{100 * r['minmax_ci'][1]:.0f}] of {r['minmax_trials']}")
        print(f"| {r['layer']} | {r['method']} | {100 * r['afc']:.0f} % [{100 * r['afc_ci'][0]:.0f}, "
              f"{100 * r['afc_ci'][1]:.0f}] of {r['afc_trials']} | {mm} | "
              + " | ".join("-" if not np.isfinite(r[k]) else f"{r[k] * m:{f}}{unit}"
                           for k, f, m, unit in (("activation", ".2f", 1, ""), ("specificity", ".0f", 100, " %"),
                                                 ("spec_ratio", ".2f", 1, ""), ("copy", ".2f", 1, ""),
                                                 ("fd", ".1f", 1, ""), ("s_per_target_step", ".3f", 1, ""))) + " |")
    print(f"\npool: {len(pool)} crops of {n_photos} photographs; top-k from "
          f"{'distinct photographs' if a.distinct else 'any crops'}; seeds {a.seeds}; preset {a.preset}; "
          f"judge {a.judge}; threads {torch.get_num_threads()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.figure:
        write_figure(a.figure, figure_rows)
    return 0


def write_figure(path: str, rows, n_show: int = 4, n_patches: int = 3) -> None:
    """Per layer: a row of channels; for each, every method's visualization (first seed) then its top patches."""
    from PIL import Image, ImageDraw

    cell = 88
    by_layer: Dict[str, list] = {}
    for layer, vname, chans, images, maxp in rows:
        by_layer.setdefault(layer, []).append((vname, chans, images, maxp))
    blocks = []
    for layer, entries in by_layer.items():
        chans = entries[0][1][:n_show]
        cols = len(entries) + n_patches
        im = Image.new("RGB", (cols * cell, 16 + len(chans) * cell), "white")
        d = ImageDraw.Draw(im)
        heads = [e[0] for e in entries] + ["top patches"] + [""] * (n_patches - 1)
        for j, h in enumerate(heads):
            d.text((j * cell + 3, 2), h, fill="black")
        for i, c in enumerate(chans):
            tiles = [e[2][i] for e in entries] + entries[0][3][c][:n_patches]
            for j, t in enumerate(tiles):
                arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")
                im.paste(Image.fromarray(arr).resize((cell - 2, cell - 2), Image.BICUBIC), (j * cell, 16 + i * cell))
            d.text((2, 16 + i * cell + 2), f"{layer}:{c}", fill="white")
        blocks.append(im)
    w = max(b.width for b in blocks)
    out = Image.new("RGB", (w, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    if path.lower().endswith((".jpg", ".jpeg")):
        out.save(path, quality=88)
    else:
        out.save(path)
    print(f"figure: {path}")


if __name__ == "__main__":
    sys.exit(main())
