"""Top-k mining at scale: peak memory and images per second against the pool's size.

    python -m benchmarks.bench_mining [--sizes 1000 10000] [--layer _blocks.10] [--size 224] [--k 8]
                                      [--batch 32] [--workers 2] [--threads 1] [--baseline 256]
                                      [--dir DIR] [--in-memory] [--json FILE]

Generates pools of real-looking JPEGs (once; kept under ``--dir``, default a folder in the system's
temporary directory): crops of the photographs that ship in installed packages
(:func:`vital_fast.references.images.offline_photo_paths`), 500x375 or 375x500, flipped and jittered,
at JPEG qualities 70-95, in 100 WordNet-id folders (``n01440764/``...), with about 4% grayscale and 2%
CMYK JPEGs, 2% RGBA PNGs and one truncated file per thousand (skipped and counted by mining). The
smaller pools are hard links to the first files of the largest.

Each pool size then runs in a fresh process (so that peak memory is its own): efficientnet-lite0
(ImageNet weights), every channel of ``--layer`` mined in one streaming pass (``mine_topk`` on an
``ImagePool`` of the folder, no cache) with ``--workers`` DataLoader workers and ``--threads`` torch
threads. Reported per size:

* ``peak RSS MB``: the mining process's peak resident set (``ru_maxrss``, read right after the pass);
* ``peak PSS MB (all)``: the highest sampled proportional set size of the process and its workers
  together (``/proc/*/smaps_rollup`` every 0.2 s; pages shared after ``fork`` counted once);
* ``mining img/s``: pool images (readable or not) over the wall time of ``mine_topk``;
* ``forward img/s``: the model's own forward speed on the same images, measured in the same process
  right after: the first ``--baseline`` images of the pool, decoded and preprocessed beforehand, run
  through the same forward (normalize, forward up to the layer, same batch) with nothing else;
* ``forward/mining``: the acceptance bar is <= 1.5, and the peak must not grow with the pool by more
  than a few hundred MB.

``--in-memory`` adds a row for the smallest size mined the way it was before pools were lazy: every
image decoded into an in-memory ``ImageSet`` (``load_images``, in the process itself) first, then
mined without workers; its time includes that decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings

WNIDS = [f"n{1440764 + 23117 * j:08d}" for j in range(100)]


# generation -------------------------------------------------------------------------------------


def _make_one(args):
    """Image ``i`` of the pool: a 4:3 crop of an offline photograph, in its mode and format."""
    i, root, photos = args
    import numpy as np
    from PIL import Image, ImageEnhance

    g = np.random.default_rng(i)
    with Image.open(photos[i % len(photos)]) as im:
        im = im.convert("RGB")
    portrait = g.random() < 0.25
    w, h = im.size
    aspect = 3 / 4 if portrait else 4 / 3
    cw = int(min(w, h * aspect) * g.uniform(0.55, 1.0))
    ch = int(cw / aspect)
    x0, y0 = int(g.integers(0, w - cw + 1)), int(g.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((375, 500) if portrait else (500, 375), Image.BICUBIC)
    if g.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(g.uniform(0.8, 1.2))
    im = ImageEnhance.Contrast(im).enhance(g.uniform(0.8, 1.2))
    sub = os.path.join(root, WNIDS[i % len(WNIDS)])
    stem = os.path.join(sub, f"{WNIDS[i % len(WNIDS)]}_{i:06d}")
    r = g.random()
    if i % 1000 == 999:  # a damaged file: the first third of a JPEG
        path = stem + ".JPEG"
        im.save(path, quality=85)
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 3])
    elif r < 0.04:
        im.convert("L").save(stem + ".JPEG", quality=int(g.integers(70, 96)))
    elif r < 0.06:
        im.convert("CMYK").save(stem + ".JPEG", quality=int(g.integers(70, 96)))
    elif r < 0.08:
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.fromarray((g.random((im.size[1], im.size[0])) * 255).astype("uint8")))
        rgba.save(stem + ".png")
    else:
        im.save(stem + ".JPEG", quality=int(g.integers(70, 96)))


def make_pools(base: str, sizes, procs: int = 2):
    """``{n: folder}``: the largest pool generated (once), the smaller ones hard-linked from it."""
    from vital_fast.references.images import list_image_files, offline_photo_paths

    big = max(sizes)
    root = os.path.join(base, f"pool-{big}")
    done = os.path.join(root, ".complete")
    if not os.path.isfile(done):
        for w in WNIDS:
            os.makedirs(os.path.join(root, w), exist_ok=True)
        photos = offline_photo_paths()
        t0 = time.perf_counter()
        jobs = [(i, root, photos) for i in range(big)]
        if procs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(procs) as p:
                p.map(_make_one, jobs, chunksize=64)
        else:
            for j in jobs:
                _make_one(j)
        open(done, "w").close()
        print(f"generated {big} images in {root} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    files = list_image_files(root)
    out = {big: root}
    for n in sorted(set(sizes) - {big}):
        sub = os.path.join(base, f"pool-{n}")
        if not os.path.isfile(os.path.join(sub, ".complete")):
            for f in files[:n]:
                dst = os.path.join(sub, os.path.relpath(f, root))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if not os.path.exists(dst):
                    try:
                        os.link(f, dst)
                    except OSError:
                        import shutil

                        shutil.copy2(f, dst)
            open(os.path.join(sub, ".complete"), "w").close()
        out[n] = sub
    return out


# measuring --------------------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


class PeakSampler(threading.Thread):
    """Highest PSS of this process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_kb, self._stop_ev = interval, 0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_ev.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _descendants(me)))
            self._stop_ev.wait(self.interval)

    def stop(self) -> int:
        self._stop_ev.set()
        self.join()
        return self.peak_kb


