"""The kernel benchmark: shapes, providers, bytes moved, the copy bandwidth, and the table.

Used by ``vital-fast bench``, ``python -m benchmarks.table`` and the pytest-benchmark suites.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import platform
import sys

import torch

import vital_fast
from vital_fast import oracle as R

# ResNet-50 matched-layer shapes at 224 px: (C, H, W).
RESNET50_SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
PAPER_K = 10  # reference images the paper-style baseline re-sorts inside the loss at every call


def make_sync(device="cpu") -> Callable[[], None]:
    """What a timed closure calls last: ``torch.cuda.synchronize`` on a CUDA device (so the time after it is
    device time, not launch time), nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def make_inputs(B: int, C: int, H: int, W: int, seed: int = 0, k: int = PAPER_K, device="cpu"):
    """Features ``(B, C, H, W)``, ``k`` reference images' features and their prototype, on ``device`` (drawn on
    the CPU from ``seed``, so every device gets the same values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    refs = torch.randn(k, C, H, W, generator=g) * 1.3 + 0.2
    x, refs = x.to(device), refs.to(device)
    proto = vital_fast.sorted_prototype(refs)
    return x, refs, proto


def providers(x: torch.Tensor, refs: torch.Tensor, proto: torch.Tensor,
              sync: Optional[Callable[[], None]] = None, compiled: Optional[str] = None) -> Dict[str, Callable[[], None]]:
    """Forward + backward closures: the pure-torch reference, the paper-style baseline, the fused op (the
    backend of ``x``'s device: C++ on the CPU, Triton on CUDA); each ends with ``sync`` (default: the
    device's, :func:`make_sync`). ``compiled``: a torch dynamo backend; adds ``"vital_fast compiled"``, the
    fused op's forward and backward under ``torch.compile(fullgraph=True)`` with it (compiled at the first call,
    which the warm-up round takes)."""
    sync = make_sync(x.device) if sync is None else sync
    xr = x.clone().requires_grad_(True)

    def reference() -> None:
        xr.grad = None
        R.sort_match_reference(xr, proto).backward()
        sync()

    def paper_style() -> None:
        xr.grad = None
        R.paper_style_sort_match_loss(xr, refs).backward()
        sync()

    def fused() -> None:
        xr.grad = None
        vital_fast.sort_match_loss(xr, proto, check_values=False).backward()
        sync()

    out = {"reference": reference, "paper-style": paper_style, "vital_fast": fused}
    if compiled:
        torch._dynamo.reset()  # each shape compiles afresh (no recompile limit across the table)
        cf = torch.compile(lambda t: vital_fast.sort_match_loss(t, proto, check_values=False), fullgraph=True,
                           backend=compiled, dynamic=False)

        def fused_compiled() -> None:
            xr.grad = None
            cf(xr).backward()
            sync()

        out["vital_fast compiled"] = fused_compiled
    return out


def fused_bytes(x: torch.Tensor) -> int:
    """Bytes the fused forward+backward must move: read x, write and read back x − t, write the grad."""
    return 4 * x.numel() * x.element_size()


def copy_bandwidth_gbs(nbytes: int = 256 << 20, rounds: int = 5, device="cpu") -> float:
    """Memory copy bandwidth into an existing buffer on ``device``, counting read + write, in GB/s (best of
    ``rounds``, synchronized on CUDA)."""
    sync = make_sync(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best / 1e9


def interleaved_times(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run each closure in turn, round after round, so machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def run(batches, threads: int, rounds: int, shapes=RESNET50_SHAPES, out=sys.stdout, device="cpu",
        compiled: Optional[str] = None):
    """The kernel table on ``device`` (``"cpu"``, or a CUDA device: every closure synchronized); with
    ``compiled`` (a dynamo backend) also the fused op under ``torch.compile``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: the kernel table runs on cpu or cuda")
    torch.set_num_threads(threads)
    backends = vital_fast.available_backends()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        fused_backend = "triton" if backends["triton"]["available"] else "reference (Triton not available)"
    else:
        name = platform.processor() or platform.machine()
        fused_backend = "cpp" if backends["cpp"]["available"] else "reference (C++ extension not built)"
    bw = copy_bandwidth_gbs(device=dev)
    print(f"vital_fast {vital_fast.__version__}, torch {torch.__version__}, {name}, "
          f"{threads} threads; fused op backend: {fused_backend}", file=out)
    print(f"memory copy bandwidth (read + write): {bw:.1f} GB/s; {rounds} interleaved rounds, median", file=out)
    print("", file=out)
    header = f"| shape (B, C, H, W) | provider | fwd+bwd ms | vital_fast speed-up | GB/s (% of copy) |"
    print(header, file=out)
    print("|---|---|---:|---:|---:|", file=out)
    rows = []
    for B in batches:
        for C, H, W in shapes:
            x, refs, proto = make_inputs(B, C, H, W, device=dev)
            times = interleaved_times(providers(x, refs, proto, compiled=compiled), rounds=rounds)
            med = {k: median(v) for k, v in times.items()}
            gbs = fused_bytes(x) / med["vital_fast"] / 1e9
            for name in ("reference", "paper-style", "vital_fast") + (("vital_fast compiled",) if compiled else ()):
                speed = med[name] / med["vital_fast"]
                extra = f"{gbs:.1f} ({100 * gbs / bw:.0f} %)" if name == "vital_fast" else ""
                print(f"| ({B}, {C}, {H}, {W}) | {name} | {1e3 * med[name]:.1f} | "
                      f"{speed:.1f}x | {extra} |", file=out, flush=True)
                rows.append({"shape": [B, C, H, W], "provider": name, "ms": 1e3 * med[name],
                             "speedup_of_vital_fast": speed, "gbs": gbs if name == "vital_fast" else None})
            del x, refs, proto
    return {"copy_gbs": bw, "threads": threads, "rounds": rounds, "device": str(dev), "rows": rows}
