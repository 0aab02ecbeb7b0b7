"""Metric files and tables: what :mod:`vital_fast.evaluate.metrics` computed, written into run folders.

- :func:`write_run_metrics`: a run's ``metrics.json``, ``metrics.md`` and ``metrics.csv``, its
  manifest's metrics (for the gallery's table and sort) and its gallery.
- :func:`write_compare_tables`: ``compare.md``, ``compare.csv`` and ``compare.json`` of several runs.
- :func:`markdown_table`: one row per mapping, one column per ``(key, header, format)``;
  :data:`COLUMNS` are the columns of the comparison table; those in :data:`OPTIONAL` (the 2-AFC of
  unit targets) are left out of a markdown table where no row has a value.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from vital_fast.files import atomic_write_bytes
from vital_fast.report.gallery import build_gallery
from vital_fast.results import MANIFEST, read_manifest, write_json_atomic

NA = "n/a"
METRICS_JSON = "metrics.json"

# Columns of the comparison table: (summary key, header, format).
COLUMNS: List[Tuple[str, str, str]] = [
    ("method", "method", "s"), ("model", "model", "s"), ("targets", "targets", "d"),
    ("s_per_target", "s / target", ".1f"),
    ("model_top1", "model top-1", "%"), ("model_top5", "model top-5", "%"),
    ("judge_top1", "judge top-1", "%"), ("judge_top5", "judge top-5", "%"),
    ("judge_top1_rec", "judge top-1, refs recognized", "%"),
    ("fid", "FID (judge) ↓", ".1f"), ("w2", "W2 ↓", ".4g"), ("act_ratio", "act. ratio", ".2f"),
    ("afc", "2-AFC (judge)", "%"), ("afc_ci", "2-AFC 95 % CI", "ci"), ("afc_trials", "2-AFC trials", "d"),
    ("specificity", "specificity", "%"), ("spec_ratio", "own / strongest other", ".2f"), ("copy", "copy ↓", ".2f"),
    ("diversity", "diversity", ".3f"),
]
# Columns shown only when some row has a value (runs without unit targets have no 2-AFC or specificity).
OPTIONAL = frozenset({"afc", "afc_ci", "afc_trials", "specificity", "spec_ratio", "copy"})


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return NA
    if spec == "s" or isinstance(v, str):
        return str(v)
    if spec == "ci":  # [low, high] fractions
        lo, hi = v
        return f"[{100 * float(lo):.1f}, {100 * float(hi):.1f}] %"
    if spec == "d":
        return str(int(v))
    if spec == "%":
        return f"{100 * float(v):.1f} %"
    return format(float(v), spec)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str, str]] = COLUMNS) -> str:
    """A markdown table with one row per mapping and one column per ``(key, header, format)``.

    A column whose key is in :data:`OPTIONAL` is left out when no row has a value for it.
    """
    columns = [c for c in columns
               if c[0] not in OPTIONAL or any(r.get(c[0], NA) not in (NA, None) for r in rows)]
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k, NA), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([("" if r.get(k) is None else r.get(k, NA)) for k in keys])
    return buf.getvalue()


def write_run_metrics(run_dir: str, metrics: Dict[str, Any], rebuild_gallery: bool = True) -> None:
    """metrics.json, metrics.md, metrics.csv, and the manifest's metrics (atomically); then the gallery."""
    write_json_atomic(metrics, os.path.join(run_dir, METRICS_JSON))
    s = metrics["summary"]
    rows = []
    m = read_manifest(run_dir)
    labels = {t["key"]: t.get("label", t["key"]) for t in m.get("targets", [])}
    tcols = [("key", "target", "s"), ("label", "label", "s"), ("model_top1", "model top-1", "d"),
             ("judge_top1", "judge top-1", "d"), ("judge_prob", "judge p(class)", ".3f"), ("w2", "W2", ".4g"),
             ("act_ratio", "act. ratio", ".2f"), ("afc", "2-AFC", "%"), ("primary", "primary", ".3g")]
    for key, p in metrics["targets"].items():
        rows.append(dict(p, key=key, label=labels.get(key, key)))
    md = [f"# Metrics of {os.path.basename(os.path.normpath(run_dir))}", "", markdown_table([s]), "",
          markdown_table(rows, tcols), ""]
    if metrics["messages"]:
        md += ["Notes:", ""] + [f"- {x}" for x in metrics["messages"]] + [""]
    atomic_write_bytes(os.path.join(run_dir, "metrics.md"), "\n".join(md).encode("utf-8"))
    keys = ["key", "label", "model_top1", "model_top5", "model_prob", "judge_top1", "judge_top5", "judge_prob",
            "refs_recognized", "w2", "act_ratio", "afc", "primary"]
    summary_row = {"key": "ALL", "label": s.get("method"), **{k: s.get(k) for k in keys if k in s}}
    atomic_write_bytes(os.path.join(run_dir, "metrics.csv"), _csv(rows + [summary_row], keys).encode("utf-8"))
    # the manifest: summary for the gallery's table, per-target metrics with "primary" for its sort
    shown = {k: s[k] for k in ("method", "judge", "model_top1", "model_top5", "judge_top1", "judge_top5",
                               "judge_top1_rec", "recognized_targets", "ref_judge_top1", "fid", "fid_images", "w2",
                               "act_ratio", "afc", "afc_ci", "afc_trials", "diversity", "s_per_target",
                               "notes") if k in s and s[k] != "" and not (k in OPTIONAL and s[k] == NA)}
    shown = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if k == "afc_ci" else v)
             for k, v in shown.items()}
    m["metrics"] = {"summary": shown}
    for t in m.get("targets", []):
        if t["key"] in metrics["targets"]:
            t["metrics"] = {k: v for k, v in metrics["targets"][t["key"]].items()
                            if not isinstance(v, str) or k == "primary"}
    write_json_atomic(m, os.path.join(run_dir, MANIFEST))
    if rebuild_gallery:
        build_gallery(run_dir)


def write_compare_tables(out: str, run_dirs: Sequence[str], rows: Sequence[Mapping[str, Any]], md: str,
                         per_run: Sequence[Mapping[str, Any]]) -> None:
    """``out/compare.md`` (the table ``md``), ``compare.csv`` (``rows``) and ``compare.json`` (with ``per_run``)."""
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(os.path.join(out, "compare.md"), (md + "\n").encode("utf-8"))
    keys = [k for k, _, _ in COLUMNS] + ["runs", "notes"]
    atomic_write_bytes(os.path.join(out, "compare.csv"), _csv(rows, keys).encode("utf-8"))
    write_json_atomic({"runs": [os.path.abspath(r) for r in run_dirs], "rows": list(rows),
                       "per_run": list(per_run)}, os.path.join(out, "compare.json"))