def child(a) -> dict:
    """One pool size, in this (fresh) process."""
    import torch

    torch.set_num_threads(a.threads)
    from vital_fast.models import FeatureTaps, load_model
    from vital_fast.references.images import load_image, load_images, resize_center_crop
    from vital_fast.references.mining import mine_topk, print_progress
    from vital_fast.references.pool import ImagePool

    loaded = load_model("efficientnet-lite0")
    pool = ImagePool.from_folder(a.pool, workers=a.workers)
    n = len(pool)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if a.in_memory:
            src = load_images(pool.names, what="pool")  # the way before: every image decoded and held
        else:
            src = pool
        top = mine_topk(loaded, a.layer, src, None, a.k, a.size, None, a.batch,
                        workers=0 if a.in_memory else a.workers,
                        progress=print_progress(f"  {n} images", every=30.0))
    wall = time.perf_counter() - t0
    peak_pss = sampler.stop() / 1024
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    skipped = pool.skipped if not a.in_memory else getattr(src, "skipped", 0)
    notes = [str(w.message)[:160] for w in rec]
    del src
    # the model alone on the same images: decoded and preprocessed first, then only the forward
    resize = int(round(a.size * loaded.resize_size / loaded.input_size))
    xs = []
    for f in pool.names:
        if len(xs) >= a.baseline:
            break
        try:
            xs.append(resize_center_crop(load_image(f), a.size, resize))
        except ValueError:
            continue
    x = torch.stack(xs)
    dev = next(iter(loaded.model.parameters())).device
    with torch.no_grad(), FeatureTaps(loaded.model, [a.layer], detach=True, stop_after=True) as taps:
        taps.run(loaded.normalize(x[: a.batch]).to(dev))  # warm-up
        t1 = time.perf_counter()
        for i in range(0, len(x), a.batch):
            taps.run(loaded.normalize(x[i:i + a.batch]).to(dev))
        fwd = len(x) / (time.perf_counter() - t1)
    return {"images": n, "mode": "in-memory" if a.in_memory else "lazy", "wall_s": wall, "mining_ips": n / wall,
            "forward_ips": fwd, "ratio": fwd / (n / wall), "peak_rss_mb": peak_rss, "start_rss_mb": rss0,
            "peak_pss_all_mb": peak_pss, "worker_peak_rss_mb": worker_rss, "skipped": skipped,
            "channels": len(top.channels), "k": int(top.index.shape[1]),
            "workers": 0 if a.in_memory else a.workers, "threads": a.threads,
            "batch": a.batch, "size": a.size, "layer": a.layer, "warnings": notes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--layer", default="_blocks.10")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", type=int, default=256, help="images for the forward-only baseline")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vital_fast_bench_mining"))
    p.add_argument("--in-memory", action="store_true", help="also mine the smallest pool the old way")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    pools = make_pools(a.dir, a.sizes)
    runs = [(n, False) for n in sorted(a.sizes)] + ([(min(a.sizes), True)] if a.in_memory else [])
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for n, mem in runs:
        cmd = [sys.executable, "-m", "benchmarks.bench_mining", "--child", "--pool", pools[n], "--layer", a.layer,
               "--size", str(a.size), "--k", str(a.k), "--batch", str(a.batch), "--workers", str(a.workers),
               "--threads", str(a.threads), "--baseline", str(a.baseline)] + (["--in-memory"] if mem else [])
        print(f"mining {n} images ({'in memory' if mem else 'lazy pool'}) ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"\nefficientnet-lite0, layer {a.layer} (all {r0['channels']} channels), top-{a.k}, {a.size}x{a.size}, "
          f"batch {a.batch}, {a.workers} workers, {a.threads} torch thread(s), CPU\n")
    print("| pool | mode | skipped | peak RSS MB | peak PSS MB (all) | mining img/s | forward img/s "
          "| forward/mining |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['mode']} | {r['skipped']} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_pss_all_mb']:.0f} | "
              f"{r['mining_ips']:.1f} | {r['forward_ips']:.1f} | {r['ratio']:.2f} |")
    lazy = [r for r in rows if r["mode"] == "lazy"]
    if len(lazy) > 1:
        print(f"\npeak RSS growth from {lazy[0]['images']} to {lazy[-1]['images']} images: "
              f"{lazy[-1]['peak_rss_mb'] - lazy[0]['peak_rss_mb']:+.0f} MB (all processes: "
              f"{lazy[-1]['peak_pss_all_mb'] - lazy[0]['peak_pss_all_mb']:+.0f} MB)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
