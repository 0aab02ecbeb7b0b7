"""The one-shot GPU check: correctness, the kernel table and the end-to-end table on one CUDA device.

    python -m benchmarks.gpu_check --out DIR [--budget-s 480]     # on a CUDA machine
    python -m benchmarks.gpu_check --out DIR --dry-run            # anywhere: CPU, tiny shapes

Sections, in order, each within what is left of ``--budget-s`` (a section, or a row, that would not
fit is skipped and recorded as skipped; a section that raises is recorded with its error and the
check goes on):

1. ``op_checks``: ``sort_match_loss`` and ``lrp_weight`` on the Triton backend, on device tensors,
   against the pure-torch reference in float64 (losses and gradients; shared and per-element
   references, channels-last, float16 / bfloat16, the long-row ``torch.sort`` path).
2. ``kernel_table``: forward + backward at the ResNet-50 layer shapes at B = 1, 16, 64: the Triton
   fused op, the same under ``torch.compile(fullgraph=True)`` (inductor), ``torch.sort`` + autograd (the reference) and the paper-style loss, each call closed
   by ``torch.cuda.synchronize``; GB/s of the fused op against the device's copy bandwidth.
3. ``e2e``: seconds per target-step of ``vital_fast.optim.visualize`` (ResNet-50, random weights,
   224 px; class and ``layer3`` channel targets; B = 1, 8, 32; float32 and bf16 autocast) and of a
   loop written like the paper's code (B = 1, float32), synchronized at every step.
4. ``step``: what a step costs the device beyond the network: aten ops, ops on device tensors (kernel
   launches) and device reads per steady-state step of ``visualize`` (the model above, class targets,
   B = 2 and 8: the reads must stay at 0.1, one every ``loss_every`` = 10 steps); the engine's overhead on a
   three-layer CNN at 32 px against its bare forward + backward (B = 1, 8, 64; ``bench_visualize
   --overhead``); and float32, bfloat16 and float16 (dynamic loss scale) on the card: seconds per step and
   the loss after ``precision_steps`` steps of the fast preset (float16 must come within 1.5x of float32).
5. ``projections``: the fast preset (150 steps) for all 1,000 ImageNet classes and for every channel
   of ``layer3``, from the time per target-step at the largest B measured.
6. ``op_tests``: the Triton cases of ``tests/test_sort_match.py`` and ``tests/test_lrp_weight.py``
   under pytest (in a subprocess, on CUDA tensors), with whatever budget is left.

Writes ``DIR/gpu_check.json`` (device, versions, config, every row) and ``DIR/gpu_check.md`` (the
tables, also printed), after every section, so a run cut short still leaves what it measured.
Exit status: 0, or 1 when an op correctness check (section 1 or 5) failed; 2 without CUDA and
without ``--dry-run``.

``--dry-run`` runs the same code on the CPU with tiny shapes, ResNet-18 at 32 px and 2 steps (1 timed),
and Triton under its interpreter (``TRITON_INTERPRET=1``, set for this process only); CI runs it
(tests/test_gpu_check.py) so that this script does not rot. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

T_START = time.perf_counter()  # the budget counts from here, torch's import included

import torch  # noqa: E402

import vital_fast  # noqa: E402
from vital_fast import _backend, _ext  # noqa: E402
from vital_fast import oracle as R  # noqa: E402
from vital_fast.bench import (PAPER_K, RESNET50_SHAPES, fused_bytes, interleaved_times,  # noqa: E402
                             make_inputs, make_sync)
from vital_fast.bench import copy_bandwidth_gbs as bench_copy_bandwidth_gbs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPS = ("sort_match", "lrp_weight")
FAST_PRESET = "fast"
AMP_NAMES = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}  # Settings.amp -> network dtype
IMAGENET_CLASSES = 1000


# --- configuration -----------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    mode: str                                   # "cuda" or "dry-run"
    device: str
    op_shapes: List[Tuple[int, int, int, int]]  # (B, C, H, W), float32, shared and per-element refs
    layout_shape: Tuple[int, int, int, int]     # channels-last case
    lowp_shape: Tuple[int, int, int, int]       # float16 / bfloat16 cases (tie-free inputs)
    force_long_rows: Optional[int]              # MAX_FUSED_D for one case (None: the shapes reach it)
    kernel_batches: Tuple[int, ...]
    kernel_shapes: List[Tuple[int, int, int]]   # (C, H, W)
    kernel_rounds: int
    kernel_warmup: int
    copy_bytes: int
    model: str
    size: int
    channel_layer: str
    e2e_batches: Tuple[int, ...]
    e2e_amps: Tuple[str, ...]
    e2e_steps: int                              # timed steps (one more runs first, untimed)
    e2e_refs: int                               # reference images per target for visualize
    step_batches: Tuple[int, ...]               # the overhead row's batch sizes (tiny CNN)
    precision_steps: int                        # steps of the precision rows
    paper_refs: int                             # reference images in the paper-style loop (paper: 50)
    pytest_k: str
    threads: Optional[int]                      # torch CPU threads (None: torch's default)
    # rough lower bounds, in seconds, used to skip what cannot fit in the budget
    est: Dict[str, float]


def real_config() -> Config:
    return Config(
        mode="cuda", device="cuda",
        op_shapes=[(1, 1, 1, 1), (2, 3, 7, 7), (3, 5, 10, 10), (1, 2, 1, 13), (4, 16, 14, 14),
                   (2, 64, 56, 56), (1, 8, 112, 112), (2, 2048, 7, 7)],
        layout_shape=(2, 64, 28, 28), lowp_shape=(2, 3, 6, 10), force_long_rows=None,
        kernel_batches=(1, 16, 64), kernel_shapes=list(RESNET50_SHAPES), kernel_rounds=20, kernel_warmup=3,
        copy_bytes=256 << 20,
        model="torchvision:resnet50", size=224, channel_layer="layer3",
        e2e_batches=(1, 8, 32), e2e_amps=("off", "bf16"), e2e_steps=3,
        e2e_refs=8, paper_refs=50, step_batches=(1, 8, 64), precision_steps=30,
        pytest_k="triton", threads=None,
        est={"op_checks": 20, "kernel_table": 30, "e2e": 60, "step": 30, "projections": 0, "op_tests": 30,
             "op_case": 2.0, "kernel_row": 2.0, "e2e_row": 8.0},
    )


def dry_config() -> Config:
    return Config(
        mode="dry-run", device="cpu",
        op_shapes=[(1, 1, 1, 1), (2, 3, 7, 7), (2, 8, 6, 6)],
        layout_shape=(2, 8, 6, 6), lowp_shape=(2, 3, 6, 10), force_long_rows=32,
        kernel_batches=(1, 2), kernel_shapes=[(8, 6, 6), (4, 12, 12)], kernel_rounds=2, kernel_warmup=1,
        copy_bytes=16 << 20,
        model="torchvision:resnet18", size=32, channel_layer="layer3",
        e2e_batches=(1, 2), e2e_amps=("off", "bf16"), e2e_steps=1,
        e2e_refs=2, paper_refs=2, step_batches=(1, 2), precision_steps=3,
        pytest_k="triton and test_matches_reference and 2x3x7x7",
        # One thread: on a shared CPU, OpenMP threads that wait for a busy core slow the tiny ops
        # down tenfold (the end-to-end section: 4 s with one thread, 25-45 s with two).
        threads=1,
        est={"op_checks": 1, "kernel_table": 1, "e2e": 2, "step": 2, "projections": 0, "op_tests": 2,
             "op_case": 0.05, "kernel_row": 0.1, "e2e_row": 0.5},
    )


# --- budget, timing, small helpers -------------------------------------------------------------


class Budget:
    def __init__(self, total_s: float, t0: Optional[float] = None) -> None:
        self.total_s = total_s
        self.t0 = time.perf_counter() if t0 is None else t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def why_not(self, need_s: float) -> Optional[str]:
        """None when ``need_s`` seconds fit, else the reason to record."""
        if self.left() >= need_s:
            return None
        return f"budget: {max(0.0, self.left()):.0f} s left, needs about {need_s:.0f} s"


class Estimate:
    """The next row's seconds: the last row's, scaled by the size ratio (a default before any)."""

    def __init__(self, default_s: float) -> None:
        self.default_s = default_s
        self.last: Optional[Tuple[float, float]] = None

    def __call__(self, size: float) -> float:
        if self.last is None:
            return self.default_s
        s0, w0 = self.last
        return w0 * max(1.0, size / s0)

    def add(self, size: float, wall_s: float) -> None:
        self.last = (size, wall_s)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def triton_status() -> Tuple[bool, Optional[str], Optional[str]]:
    """(usable here, reason when not, version)."""
    mod, why = _ext.load_triton()
    if mod is None:
        return False, why, None
    return True, None, getattr(mod, "__version__", None)


def triton_reason(cfg: Config) -> Optional[str]:
    ok, why, _ = triton_status()
    if not ok:
        return why
    if cfg.device == "cpu" and not _ext.triton_interpret():
        return "CPU tensors need TRITON_INTERPRET=1 (the dry run sets it in __main__)"
    return None


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]


def free_device_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- 1. op checks ------------------------------------------------------------------------------


def _sorted_ref(C: int, Q: int, B: Optional[int], device: str, g: torch.Generator) -> torch.Tensor:
    shape = (C, Q) if B is None else (B, C, Q)
    return torch.sort(torch.randn(shape, generator=g) * 1.5 + 0.3, dim=-1).values.to(device)


def _run_op(op: str, backend: str, x, ref, weight, rel, upstream):
    """Per-element losses (reduction="none") and d<upstream, losses>/dx, as in tests/_util.run_op."""
    x = x.detach().clone().requires_grad_(True)
    if op == "sort_match":
        loss = vital_fast.sort_match_loss(x, ref, weight, reduction="none", backend=backend)
    else:
        loss = vital_fast.lrp_weight(x, rel, ref, weight, reduction="none", backend=backend)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return loss.detach(), x.grad.detach()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


def op_cases(cfg: Config) -> List[Dict[str, Any]]:
    cases = []
    for op in OPS:
        for shape in cfg.op_shapes:
            for per_element in (False, True):
                cases.append({"op": op, "shape": list(shape), "dtype": "float32", "layout": "contiguous",
                              "ref": "per-element" if per_element else "shared", "long_rows": None})
        cases.append({"op": op, "shape": list(cfg.layout_shape), "ref": "shared", "dtype": "float32",
                      "layout": "channels_last", "long_rows": None})
        for dt in ("float16", "bfloat16"):
            cases.append({"op": op, "shape": list(cfg.lowp_shape), "ref": "shared", "dtype": dt,
                          "layout": "contiguous", "long_rows": None})
        if cfg.force_long_rows is not None:
            cases.append({"op": op, "shape": [2, 3, 9, 11], "ref": "per-element", "dtype": "float32",
                          "layout": "contiguous", "long_rows": cfg.force_long_rows})
    return cases


def check_op_case(case: Dict[str, Any], device: str, seed: int) -> Dict[str, Any]:
    """Triton against the float64 reference (float32), or against the reference's own error in the
    same dtype (float16 / bfloat16: kernel error <= 2 x reference error + floor, as in the tests)."""
    from vital_fast.kernels.triton import _heuristics

    g = torch.Generator().manual_seed(seed)
    op = case["op"]
    B, C, H, W = case["shape"]
    D = H * W
    dtype = getattr(torch, case["dtype"])
    row = dict(case)
    if dtype == torch.float32:
        x = torch.randn(B, C, H, W, generator=g)
        Q = D if case["long_rows"] is None else D + 7  # a resampled reference on the long-row case
        ref = _sorted_ref(C, Q, B if case["ref"] == "per-element" else None, device, g)
    else:  # tie-free values, exact in float16 and bfloat16 up to rounding of the inputs themselves
        x = (torch.randperm(B * C * D, generator=g).float().view(B, C, H, W) / 7.0 - 12.0)
        ref = _sorted_ref(C, 50, None, device, g)
    rel = torch.randn(B, C, H, W, generator=g).to(device) if op == "lrp_weight" else None
    weight = torch.rand(B, C, generator=g).to(device) if case["ref"] == "per-element" else None
    upstream = torch.randn(B, generator=g, dtype=torch.float64) * 3.7
    x = x.to(device, dtype)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        rel = rel.to(memory_format=torch.channels_last) if rel is not None else None

    old = _heuristics.MAX_FUSED_D
    if case["long_rows"] is not None:
        _heuristics.MAX_FUSED_D = case["long_rows"]
    try:
        row["path"] = "fused" if _heuristics.use_fused(D, dtype) else "torch.sort + epilogue"
        w64 = None if weight is None else weight.double()
        r64 = None if rel is None else rel.double()
        l64, g64 = _run_op(op, "reference", x.double(), ref.double(), w64, r64, upstream)
        lk, gk = _run_op(op, "triton", x, ref, weight, rel, upstream)
    finally:
        _heuristics.MAX_FUSED_D = old
    problems = []
    if gk.shape != x.shape or gk.dtype != x.dtype:
        problems.append(f"grad {tuple(gk.shape)} {gk.dtype}, want {tuple(x.shape)} {x.dtype}")
    el, eg = _max_err(lk, l64), _max_err(gk, g64)
    row["loss_err"], row["grad_err"] = el, eg
    if dtype == torch.float32:
        rel_err = float(((lk.double().cpu() - l64.cpu()) / l64.cpu().abs().clamp_min(1e-30)).abs().max())
        gscale = max(1.0, float(g64.abs().max()))
        row["tol"] = "loss rel 1e-5, grad 1e-4 x max(1, |grad|)"
        if not (rel_err <= 1e-5 or el <= 1e-7):
            problems.append(f"loss rel err {rel_err:.2e} > 1e-5")
        if eg > 1e-4 * gscale:
            problems.append(f"grad err {eg:.2e} > {1e-4 * gscale:.2e}")
    else:
        atol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        lr_, gr_ = _run_op(op, "reference", x, ref, weight, rel, upstream)
        el_r, eg_r = _max_err(lr_, l64), _max_err(gr_, g64)
        row["tol"] = f"<= 2 x reference in {case['dtype']} ({el_r:.1e}, {eg_r:.1e}) + {atol:g}"
        if el > 2 * el_r + atol:
            problems.append(f"loss err {el:.2e} > 2 x {el_r:.2e} + {atol:g}")
        if eg > 2 * eg_r + atol:
            problems.append(f"grad err {eg:.2e} > 2 x {eg_r:.2e} + {atol:g}")
    row["status"] = "fail" if problems else "pass"
    if problems:
        row["reason"] = "; ".join(problems)
    return row


def section_op_checks(cfg: Config, budget: Budget, sec: Dict[str, Any]) -> None:
    why = triton_reason(cfg)
    cases = op_cases(cfg)
    if why is not None:
        sec["rows"] = [dict(c, status="skipped", reason=why) for c in cases]
        sec["status"] = "skipped"
        sec["reason"] = why
        return
    for i, case in enumerate(cases):
        why = budget.why_not(cfg.est["op_case"])
        if why is not None:
            sec["rows"].append(dict(case, status="skipped", reason=why))
            continue
        t0 = time.perf_counter()
        try:
            row = check_op_case(case, cfg.device, seed=i)
        except Exception as exc:  # noqa: BLE001 - recorded; counts as a failed check
            row = dict(case, status="error", reason=error_text(exc), traceback=traceback.format_exc())
        row["wall_s"] = time.perf_counter() - t0
        sec["rows"].append(row)
        if row["status"] != "pass":
            log(f"op check {row['status']}: {case} {row.get('reason', '')}")
    bad = sum(r["status"] in ("fail", "error") for r in sec["rows"])
    passed = sum(r["status"] == "pass" for r in sec["rows"])
    skipped = len(sec["rows"]) - bad - passed
    sec["status"] = "failed" if bad else ("partial" if skipped else "ok")
    sec["summary"] = f"{passed} passed, {bad} failed" + (f", {skipped} skipped" if skipped else "")


# --- 2. the kernel table -----------------------------------------------------------------------


def copy_bandwidth_gbs(device: str, nbytes: int, rounds: int = 5) -> float:
    """Copy into an existing buffer on ``device``, counting read + write, in GB/s (vital_fast.bench's)."""
    return bench_copy_bandwidth_gbs(nbytes, rounds, device=device)


KERNEL_PROVIDERS = ("triton (fused)", "triton compiled", "torch.sort + autograd", "paper-style")


def kernel_providers(x, refs, proto, sync, with_triton: bool) -> Dict[str, Callable[[], None]]:
    """Forward + backward closures, each ending in a synchronize (so time after it is device time)."""
    xr = x.clone().requires_grad_(True)

    def fused() -> None:
        xr.grad = None
        vital_fast.sort_match_loss(xr, proto, check_values=False, backend="triton").backward()
        sync()

    def torch_sort() -> None:
        xr.grad = None
        R.sort_match_reference(xr, proto).backward()
        sync()

    def paper_style() -> None:
        xr.grad = None
        R.paper_style_sort_match_loss(xr, refs).backward()
        sync()

    fns = {"triton (fused)": fused} if with_triton else {}
    if with_triton:  # the loss under torch.compile(fullgraph=True): the Triton operators inside an inductor graph
        torch._dynamo.reset()
        backend = "inductor" if x.device.type == "cuda" else "aot_eager"
        cf = torch.compile(lambda t: vital_fast.sort_match_loss(t, proto, check_values=False, backend="triton"),
                           fullgraph=True, backend=backend, dynamic=False)

        def fused_compiled() -> None:
            xr.grad = None
            cf(xr).backward()
            sync()

        fns["triton compiled"] = fused_compiled
    fns.update({"torch.sort + autograd": torch_sort, "paper-style": paper_style})
    return fns


def inductor_sees_kernels(device: str) -> Optional[bool]:
    """Whether inductor's code for a compiled loss launches the Triton kernels itself (the triton_op
    decomposition, issue 28), on CUDA; None elsewhere (the interpreter keeps the operator opaque)."""
    if not device.startswith("cuda"):
        return None
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x = torch.randn(4, 8, 64, device=device, requires_grad=True)
    proto = torch.sort(torch.randn(1, 8, 64, device=device), -1).values
    cf = torch.compile(lambda t: vital_fast.sort_match_loss(t, proto, check_values=False, backend="triton"),
                       fullgraph=True)
    _, codes = run_and_get_code(lambda: cf(x).backward())
    return any("_sort_match_fwd_kernel" in c for c in codes)


def section_kernel_table(cfg: Config, budget: Budget, sec: Dict[str, Any]) -> None:
    sync = make_sync(cfg.device)
    why_triton = triton_reason(cfg)
    if why_triton is None:
        try:
            sec["inductor_sees_kernels"] = inductor_sees_kernels(cfg.device)
        except Exception as exc:  # recorded, not fatal: the timing rows still run
            sec["inductor_sees_kernels"] = f"error: {type(exc).__name__}: {exc}"
    sec["copy_gbs"] = copy_bandwidth_gbs(cfg.device, cfg.copy_bytes)
    sec["rounds"], sec["warmup"] = cfg.kernel_rounds, cfg.kernel_warmup
    est = Estimate(cfg.est["kernel_row"])
    skipped = 0
    for B in cfg.kernel_batches:
        for C, H, W in cfg.kernel_shapes:
            shape = [B, C, H, W]
            size = B * C * H * W
            why = budget.why_not(est(size))
            if why is not None:
                sec["rows"] += [{"shape": shape, "provider": p, "status": "skipped", "reason": why}
                                for p in KERNEL_PROVIDERS]
                skipped += 1
                continue
            t0 = time.perf_counter()
            try:
                x, refs, proto = make_inputs(B, C, H, W)
                x, refs, proto = x.to(cfg.device), refs.to(cfg.device), proto.to(cfg.device)
                sync()
                times = interleaved_times(kernel_providers(x, refs, proto, sync, why_triton is None),
                                          rounds=cfg.kernel_rounds, warmup=cfg.kernel_warmup)
                med = {k: statistics.median(v) for k, v in times.items()}
                fused_s = med.get("triton (fused)")
                gbs = fused_bytes(x) / fused_s / 1e9 if fused_s else None
                for p in KERNEL_PROVIDERS:
                    if p not in med:
                        sec["rows"].append({"shape": shape, "provider": p, "status": "skipped",
                                            "reason": why_triton})
                        continue
                    sec["rows"].append({
                        "shape": shape, "provider": p, "status": "ok", "ms": 1e3 * med[p],
                        "ms_min": 1e3 * min(times[p]),
                        "triton_speedup": med[p] / fused_s if fused_s else None,
                        "gbs": gbs if p == "triton (fused)" else None,
                        "pct_of_copy": 100 * gbs / sec["copy_gbs"] if gbs and p == "triton (fused)" else None,
                    })
            except Exception as exc:  # noqa: BLE001 - out of memory and the like: recorded, go on
                sec["rows"] += [{"shape": shape, "provider": p, "status": "error", "reason": error_text(exc)}
                                for p in KERNEL_PROVIDERS]
                log(f"kernel row {shape}: {error_text(exc)}")
            finally:
                x = refs = proto = None
                free_device_memory(cfg.device)
            est.add(size, time.perf_counter() - t0)
    errors = sum(r["status"] == "error" for r in sec["rows"])
    sec["status"] = "partial" if (skipped or errors or why_triton) else "ok"
    if why_triton:
        sec["reason"] = f"no Triton rows: {why_triton}"


# --- 3. end to end -----------------------------------------------------------------------------


def random_refs(key: str, n: int, size: int):
    """``n`` random images for ``key`` (deterministic across processes, unlike ``hash``)."""
    from vital_fast.references.images import ImageSet, tensor_hash

    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    return ImageSet(imgs, [f"{key}/{i}" for i in range(n)], [tensor_hash(i) for i in imgs])


def targets_for(kind: str, B: int, layer: str) -> List[str]:
    return [f"class:{i * 7}" if kind == "class" else f"channel:{layer}:{i}" for i in range(B)]


def time_visualize(loaded, kind: str, B: int, amp: str, cfg: Config, sync) -> Dict[str, Any]:
    """Seconds per target-step of visualize (the fast preset, one full-resolution stage), the steps after
    the first."""
    from vital_fast.optim import get_preset, visualize
    from vital_fast.references.cache import DiskCache

    tg = targets_for(kind, B, cfg.channel_layer)
    # the losses are read (and progress called) at steps `every`, 2 `every` and the end: timed from the first read
    # to the end (every + 1 steps), the steps between running as in a real run, without a device read
    every = max(1, cfg.e2e_steps // 2)
    s = get_preset(FAST_PRESET).replace(stages=[(1.0, 2 * every + 1)], warmup=1, ref_crops=0,
                                        n_refs=cfg.e2e_refs, amp=amp, loss_every=every)
    refs = {t: random_refs(t, cfg.e2e_refs, cfg.size) for t in tg}
    marks: List[Tuple[int, float]] = []

    def progress(i, n, losses) -> None:
        sync()
        marks.append((i, time.perf_counter()))

    sync()
    res = visualize(loaded, tg, refs, settings=s, size=cfg.size, cache=DiskCache(enabled=False),
                    progress=progress)
    (i0, t0), (i1, t1) = marks[0], marks[-1]
    step_s = (t1 - t0) / max(1, i1 - i0)
    return {"s_per_target_step": step_s / B, "s_per_step": step_s, "precision": res.precision,
            "references_s": res.timings.get("references_s"), "timed_steps": i1 - i0}


def time_paper_loop(loaded, kind: str, cfg: Config, sync) -> Dict[str, Any]:
    """One target, the paper code's way (as benchmarks/bench_visualize.py's, on ``cfg.device`` and
    synchronized): the references' features re-sorted inside the loss at every step, parameters
    requiring gradients; for a channel target the references' graph kept and backpropagated through,
    and relevance rebuilt on a deep copy of the model at every step. Seconds per step (median)."""
    from vital_fast.models import FeatureTaps, default_layers
    from vital_fast.models.facts import plan_layers_before
    from vital_fast.references.relevance import relevance_maps

    model, dev, size, n_refs = loaded.model, cfg.device, cfg.size, cfg.paper_refs
    target = targets_for(kind, 1, cfg.channel_layer)[0]
    for p in model.parameters():
        p.requires_grad_(True)  # the paper's code never freezes the model
    try:
        if kind == "class":
            layers = [l for l, _ in default_layers(loaded)]
        else:
            _, tl, ch = target.split(":")
            layers = [l for l, _ in plan_layers_before(loaded, tl, default_layers(loaded), 0.1)]
        refs = torch.stack(random_refs(target, n_refs, size).images).to(dev)
        with FeatureTaps(model, layers) as taps:
            if kind == "class":
                with torch.no_grad():
                    parts: Dict[str, List[torch.Tensor]] = {l: [] for l in layers}
                    for i in range(0, n_refs, 10):
                        out = taps.run(loaded.normalize(refs[i:i + 10]))
                        for l in layers:
                            parts[l].append(out[l])
                    ref_feats = {l: torch.cat(v) for l, v in parts.items()}
            else:
                out = taps.run(loaded.normalize(refs))
                ref_feats = {l: out[l] for l in layers}
        x = torch.randn(1, 3, size, size, device=dev, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.05, betas=(0.5, 0.9))
        times = []
        for step in range(cfg.e2e_steps + 1):
            sync()
            t0 = time.perf_counter()
            xt = torch.roll(x, shifts=(3, -2), dims=(2, 3))
            rel = None
            if kind == "channel":
                rel = relevance_maps(copy.deepcopy(model), xt.detach(), tl, torch.tensor([int(ch)]), layers,
                                     family=loaded.family)
            with FeatureTaps(model, layers) as taps:
                feats = taps.run(xt)
            loss = 0
            for l in layers:
                f = feats[l] * (rel[l] / rel[l].amax().clamp_min(1e-6)) if rel is not None else feats[l]
                loss = loss + R.paper_style_sort_match_loss(f, ref_feats[l])
            opt.zero_grad()
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=kind == "channel")
            opt.step()
            sync()
            if step:
                times.append(time.perf_counter() - t0)
        return {"s_per_target_step": statistics.median(times), "s_per_step": statistics.median(times),
                "precision": "float32", "timed_steps": len(times), "paper_refs": n_refs}
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def e2e_backend(cfg: Config) -> Optional[str]:
    """The backend the ops of visualize are forced to: Triton (so that a broken Triton fails instead of
    falling back to the reference; on the dry run's CPU, under the interpreter); None (the default)
    when Triton cannot run here."""
    return "triton" if triton_reason(cfg) is None else None


def section_e2e(cfg: Config, budget: Budget, sec: Dict[str, Any]) -> None:
    from vital_fast.models import FeatureTaps, load_model

    sync = make_sync(cfg.device)
    forced = e2e_backend(cfg)
    old_env = os.environ.get("VITAL_FAST_BACKEND")
    if forced:
        os.environ["VITAL_FAST_BACKEND"] = forced
    else:
        os.environ.pop("VITAL_FAST_BACKEND", None)
    try:
        backend = _backend.resolve("sort_match_loss", torch.device(cfg.device), None)
        weights = "random" if cfg.model.startswith("torchvision:") else "pretrained"
        loaded = load_model(cfg.model, weights=weights, device=cfg.device)
        with torch.no_grad(), FeatureTaps(loaded.model, [cfg.channel_layer]) as taps:
            probe = taps.run(loaded.normalize(torch.rand(1, 3, cfg.size, cfg.size, device=cfg.device)))
        sec["model"], sec["size"], sec["weights"] = cfg.model, cfg.size, weights
        sec["channels"] = {cfg.channel_layer: int(probe[cfg.channel_layer].shape[1])}
        sec["backend"] = backend
        est = Estimate(cfg.est["e2e_row"])
        skipped = 0
        for kind in ("class", "channel"):
            plan = [("paper-style loop", "off", 1)] + [("vital_fast", amp, B) for amp in cfg.e2e_amps
                                                       for B in cfg.e2e_batches]
            paper_s = None
            for provider, amp, B in plan:
                base = {"model": cfg.model, "target": kind, "B": B, "amp": amp, "provider": provider,
                        "backend": backend if provider == "vital_fast" else "paper-style (torch)"}
                need = est(B * (4 if provider == "paper-style loop" else 1))
                why = budget.why_not(need)
                if why is not None:
                    sec["rows"].append(dict(base, status="skipped", reason=why))
                    skipped += 1
                    continue
                t0 = time.perf_counter()
                try:
                    if provider == "paper-style loop":
                        got = time_paper_loop(loaded, kind, cfg, sync)
                        paper_s = got["s_per_target_step"]
                    else:
                        got = time_visualize(loaded, kind, B, amp, cfg, sync)
                    row = dict(base, status="ok", **got)
                    row["vs_paper"] = paper_s / row["s_per_target_step"] if paper_s else None
                except Exception as exc:  # noqa: BLE001
                    row = dict(base, status="error", reason=error_text(exc), traceback=traceback.format_exc())
                    log(f"e2e row {base}: {error_text(exc)}")
                finally:
                    free_device_memory(cfg.device)
                row["wall_s"] = time.perf_counter() - t0
                est.add(B * (4 if provider == "paper-style loop" else 1), row["wall_s"])
                sec["rows"].append(row)
        errors = sum(r["status"] == "error" for r in sec["rows"])
        sec["status"] = "partial" if (skipped or errors) else "ok"
    finally:
        if old_env is None:
            os.environ.pop("VITAL_FAST_BACKEND", None)
        else:
            os.environ["VITAL_FAST_BACKEND"] = old_env


# --- 4. the step beyond the network ----------------------------------------------------------


def section_step(cfg: Config, budget: Budget, sec: Dict[str, Any]) -> None:
    from benchmarks.bench_visualize import overhead_measure
    from vital_fast.counting import steady_state_counts
    from vital_fast.models import load_model
    from vital_fast.optim import get_preset, visualize
    from vital_fast.references.cache import DiskCache

    sync = make_sync(cfg.device)
    weights = "random" if cfg.model.startswith("torchvision:") else "pretrained"
    loaded = load_model(cfg.model, weights=weights, device=cfg.device)
    cache = DiskCache(enabled=False)
    sec["counts"], sec["overhead"], sec["precision"] = [], [], []
    for B in (2, 8):
        if budget.why_not(cfg.est["e2e_row"]) is not None:
            break
        tg = targets_for("class", B, cfg.channel_layer)
        refs = {t: random_refs(t, cfg.e2e_refs, cfg.size) for t in tg}

        def run(n):
            s = get_preset(FAST_PRESET).replace(stages=[(1.0, n)], ref_crops=0, n_refs=cfg.e2e_refs)
            visualize(loaded, tg, refs, settings=s, size=cfg.size, cache=cache, progress=False)

        c = steady_state_counts(run, 10, [loaded.model])
        sec["counts"].append({"model": cfg.model, "target": "class", "B": B, **c})
    if budget.why_not(cfg.est["e2e_row"] * 2) is None:
        sec["overhead"] = overhead_measure(cfg.step_batches, 10 if cfg.mode == "cuda" else 2,
                                           3 if cfg.mode == "cuda" else 1, cfg.device, sync)
    tg = targets_for("class", 2, cfg.channel_layer)
    refs = {t: random_refs(t, cfg.e2e_refs, cfg.size) for t in tg}
    for amp in ("off", "bf16", "fp16"):
        if budget.why_not(cfg.est["e2e_row"]) is not None:
            break
        marks: List[Tuple[int, float]] = []

        def mark(i, n, losses) -> None:
            sync()
            marks.append((i, time.perf_counter()))

        row: Dict[str, Any] = {"amp": amp}
        try:
            s = get_preset(FAST_PRESET).replace(stages=[(1.0, cfg.precision_steps)], ref_crops=0,
                                                n_refs=cfg.e2e_refs, amp=amp,
                                                loss_every=min(10, max(1, cfg.precision_steps // 3)))
            res = visualize(loaded, tg, refs, settings=s, size=cfg.size, cache=cache, progress=mark)
            (i0, t0), (i1, t1) = marks[0], marks[-1]
            row.update(status="ok", precision=res.precision, final_loss=float(res.losses[:, -1].mean()),
                       s_per_step=(t1 - t0) / max(1, i1 - i0), loss_scale=res.loss_scale)
        except Exception as exc:  # noqa: BLE001 - a dtype the card cannot run: recorded, not fatal
            row.update(status="error", reason=error_text(exc))
        sec["precision"].append(row)
    base = next((r for r in sec["precision"] if r["amp"] == "off" and r["status"] == "ok"), None)
    for r in sec["precision"]:
        if base and r["status"] == "ok":
            r["loss_vs_float32"] = r["final_loss"] / base["final_loss"]
    sec["status"] = "ok" if sec["counts"] and sec["precision"] else "partial"


# --- 5. projections ----------------------------------------------------------------------------


def section_projections(cfg: Config, budget: Budget, sec: Dict[str, Any], e2e: Dict[str, Any]) -> None:
    from vital_fast.optim import get_preset

    steps = get_preset(FAST_PRESET).steps
    sec["preset"], sec["steps"] = FAST_PRESET, steps
    sec["assumptions"] = (f"time per target-step at the largest B measured x {steps} steps x targets; the "
                          "half-resolution steps of the preset are counted at full resolution (an upper "
                          "bound); reference preparation (prototypes, top-k mining, relevance of the "
                          "references) excluded")
    n_ch = (e2e.get("channels") or {}).get(cfg.channel_layer)
    jobs = [("all ImageNet classes", "class", IMAGENET_CLASSES),
            (f"{cfg.channel_layer} sweep", "channel", n_ch)]
    for amp in cfg.e2e_amps:
        for what, kind, n in jobs:
            ok = [r for r in e2e.get("rows", []) if r["status"] == "ok" and r["provider"] == "vital_fast"
                  and r["target"] == kind and r["amp"] == amp]
            base = {"what": what, "target": kind, "amp": amp, "targets": n, "model": cfg.model,
                    "size": cfg.size}
            if not ok or not n:
                sec["rows"].append(dict(base, status="skipped", reason="no end-to-end row measured"))
                continue
            best = max(ok, key=lambda r: r["B"])
            per = best["s_per_target_step"]
            sec["rows"].append(dict(base, status="ok", from_B=best["B"], s_per_target_step=per,
                                    projected_s=per * steps * n))
    sec["status"] = "ok" if any(r["status"] == "ok" for r in sec["rows"]) else "skipped"


# --- 5. the op tests under pytest --------------------------------------------------------------


OP_TEST_FILES = ("tests/test_sort_match.py", "tests/test_lrp_weight.py")


def section_op_tests(cfg: Config, budget: Budget, sec: Dict[str, Any]) -> None:
    files = [ROOT / f for f in OP_TEST_FILES]
    why = triton_reason(cfg)
    try:
        import pytest  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        why = why or f"pytest is not installed ({error_text(exc)})"
    if why is None and not all(f.is_file() for f in files):
        why = f"{', '.join(OP_TEST_FILES)} not found under {ROOT} (not a checkout)"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_TEST_FILES, "-k", cfg.pytest_k]
    sec["command"] = "python " + shlex.join(cmd[1:])
    if why is not None:
        sec.update(status="skipped", reason=why)
        return
    timeout = max(1.0, budget.left() - 2)
    sec["timeout_s"] = timeout
    env = dict(os.environ)
    env.pop("VITAL_FAST_BACKEND", None)
    if cfg.threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = res.stdout, res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        def text(b) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        out, err, rc = text(exc.stdout), text(exc.stderr), None
    sec["wall_s"] = time.perf_counter() - t0
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "deselected")}
    # the summary: the last line like "3 passed, 1 failed, 77 deselected in 4.2s"
    summary = next((l for l in reversed(out.splitlines())
                    if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)", l)), "")
    for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary):
        counts["error" if k.startswith("error") else k] = int(n)
    out = out + err
    sec.update(counts)
    sec["returncode"] = rc
    sec["failures"] = [l for l in out.splitlines() if l.startswith(("FAILED", "ERROR"))][:50]
    sec["output_tail"] = out[-4000:]
    if rc is None:
        sec["status"], sec["reason"] = "timeout", f"stopped after {timeout:.0f} s (the budget's rest)"
    elif counts["failed"] or counts["error"] or rc == 1:
        sec["status"] = "failed"
    elif rc != 0:
        sec["status"], sec["reason"] = "error", f"pytest exited {rc}"
    else:
        sec["status"] = "ok"


# --- the report --------------------------------------------------------------------------------


def meta(cfg: Config, budget: Budget) -> Dict[str, Any]:
    ok, why, tver = triton_status()
    if cfg.device == "cuda":
        dev = torch.cuda.get_device_name(0)
        cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
        mem = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        device = f"{dev} (sm {cap}, {mem:.0f} GiB)"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}"
    return {
        "mode": cfg.mode, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": tver, "triton_error": why, "triton_interpret": _ext.triton_interpret(),
        "vital_fast": vital_fast.__version__, "python": platform.python_version(), "host": platform.node(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": budget.total_s,
        "backends": vital_fast.available_backends(), "config": dataclasses.asdict(cfg),
    }


def correctness_failed(report: Dict[str, Any]) -> bool:
    secs = report["sections"]
    oc, ot = secs.get("op_checks", {}), secs.get("op_tests", {})
    return oc.get("status") in ("failed", "error") or ot.get("status") == "failed"


def _f(v: Optional[float], fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _g(v: Optional[float]) -> str:
    """A number with 3 significant digits (no exponent for the usual range)."""
    if v is None:
        return ""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _status(r: Dict[str, Any]) -> str:
    text = r["status"] + (f": {r['reason']}" if r.get("reason") and r["status"] != "pass" else "")
    return text.replace("|", "\\|").replace("\n", " ")


def _shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def _section_head(lines: List[str], title: str, sec: Optional[Dict[str, Any]]) -> bool:
    lines += ["", f"## {title}", ""]
    if not sec:
        lines.append("not run")
        return False
    note = f"status: {sec.get('status')}"
    if sec.get("summary"):
        note += f" ({sec['summary']})"
    if sec.get("reason"):
        note += f"; {sec['reason']}"
    if sec.get("error"):
        note += f"; error: {sec['error']}"
    if sec.get("wall_s") is not None:
        note += f"; {sec['wall_s']:.1f} s"
    lines.append(note)
    return bool(sec.get("rows") or sec.get("counts")) or title.startswith("Op tests")


def _table(lines: List[str], head: Sequence[str], right: Sequence[int],
           rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table; ``right``: the indexes of right-aligned (numeric) columns."""
    lines += ["", "| " + " | ".join(head) + " |",
              "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: Dict[str, Any]) -> str:
    m, secs = report["meta"], report["sections"]
    title = "GPU check" if m["mode"] == "cuda" else \
        "GPU check, dry run (CPU, tiny shapes, Triton interpreter: numbers mean nothing)"
    interp = " (interpreter)" if m["triton"] and m["triton_interpret"] else ""
    verdict = "FAIL" if report.get("correctness_failed") else "pass"
    lines = [f"# {title}", "",
             f"{m['device']}; torch {m['torch']} (CUDA {m['cuda']}), "
             f"triton {m['triton'] or 'missing'}{interp}, vital_fast {m['vital_fast']}; "
             f"budget {m['budget_s']:.0f} s, ran {report.get('elapsed_s', 0):.0f} s; "
             f"result: {verdict} (exit {report.get('exit_code')})"]

    sec = secs.get("op_checks")
    if _section_head(lines, "Op checks: Triton against the float64 reference", sec):
        head = ["op", "shape (B, C, H, W)", "reference", "dtype", "layout", "path", "loss err", "grad err",
                "status"]
        _table(lines, head, [6, 7],
               [[r["op"], _shape(r["shape"]), r["ref"], r["dtype"], r["layout"], r.get("path", ""),
                 _f(r.get("loss_err"), ".1e"), _f(r.get("grad_err"), ".1e"), _status(r)]
                for r in sec["rows"]])

    sec = secs.get("kernel_table")
    if _section_head(lines, "Kernel table: forward + backward, synchronized, median ms", sec):
        lines += ["", f"copy bandwidth (read + write) {_g(sec.get('copy_gbs'))} GB/s; {sec.get('rounds')} "
                      f"interleaved rounds after {sec.get('warmup')} warm-up; the paper-style loss re-sorts "
                      f"{PAPER_K} references"]
        if "inductor_sees_kernels" in sec:
            lines += [f"compiled loss: inductor's code launches the Triton kernels itself (triton_op): "
                      f"{sec['inductor_sees_kernels']}"]
        rows = []
        for r in sec["rows"]:
            gbs = f"{_g(r['gbs'])} ({_g(r['pct_of_copy'])} %)" if r.get("gbs") else ""
            sp = f"{_g(r['triton_speedup'])}x" if r.get("triton_speedup") else ""
            rows.append([_shape(r["shape"]), r["provider"], _g(r.get("ms")), sp, gbs, _status(r)])
        _table(lines, ["shape (B, C, H, W)", "provider", "fwd+bwd ms", "Triton speed-up", "GB/s (% of copy)",
                       "status"], [2, 3, 4], rows)

    sec = secs.get("e2e")
    if _section_head(lines, "End to end: seconds per target-step", sec):
        lines += ["", f"{sec.get('model')} ({sec.get('weights')} weights) at {sec.get('size')} px; "
                      f"ops backend {sec.get('backend')}; the steps after the first, synchronized"]
        rows = []
        for r in sec["rows"]:
            prec = r.get("precision") or AMP_NAMES.get(r["amp"], r["amp"])
            vs = f"{_g(r['vs_paper'])}x" if r.get("vs_paper") else ""
            rows.append([r["target"], r["provider"], str(r["B"]), prec, r["backend"],
                         _g(r.get("s_per_target_step")), vs, _status(r)])
        head = ["target", "provider", "B", "precision", "backend", "s per target-step", "vs paper loop",
                "status"]
        _table(lines, head, [2, 5, 6], rows)

    sec = secs.get("step")
    if _section_head(lines, "The step beyond the network", sec):
        lines += ["", "Per steady-state step of visualize (class targets, fast preset): every aten op, the ops on "
                      "device tensors (kernel launches), and device reads (one every loss_every = 10 steps: 0.1)"]
        _table(lines, ["model", "B", "aten ops", "device ops", "device reads"], [1, 2, 3, 4],
               [[r["model"], str(r["B"]), f"{r['ops']:.0f}", f"{r['device_ops']:.0f}", f"{r['reads']:.2f}"]
                for r in sec.get("counts", [])])
        lines += ["", "The engine's overhead: a 3-layer CNN at 32 px, engine step against the bare network's "
                      "forward + backward (synchronized)"]
        _table(lines, ["B", "engine s/step", "network s/step", "engine / network", "device ops", "reads"],
               [0, 1, 2, 3, 4, 5],
               [[str(r["B"]), _g(r["engine_s"]), _g(r["network_s"]), f"{r['ratio']:.1f}x", f"{r['device_ops']:.0f}",
                 f"{r['reads']:.2f}"] for r in sec.get("overhead", [])])
        lines += ["", "Precision on this device (B = 2 class targets, fast preset): seconds per step and the loss "
                      "reached; float16 with the dynamic loss scale"]
        _table(lines, ["amp", "precision", "s/step", "final loss", "vs float32", "loss scale", "status"], [2, 3, 4],
               [[r["amp"], r.get("precision", ""), _g(r.get("s_per_step")), _g(r.get("final_loss")),
                 _f(r.get("loss_vs_float32"), ".2f"), str(r.get("loss_scale") or ""), _status(r)]
                for r in sec.get("precision", [])])

    sec = secs.get("projections")
    if _section_head(lines, f"Projections: the {FAST_PRESET} preset", sec):
        lines += ["", sec.get("assumptions", "")]
        rows = [[r["what"], str(r["targets"]), AMP_NAMES.get(r["amp"], r["amp"]), str(r.get("from_B", "")),
                 _g(r.get("s_per_target_step")),
                 _dur(r["projected_s"]) if r.get("projected_s") is not None else _status(r)]
                for r in sec["rows"]]
        head = ["job", "targets", "precision", "from B", "s per target-step", "projected"]
        _table(lines, head, [1, 3, 4, 5], rows)

    sec = secs.get("op_tests")
    if _section_head(lines, "Op tests: Triton cases of the test suite under pytest", sec):
        _table(lines, ["command", "passed", "failed", "errors", "skipped", "status"], [1, 2, 3, 4],
               [[f"`{sec.get('command', '')}`",
                 *(str(sec.get(k, "")) for k in ("passed", "failed", "error", "skipped")),
                 str(sec.get("status"))]])
        lines += [f"- {f}" for f in sec.get("failures", [])]
    return "\n".join(lines) + "\n"


def write_outputs(report: Dict[str, Any], out: Path, budget: Budget) -> str:
    report["elapsed_s"] = budget.elapsed()
    report["correctness_failed"] = correctness_failed(report)
    report["exit_code"] = 1 if report["correctness_failed"] else 0
    md = markdown(report)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(md)
    return md


SECTIONS = ("op_checks", "kernel_table", "e2e", "step", "projections", "op_tests")


def run_check(cfg: Config, out: Path, budget_s: float) -> int:
    """Run every section within the budget; write the outputs after each; return the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    budget = Budget(budget_s, T_START)
    report: Dict[str, Any] = {"meta": meta(cfg, budget), "sections": {}}
    log(f"{cfg.mode} on {report['meta']['device']}, budget {budget_s:.0f} s, writing to {out}")
    fns = {
        "op_checks": lambda sec: section_op_checks(cfg, budget, sec),
        "kernel_table": lambda sec: section_kernel_table(cfg, budget, sec),
        "e2e": lambda sec: section_e2e(cfg, budget, sec),
        "step": lambda sec: section_step(cfg, budget, sec),
        "projections": lambda sec: section_projections(cfg, budget, sec, report["sections"].get("e2e", {})),
        "op_tests": lambda sec: section_op_tests(cfg, budget, sec),
    }
    for name in SECTIONS:
        sec: Dict[str, Any] = {"status": None, "rows": []}
        report["sections"][name] = sec
        why = budget.why_not(cfg.est[name])
        if why is not None:
            sec.update(status="skipped", reason=why)
            log(f"{name}: skipped ({why})")
            write_outputs(report, out, budget)
            continue
        log(f"{name}: running ({budget.left():.0f} s left)")
        t0 = time.perf_counter()
        try:
            fns[name](sec)
            sec["status"] = sec["status"] or "ok"
        except Exception as exc:  # noqa: BLE001 - the check reports as much as it can
            sec.update(status="error", error=error_text(exc), traceback=traceback.format_exc())
            log(f"{name}: error {error_text(exc)}")
        finally:
            free_device_memory(cfg.device)
        sec["wall_s"] = time.perf_counter() - t0
        log(f"{name}: {sec['status']} in {sec['wall_s']:.1f} s")
        write_outputs(report, out, budget)
    md = write_outputs(report, out, budget)
    print(md, flush=True)
    return report["exit_code"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (the ``__main__`` path): the only place that sets TRITON_INTERPRET."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same code on the CPU with tiny shapes, Triton under its interpreter")
    ap.add_argument("--budget-s", type=float, default=480.0, help="time budget in seconds (default 480)")
    a = ap.parse_args(argv)
    if a.dry_run:
        # Before anything imports triton's kernels: this process only (the __main__ path).
        if not _ext.triton_interpret():
            os.environ["TRITON_INTERPRET"] = "1"
        if "vital_fast.kernels.triton.sort_match" in sys.modules:
            log("warning: the Triton kernels were imported before TRITON_INTERPRET=1 was set")
        cfg = dry_config()
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                  "use --dry-run to run the same checks on the CPU with tiny shapes", file=sys.stderr)
            return 2
        if _ext.triton_interpret():
            log("TRITON_INTERPRET is set: unset for this run, so that the kernels compile for the GPU")
            os.environ.pop("TRITON_INTERPRET", None)
        cfg = real_config()
    return run_check(cfg, a.out, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
