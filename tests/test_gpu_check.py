"""The one-shot GPU check (benchmarks/gpu_check.py) runs end to end in its dry run, so it does not rot.

The dry run is the same code as the CUDA run on the CPU, with tiny shapes, ResNet-18 at 32 px and
Triton under its interpreter (it sets TRITON_INTERPRET=1 in its own process). It runs in a
subprocess, as CI and a user run it: about 12 s on 2 shared cores. Unmarked: it runs in `make test`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"op_checks", "kernel_table", "e2e", "step", "projections", "op_tests"}


def _run(args, timeout=600, env=None):
    full = dict(os.environ)
    for k in ("TRITON_INTERPRET", "VITAL_FAST_BACKEND"):
        full.pop(k, None)  # the dry run must set what it needs itself
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = _run(["--dry-run", "--out", str(out)])
    return res, out


def test_dry_run_exits_zero_and_writes_both_files(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-4000:]
    assert (out / "gpu_check.json").is_file() and (out / "gpu_check.md").is_file()


def test_dry_run_json_has_every_section(dry_run):
    res, out = dry_run
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["meta"]["mode"] == "dry-run" and rep["exit_code"] == 0
    assert set(rep["sections"]) == SECTIONS
    secs = rep["sections"]
    ran_triton = rep["meta"]["triton"] is not None
    if ran_triton:  # triton comes with torch on Linux; without it the Triton rows are skipped with a reason
        assert rep["meta"]["triton_interpret"] is True
        assert secs["op_checks"]["status"] == "ok"
        assert secs["op_checks"]["rows"] and all(r["status"] == "pass" for r in secs["op_checks"]["rows"])
        assert {r["path"] for r in secs["op_checks"]["rows"]} == {"fused", "torch.sort + epilogue"}
        assert secs["op_tests"]["status"] == "ok" and secs["op_tests"]["passed"] > 0
    else:
        assert secs["op_checks"]["status"] == "skipped" and secs["op_checks"]["reason"]
    providers = {r["provider"] for r in secs["kernel_table"]["rows"] if r["status"] == "ok"}
    assert {"torch.sort + autograd", "paper-style"} <= providers
    assert ("triton (fused)" in providers) == ran_triton == ("triton compiled" in providers)
    assert (secs["e2e"]["backend"] == "triton") == ran_triton  # visualize's ops forced to Triton
    e2e = secs["e2e"]["rows"]
    for kind in ("class", "channel"):
        got = {(r["provider"], r["B"], r["amp"]) for r in e2e if r["target"] == kind and r["status"] == "ok"}
        assert got == {("paper-style loop", 1, "off"), ("vital_fast", 1, "off"), ("vital_fast", 2, "off"),
                       ("vital_fast", 1, "bf16"), ("vital_fast", 2, "bf16")}, (kind, e2e)
    assert all(r["s_per_target_step"] > 0 for r in e2e)
    proj = secs["projections"]["rows"]
    assert {r["what"] for r in proj} == {"all ImageNet classes", "layer3 sweep"}
    assert all(r["status"] == "ok" and r["projected_s"] > 0 for r in proj)
    assert {r["targets"] for r in proj} == {1000, 256}  # resnet18's layer3 has 256 channels
    step = secs["step"]
    assert step["status"] == "ok", step
    assert [r["B"] for r in step["counts"]] == [2, 8] and all(r["reads"] <= 0.1 for r in step["counts"])
    assert [r["B"] for r in step["overhead"]] == [1, 2] and all(r["ratio"] > 0 for r in step["overhead"])
    prec = {r["amp"]: r for r in step["precision"]}
    assert set(prec) == {"off", "bf16", "fp16"} and all(r["status"] == "ok" for r in prec.values()), prec
    assert prec["fp16"]["precision"] == "float16" and prec["fp16"]["loss_scale"]["scale"] > 0


def test_dry_run_markdown_has_tables_and_is_printed(dry_run):
    res, out = dry_run
    md = (out / "gpu_check.md").read_text()
    for head in ("## Op checks", "## Kernel table", "## End to end", "## The step beyond the network", "## Projections",
                 "## Op tests"):
        assert head in md
    assert "| op | shape (B, C, H, W) |" in md and "|---|" in md
    assert "| shape (B, C, H, W) | provider | fwd+bwd ms |" in md
    assert md.strip() in res.stdout


def test_budget_skips_sections_and_records_why(tmp_path):
    """A budget too small for anything: every section is recorded as skipped, and it still exits 0."""
    res = _run(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"], timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in SECTIONS:
        assert rep["sections"][name]["status"] == "skipped", name
        assert rep["sections"][name]["reason"].startswith("budget"), rep["sections"][name]


def test_without_triton_the_triton_rows_are_skipped_with_the_reason(tmp_path):
    """A triton that does not import: the check still runs, and says why the Triton rows are missing."""
    fake = tmp_path / "site" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("triton blocked by the test")\n')
    env = {"PYTHONPATH": os.pathsep.join(p for p in [str(fake.parent), os.environ.get("PYTHONPATH")] if p)}
    res = _run(["--dry-run", "--out", str(tmp_path / "out")], env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rep["meta"]["triton"] is None
    secs = rep["sections"]
    for name in ("op_checks", "op_tests"):
        assert secs[name]["status"] == "skipped", name
        assert "triton blocked by the test" in secs[name]["reason"], name
    assert all(r["status"] == "skipped" and "triton blocked" in r["reason"]
               for r in secs["op_checks"]["rows"])
    rows = secs["kernel_table"]["rows"]
    assert all(r["status"] == "skipped" and "triton blocked" in r["reason"]
               for r in rows if r["provider"].startswith("triton"))
    assert all(r["status"] == "ok" for r in rows if not r["provider"].startswith("triton"))
    assert secs["e2e"]["backend"] != "triton" and all(r["status"] == "ok" for r in secs["e2e"]["rows"])


def test_without_cuda_and_without_dry_run_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real check would run")
    res = _run(["--out", str(tmp_path)], timeout=300)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--dry-run" in res.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_kernel_table_takes_a_device_and_refuses_cuda_without_one(capsys):
    """`vital-fast bench` / `python -m benchmarks.table` on the CPU (tiny shape) and with --device cuda on a
    machine without CUDA: a one-line usage error, exit 2, before any timing."""
    import io

    import torch

    from vital_fast.bench import make_sync, run
    from vital_fast.cli.main import main

    out = io.StringIO()
    res = run([1], 1, 1, shapes=[(4, 6, 6)], out=out, device="cpu")
    assert res["device"] == "cpu" and {r["provider"] for r in res["rows"]} == {"reference", "paper-style", "vital_fast"}
    assert "| (1, 4, 6, 6) | vital_fast |" in out.getvalue()
    make_sync("cpu")()  # a no-op on the CPU
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda", "--quick", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err
    proc = subprocess.run([sys.executable, "-m", "benchmarks.table", "--device", "cuda", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
