"""Compare two runs of the same targets (for example on two versions of a model).

For each common target, the two visualizations are embedded in a model's penultimate feature
space (the input of its last linear layer) and their cosine distance is reported; the gallery
lists targets by that distance, largest first, so a reviewer sees first what changed most.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import List, Tuple

import numpy as np
import torch

from vital_fast.report.gallery import CHECK_JS, CSS, build_gallery, esc, page_path, record_comparison, src
from vital_fast.files import atomic_write_bytes
from vital_fast.references.images import load_image, resize_center_crop
from vital_fast.results import read_manifest


def penultimate_features(loaded, images: torch.Tensor) -> torch.Tensor:
    """Inputs of the model's last ``nn.Linear`` for images ``(N, 3, H, W)`` in [0, 1]."""
    last = None
    for m in loaded.model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    x = loaded.normalize(torch.stack([resize_center_crop(im, loaded.input_size, loaded.input_size, loaded.interpolation) for im in images]))
    dev = next(iter(loaded.model.parameters())).device
    if last is None:
        with torch.no_grad():
            return loaded.model(x.to(dev)).flatten(1).float().cpu()
    store = {}
    h = last.register_forward_pre_hook(lambda mod, inp: store.__setitem__("f", inp[0].detach()))
    try:
        with torch.no_grad():
            loaded.model(x.to(dev))
    finally:
        h.remove()
    return store["f"].flatten(1).float().cpu()


def _try_load(name: str, fingerprint: str):
    from vital_fast.models import load_model

    try:
        loaded = load_model(name)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"compare: cannot load model {name!r} ({exc})")
        return None
    if loaded.fingerprint != fingerprint:
        warnings.warn(f"compare: model {name!r} loads with fingerprint {loaded.fingerprint}, the run recorded "
                      f"{fingerprint}; using it anyway")
    return loaded


def compare_runs(run_a: str, run_b: str, out: str) -> str:
    """Write ``out/index.html`` and ``out/compare.json``; returns the HTML path."""
    ma, mb = read_manifest(run_a), read_manifest(run_b)
    ta = {t["key"]: t for t in ma.get("targets", [])}
    tb = {t["key"]: t for t in mb.get("targets", [])}
    common = [k for k in ta if k in tb]
    if not common:
        raise ValueError(f"{run_a} and {run_b} share no targets (A: {len(ta)} targets, B: {len(tb)})")
    imgs_a = torch.stack([load_image(os.path.join(run_a, ta[k]["files"]["image"])) for k in common])
    imgs_b = torch.stack([load_image(os.path.join(run_b, tb[k]["files"]["image"])) for k in common])
    spaces: List[Tuple[str, np.ndarray]] = []
    seen = set()
    for m in (ma, mb):
        name, fp = m.get("model", {}).get("name"), m.get("model", {}).get("fingerprint")
        if not name or (name, fp) in seen:
            continue
        seen.add((name, fp))
        loaded = _try_load(name, fp)
        if loaded is None:
            continue
        fa, fb = penultimate_features(loaded, imgs_a), penultimate_features(loaded, imgs_b)
        d = 1 - torch.nn.functional.cosine_similarity(fa, fb, dim=1)
        spaces.append((f"{name} ({fp})", d.numpy()))
    if spaces:
        dist = np.mean([d for _, d in spaces], axis=0)
        how = "cosine distance of penultimate features, averaged over: " + "; ".join(s for s, _ in spaces)
    else:
        dist = (imgs_a - imgs_b).flatten(1).pow(2).mean(1).sqrt().numpy()
        how = "pixel RMS distance (neither run's model could be loaded)"
    order = np.argsort(-dist)
    rows = []
    for i in order:
        k = common[i]
        rows.append({"key": k, "label": tb[k].get("label", k), "distance": float(dist[i]),
                     "a": os.path.relpath(os.path.join(run_a, ta[k]["files"]["image"]), out),
                     "b": os.path.relpath(os.path.join(run_b, tb[k]["files"]["image"]), out),
                     "page_a": os.path.relpath(os.path.join(run_a, page_path(ta[k])), out),
                     "page_b": os.path.relpath(os.path.join(run_b, page_path(tb[k])), out)})
    os.makedirs(out, exist_ok=True)
    report = {"run_a": os.path.abspath(run_a), "run_b": os.path.abspath(run_b), "measure": how,
              "model_a": ma.get("model"), "model_b": mb.get("model"), "targets": rows,
              "only_in_a": [k for k in ta if k not in tb], "only_in_b": [k for k in tb if k not in ta]}
    atomic_write_bytes(os.path.join(out, "compare.json"), json.dumps(report, indent=2).encode())
    # each run's gallery links this page, and this page links both runs and every target's page
    name_a, name_b = os.path.basename(os.path.abspath(run_a)), os.path.basename(os.path.abspath(run_b))
    page_file = os.path.join(out, "index.html")
    for run, other in ((run_a, name_b), (run_b, name_a)):
        record_comparison(run, page_file, other)
    link_a = os.path.relpath(os.path.join(run_a, "index.html"), out)
    link_b = os.path.relpath(os.path.join(run_b, "index.html"), out)
    body = "".join(
        f'<tr><td>{esc(r["label"])}<br><small>{esc(r["key"])}</small></td><td>{r["distance"]:.4f}</td>'
        f'<td><a href="{src(r["page_a"])}"><img loading="lazy" src="{src(r["a"])}" width="180" alt="A: {esc(r["label"])}"></a></td>'
        f'<td><a href="{src(r["page_b"])}"><img loading="lazy" src="{src(r["b"])}" width="180" alt="B: {esc(r["label"])}"></a></td></tr>'
        for r in rows
    )
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>vital_fast compare</title>
<style>{CSS} table{{border-collapse:collapse;margin:16px 24px}} td,th{{border:1px solid #dde1e7;padding:6px;background:#fff;vertical-align:top}}</style></head>
<body><header><h1>Comparison, sorted by change</h1><div class="meta">
A: <a id="run-a" href="{src(link_a)}"><code>{esc(name_a)}</code></a> <code>{esc(run_a)}</code> — {esc(ma.get('model', {}).get('name'))} <code>{esc(ma.get('model', {}).get('fingerprint'))}</code><br>
B: <a id="run-b" href="{src(link_b)}"><code>{esc(name_b)}</code></a> <code>{esc(run_b)}</code> — {esc(mb.get('model', {}).get('name'))} <code>{esc(mb.get('model', {}).get('fingerprint'))}</code><br>
distance: {esc(how)}<br>{len(rows)} common targets; only in A: {len(report['only_in_a'])}; only in B: {len(report['only_in_b'])}</div></header>
<table><tr><th>target</th><th>distance</th><th>A</th><th>B</th></tr>{body}</table>
<p class="meta" style="padding:0 24px"><a download href="compare.json">compare.json</a></p><script>{CHECK_JS}</script></body></html>"""
    atomic_write_bytes(page_file, page.encode("utf-8"))
    for run in (run_a, run_b):  # so that each gallery links this comparison
        build_gallery(run)
    return page_file
