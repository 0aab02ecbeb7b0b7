"""The runs index: one page over a folder of run folders (``vital-fast report DIR``), linking every
run's gallery and the comparison pages found beside them."""

from __future__ import annotations

import json
import os
from typing import List, Sequence

from vital_fast.files import atomic_write_bytes
from vital_fast.report.gallery import (
    CHECK_JS,
    CSS,
    RUNS_MARKER,
    _comparison_links,
    build_gallery,
    esc,
    plural,
    run_when,
    src,
)
from vital_fast.results import read_manifest

__all__ = ["build_report", "build_runs_index"]


def _find_comparisons(root: str, run_dirs: Sequence[str]) -> List[str]:
    """Comparison pages (a folder with compare.json and index.html) under ``root`` and its runs."""
    found = []
    for base in [root] + list(run_dirs):
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for n in names:
            d = os.path.join(base, n)
            if os.path.isfile(os.path.join(d, "compare.json")) and os.path.isfile(os.path.join(d, "index.html")):
                found.append(d)
    return found


def build_runs_index(root: str) -> str:
    """``root/index.html`` listing the run folders in ``root`` (each gallery rebuilt) and their comparisons."""
    runs = []
    for n in sorted(os.listdir(root)):
        d = os.path.join(root, n)
        if os.path.isfile(os.path.join(d, "manifest.json")):
            try:
                runs.append((d, read_manifest(d)))
            except ValueError:
                continue
    if not runs:
        raise ValueError(f"{root} is not a vital_fast run folder (no manifest.json) and holds no run folders")
    atomic_write_bytes(os.path.join(root, RUNS_MARKER),
                       json.dumps({"runs": [os.path.basename(d) for d, _ in runs]}, indent=1).encode("utf-8"))
    rows = []
    for d, m in runs:
        build_gallery(d)
        name = os.path.basename(d)
        sweep = m.get("sweep") or {}
        n = len(m.get("targets", []))
        count = f"{n} of {sweep.get('total')}" if sweep and sweep.get("total") != n else str(n)
        took = float((m.get("timings") or {}).get("total_s", 0) or 0)
        comps = _comparison_links(d, name)
        rows.append(
            f'<tr><td><a class="run" href="{src(name + "/index.html")}">{esc(name)}</a></td>'
            f"<td><code>{esc(m.get('model', {}).get('name'))}</code></td><td>{esc(m.get('method', 'vital'))}</td>"
            f"<td>{esc(count)}</td><td>{esc(run_when(m))}</td><td>{esc(f'{took:.1f} s')}</td>"
            f"<td>{'<br>'.join(comps)}</td></tr>")
    comps = []
    for c in _find_comparisons(root, [d for d, _ in runs]):
        rel = os.path.relpath(c, root).replace(os.sep, "/")
        comps.append(f'<li><a class="cmp" href="{src(rel + "/index.html")}">{esc(rel)}</a></li>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>vital_fast runs — {esc(os.path.basename(os.path.abspath(root)))}</title><style>{CSS}</style></head>
<body><header><h1>{plural(len(runs), 'run')} in {esc(os.path.basename(os.path.abspath(root)))}</h1></header><main>
<table class="runs"><tr><th>run</th><th>model</th><th>method</th><th>targets</th><th>date</th><th>time taken</th><th>comparisons</th></tr>
{"".join(rows)}</table>
{"<h2>Comparisons</h2><ul>" + "".join(comps) + "</ul>" if comps else ""}
</main><script>{CHECK_JS}</script></body></html>
"""
    path = os.path.join(root, "index.html")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def build_report(path: str) -> str:
    """A run folder's gallery, or the runs index of a folder of run folders; returns the index's path."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return build_gallery(path)
    return build_runs_index(path)
