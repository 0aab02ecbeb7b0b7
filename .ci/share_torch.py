"""Lend the CI venv's torch to the sdist check's clean venv, so torch is on disk once.

Usage: share_torch.py FARM PTH. Run by the CI venv's python: it links the top-level files of
torch, torchvision and everything they require (their RECORDs say which) into FARM, and writes
PTH, a path-configuration file that puts FARM on the clean venv's sys.path after its own
site-packages. Nothing of vital_fast, pip or setuptools is linked, so the sdist and its other
dependencies still install from scratch into the clean venv. A second install of torch there
cost about 5.5 GB and ran a CI machine out of disk.
"""

import os
import sys
from importlib import metadata


def closure(roots):
    """The distributions ``roots`` need, following each requirement's extras (torch asks for
    ``cuda-toolkit[cublas,...]``, whose dependencies are all behind extras) and markers."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, visited, todo = {}, set(), [(r, frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in ("pip", "setuptools", "wheel") or (key, extras) in visited:
            continue  # the clean venv has its own installers
        visited.add((key, extras))
        if key not in found:
            try:
                found[key] = metadata.distribution(key)
            except metadata.PackageNotFoundError:
                continue  # a marker-excluded requirement (another platform) is simply not there
        for text in found[key].requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in sorted(extras)] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return found.values()


def main(farm, pth):
    os.makedirs(farm, exist_ok=True)
    linked = set()
    for dist in closure(["torch", "torchvision"]):
        root = os.fspath(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in linked or top.startswith("..") or top == "__pycache__" or top.endswith(".pth"):
                continue  # console scripts live in ../../../bin; not needed to import
            src = os.path.join(root, top)
            if os.path.exists(src):
                os.symlink(src, os.path.join(farm, top))
                linked.add(top)
    with open(pth, "w") as fh:
        fh.write(os.path.abspath(farm) + "\n")
    print(f"ci: the clean venv borrows {len(linked)} entries of torch and its dependencies")


if __name__ == "__main__":
    main(*sys.argv[1:])
