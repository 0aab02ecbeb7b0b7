"""Build of vital_fast: one optional C++ extension (vital_fast._C) from csrc/.

VITAL_FAST_BUILD_EXT=0 skips the extension (the package then runs on the pure-torch reference);
DEBUG=1 builds it with -O0 -g. Install with ``pip install --no-build-isolation -e .`` so that the
build uses the torch already installed instead of fetching another one.
"""

import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "vital_fast", "_version.py"), encoding="utf-8") as fh:
        return re.search(r'__version__\s*=\s*"([^"]+)"', fh.read()).group(1)


def extensions():
    if os.environ.get("VITAL_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile and link time, or at::parallel_for silently runs on one thread.
    cxx += ["-fopenmp"]  # BuildExtension picks the C++ standard torch needs (C++20 for 2.14)
    ext = CppExtension(
        "vital_fast._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="vital_fast",
    version=read_version(),
    description="Fast VITAL feature visualization for PyTorch: fused sort-matching kernels, batched optimizer",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vital_fast", "vital_fast.*"]),
    package_data={"vital_fast": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "gpu": ["triton"],
        "lrp": ["zennit"],
        "test": ["pytest", "pytest-benchmark", "scipy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["vital-fast=vital_fast.cli.main:main"]},
    zip_safe=False,
)
