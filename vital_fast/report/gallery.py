"""The HTML gallery of a run: one static ``index.html`` that opens from disk, with no network.

Every text that comes from a file name, a label, a setting or a user argument is escaped.
Cards are rendered in the page (it works without JavaScript); a small inline script filters by
layer, kind and text, sorts, and pages through thousands of targets, with images loaded lazily.
"""

from __future__ import annotations

import html
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

from vital_fast.references.cache import atomic_write_bytes
from vital_fast.results import read_manifest

PAGE_SIZE = 60


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def src(path: str) -> str:
    """A relative file path as a safe, URL-quoted attribute value."""
    return esc(quote(path.replace(os.sep, "/"), safe="/"))


def loss_svg(losses: Sequence[float], w: int = 220, h: int = 60) -> str:
    """An inline SVG polyline of a loss curve (log scale when it spans decades)."""
    import math

    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return '<svg class="loss" width="%d" height="%d"></svg>' % (w, h)
    use_log = min(vals) > 0 and max(vals) / min(vals) > 20
    ys = [math.log10(v) for v in vals] if use_log else vals
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    step = max(1, len(ys) // 200)
    pts = " ".join(
        f"{(i / (len(ys) - 1)) * (w - 4) + 2:.1f},{h - 2 - (y - lo) / span * (h - 4):.1f}"
        for i, y in list(enumerate(ys))[::step] + [(len(ys) - 1, ys[-1])]
    )
    title = f"loss {vals[0]:.4g} → {vals[-1]:.4g} over {len(vals)} steps" + (" (log scale)" if use_log else "")
    return (f'<svg class="loss" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}">'
            f'<title>{esc(title)}</title><polyline fill="none" stroke="#2a6df4" stroke-width="1.5" points="{pts}"/></svg>')


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{padding:16px 24px;background:#fff;border-bottom:1px solid #dde1e7}
h1{font-size:20px;margin:0 0 6px}
.meta{font-size:13px;color:#555;line-height:1.6}
.meta code{background:#eef1f5;padding:1px 4px;border-radius:3px}
.controls{display:flex;gap:12px;flex-wrap:wrap;padding:12px 24px;align-items:center;font-size:14px}
.controls input,.controls select{padding:4px 6px;font-size:14px}
.controls input.bad{outline:2px solid #c0392b}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:16px;padding:8px 24px 24px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px}
.card h2{font-size:15px;margin:0 0 2px;word-break:break-word}
.key{font-size:12px;color:#667;margin-bottom:8px;word-break:break-all}
.pair{display:flex;gap:6px}
.pair figure{margin:0;flex:1}
.pair img{width:100%;display:block;border-radius:4px}
.checker{background-image:linear-gradient(45deg,#ccc 25%,transparent 25%),linear-gradient(-45deg,#ccc 25%,transparent 25%),linear-gradient(45deg,transparent 75%,#ccc 75%),linear-gradient(-45deg,transparent 75%,#ccc 75%);background-size:16px 16px;background-position:0 0,0 8px,8px -8px,-8px 0;border-radius:4px}
figcaption{font-size:11px;color:#778;text-align:center}
.refs img{height:72px;width:auto;max-width:100%;margin-top:6px;border-radius:4px;display:block}
.stats{font-size:12px;color:#444;margin-top:6px}
details{font-size:12px;margin-top:6px}
pre{white-space:pre-wrap;word-break:break-word;font-size:11px;background:#f3f4f7;padding:6px;border-radius:4px}
.pager{padding:0 24px 24px;font-size:14px}
.pager button{margin-right:6px}
table.metrics{border-collapse:collapse;font-size:13px;margin:8px 0}
table.metrics td,table.metrics th{border:1px solid #dde1e7;padding:3px 8px}
"""

JS = r"""
window.__vfErrors=0;window.addEventListener('error',function(){window.__vfErrors++;document.body.dataset.jsErrors=window.__vfErrors;},true);
window.addEventListener('load',function(){
  var imgs=[].slice.call(document.images),ok=0,bad=0;
  imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;else if(i.complete)bad++;});
  document.body.dataset.imagesLoaded=ok;document.body.dataset.imagesBroken=bad;document.body.dataset.imagesTotal=imgs.length;
  document.body.dataset.jsErrors=window.__vfErrors;
});
(function(){
  var cards=[].slice.call(document.querySelectorAll('.card'));
  var grid=document.getElementById('grid');
  var q=document.getElementById('q'),layer=document.getElementById('layer'),kind=document.getElementById('kind'),
      sort=document.getElementById('sort'),info=document.getElementById('info'),pageEl=document.getElementById('page');
  var idx=document.getElementById('idx');
  var page=0,size=%(page_size)d;
  function ranges(spec){
    /* "4", "10-19", "3, 7, 40-49": a list of [lo, hi]; null when some part is not a number or range */
    var out=[],parts=spec.split(',');
    for(var i=0;i<parts.length;i++){
      var p=parts[i].trim(); if(!p)continue;
      var m=/^(\d+)\s*(?:-\s*(\d+))?$/.exec(p); if(!m)return null;
      var lo=parseInt(m[1],10),hi=m[2]===undefined?lo:parseInt(m[2],10);
      out.push([Math.min(lo,hi),Math.max(lo,hi)]);
    }
    return out;
  }
  function visible(){
    var t=q.value.toLowerCase(),l=layer.value,k=kind.value,r=ranges(idx.value);
    idx.classList.toggle('bad',r===null); if(r===null)r=[];
    return cards.filter(function(c){
      var n=parseInt(c.dataset.index,10);
      var inr=!r.length||r.some(function(x){return n>=x[0]&&n<=x[1];});
      return inr&&(!t||c.dataset.search.indexOf(t)>=0)&&(!l||c.dataset.layer===l)&&(!k||c.dataset.kind===k);});
  }
  /* index.html#index=4-9&q=cat&layer=...&kind=channel pre-fills the controls */
  (location.hash||'').replace(/^#/,'').split('&').forEach(function(kv){
    var e=kv.indexOf('='); if(e<0)return;
    var k=decodeURIComponent(kv.slice(0,e)),v=decodeURIComponent(kv.slice(e+1).replace(/\+/g,' '));
    var el={index:idx,q:q,layer:layer,kind:kind,sort:sort}[k]; if(el)el.value=v;
  });
  function key(c){var s=sort.value;
    if(s==='loss'||s==='-loss'){return parseFloat(c.dataset.loss);} if(s==='metric'||s==='-metric'){return parseFloat(c.dataset.metric);}
    if(s==='index'){return parseInt(c.dataset.index,10);} return c.dataset.key;}
  function render(){
    var v=visible(),s=sort.value,desc=s.charAt(0)==='-';
    v.sort(function(a,b){var x=key(a),y=key(b);if(x!==x)return 1;if(y!==y)return -1;return (x<y?-1:x>y?1:0)*(desc?-1:1);});
    var pages=Math.max(1,Math.ceil(v.length/size)); if(page>=pages)page=pages-1;
    cards.forEach(function(c){c.style.display='none';});
    v.forEach(function(c,i){grid.appendChild(c); if(i>=page*size&&i<(page+1)*size)c.style.display='';});
    info.textContent=v.length+' of '+cards.length+' targets';
    pageEl.textContent='page '+(page+1)+' / '+pages;
  }
  [q,idx,layer,kind,sort].forEach(function(e){e.addEventListener('input',function(){page=0;render();});});
  document.getElementById('prev').addEventListener('click',function(){if(page>0){page--;render();}});
  document.getElementById('next').addEventListener('click',function(){page++;render();});
  render();
})();
"""


def _card(t: Dict[str, Any]) -> str:
    files = t.get("files", {})
    layer = t.get("layer") or ""
    label = t.get("label") or t.get("key")
    final = t.get("final_loss")
    metric = (t.get("metrics") or {}).get("primary")
    search = f"{t.get('key', '')} {label} {layer}".lower()
    layers_txt = ", ".join(f"{l} ×{w:g}" for l, w in t.get("layers", []))
    refs = t.get("references", [])
    parts = [
        f'<div class="card" data-key="{esc(t.get("key"))}" data-layer="{esc(layer)}" data-kind="{esc(t.get("kind", ""))}" '
        f'data-index="{esc(t.get("index", 0))}" data-loss="{esc(final if final is not None else "NaN")}" '
        f'data-metric="{esc(metric if metric is not None else "NaN")}" data-search="{esc(search)}">',
        f"<h2>{esc(label)}</h2>",
        f'<div class="key">{esc(t.get("key"))}</div>',
        '<div class="pair">',
    ]
    if "image" in files:
        parts.append(f'<figure><img loading="lazy" src="{src(files["image"])}" alt="{esc(label)}"><figcaption>visualization</figcaption></figure>')
    if "image_rgba" in files:
        parts.append(f'<figure><div class="checker"><img loading="lazy" src="{src(files["image_rgba"])}" alt="{esc(label)} with transparency"></div>'
                     f"<figcaption>with transparency</figcaption></figure>")
    parts.append("</div>")
    if "references" in files:
        parts.append(f'<div class="refs"><img loading="lazy" src="{src(files["references"])}" alt="references of {esc(label)}">'
                     f"<figcaption>{len(refs)} reference images or patches</figcaption></div>")
    parts.append(loss_svg(t.get("losses", [])))
    stats = [f"final loss {final:.4g}" if isinstance(final, (int, float)) else "", f"seed {esc(t.get('seed'))}"]
    for k, v in (t.get("metrics") or {}).items():
        if k != "primary" and isinstance(v, (int, float)):
            stats.append(f"{esc(k)} {v:.4g}")
    parts.append(f'<div class="stats">{" · ".join(s for s in stats if s)}</div>')
    parts.append(f"<details><summary>matched layers and references</summary><pre>{esc(layers_txt)}\n\n"
                 + esc("\n".join(os.path.basename(str(r)) for r in refs)) + "</pre></details>")
    parts.append("</div>")
    return "".join(parts)


def _metrics_table(m: Dict[str, Any]) -> str:
    metrics = m.get("metrics")
    if not isinstance(metrics, dict) or not metrics.get("summary"):
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in metrics["summary"].items())
    return f'<table class="metrics">{rows}</table>'


def render_gallery(manifest: Dict[str, Any], title: Optional[str] = None) -> str:
    targets: List[Dict[str, Any]] = manifest.get("targets", [])
    layers = sorted({t.get("layer") for t in targets if t.get("layer")})
    kinds = sorted({t.get("kind") for t in targets if t.get("kind")})
    model = manifest.get("model", {})
    settings = manifest.get("settings", {})
    title = title or f"vital_fast — {model.get('name', 'run')}"
    stages = settings.get("stages")
    meta = [
        f"model <code>{esc(model.get('name'))}</code> · weights fingerprint <code>{esc(model.get('fingerprint'))}</code>",
        f"vital_fast {esc(manifest.get('version'))} · torch {esc(manifest.get('torch'))} · preset "
        f"<code>{esc(manifest.get('preset', 'custom'))}</code> · seed {esc(manifest.get('seed'))} · stages {esc(stages)}",
        f"{len(targets)} targets · {esc(round(float(manifest.get('timings', {}).get('total_s', 0) or 0), 1))} s"
        f" · written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}",
    ]
    opts_layer = "".join(f'<option value="{esc(l)}">{esc(l)}</option>' for l in layers)
    opts_kind = "".join(f'<option value="{esc(k)}">{esc(k)}</option>' for k in kinds)
    cards = "\n".join(_card(t) for t in targets)
    grid_img = f'<p><img src="{src(manifest["grid"])}" alt="grid of all targets" style="max-width:100%"></p>' if manifest.get("grid") and len(targets) <= 64 else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><header><h1>{esc(title)}</h1><div class="meta">{'<br>'.join(meta)}</div>{_metrics_table(manifest)}
<details><summary>all settings</summary><pre>{esc(json.dumps(settings, indent=1))}</pre></details>{grid_img}</header>
<div class="controls">
<label>filter <input id="q" type="search" placeholder="target, label or layer"></label>
<label>index <input id="idx" type="search" size="10" placeholder="4, 10-19" title="channel or class indices: numbers and ranges, comma-separated"></label>
<label>layer <select id="layer"><option value="">all</option>{opts_layer}</select></label>
<label>kind <select id="kind"><option value="">all</option>{opts_kind}</select></label>
<label>sort <select id="sort"><option value="key">target</option><option value="index">index</option>
<option value="loss">final loss ↑</option><option value="-loss">final loss ↓</option>
<option value="-metric">metric ↓</option><option value="metric">metric ↑</option></select></label>
<span id="info"></span></div>
<div id="grid">
{cards}
</div>
<div class="pager"><button id="prev" type="button">previous</button><button id="next" type="button">next</button><span id="page"></span></div>
<script>{JS % {"page_size": PAGE_SIZE}}</script>
</body></html>
"""


def build_gallery(out_dir: str) -> str:
    """(Re)build ``index.html`` of a run folder from its manifest; returns its path."""
    manifest = read_manifest(out_dir)
    path = os.path.join(out_dir, "index.html")
    atomic_write_bytes(path, render_gallery(manifest).encode("utf-8"))
    return path
