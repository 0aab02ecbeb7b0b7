"""Lend the CI venv's torch to the sdist check's clean venv, so torch is on disk once.

Usage: share_torch.py FARM PTH. Run by the CI venv's python: it links the top-level files of
torch, torchvision and everything they require (their RECORDs say which) into FARM, and writes
PTH, a path-configuration file that puts FARM on the clean venv's sys.path after its own
site-packages. Nothing of vital_fast, pip or setuptools is linked, so the sdist and its other
dependencies still install from scratch into the clean venv. A second install of torch there
cost about 5.5 GB and ran a CI machine out of disk.
"""

import os
import re
import sys
from importlib import metadata


def _name(req):
    """The distribution a requirement string names, or None when only an extra asks for it."""
    if "extra ==" in req or "extra==" in req:
        return None
    return re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0]


def closure(roots):
    seen, todo = {}, list(roots)
    while todo:
        key = todo.pop().lower().replace("_", "-")
        if key in seen or key in ("pip", "setuptools", "wheel"):
            continue  # the clean venv has its own
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded requirement (another platform) is simply not there
        seen[key] = dist
        todo.extend(n for n in map(_name, dist.requires or []) if n)
    return seen.values()


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
