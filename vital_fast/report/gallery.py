"""The HTML pages of a run folder, static files that open from disk with no network.

- ``index.html``: a card per target (it works without JavaScript); a small inline script filters
  by layer, kind, index and text, sorts, and pages through thousands of targets, images loaded lazily.
- ``pages/<slug>.html``: one page per target, reached from its card: the image at full size
  with and without transparency, every reference with its source file, the loss curve with axes,
  the model's predictions, settings and seed, downloads, and previous/next in its layer or kind.
- a runs index (``build_runs_index``) over a folder of run folders, linking runs and comparisons.

Every link is relative (a folder can be moved or shared), and every text that comes from a file
name, a label, a setting or a user argument is escaped.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

from vital_fast.files import atomic_write_bytes
from vital_fast.runfolder import locked, read_manifest

PAGE_SIZE = 60


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def src(path: str) -> str:
    """A relative file path as a safe, URL-quoted attribute value."""
    return esc(quote(path.replace(os.sep, "/"), safe="/"))


def loss_svg(losses: Sequence[float], w: int = 220, h: int = 60, points: int = 200) -> str:
    """An inline SVG polyline of a loss curve (log scale when it spans decades)."""
    import math

    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return '<svg class="loss" width="%d" height="%d"></svg>' % (w, h)
    use_log = min(vals) > 0 and max(vals) / min(vals) > 20
    ys = [math.log10(v) for v in vals] if use_log else vals
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    step = max(1, len(ys) // points)
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
.pair figure.v::after,.pair figure.t::after{display:block;font-size:11px;color:#778;text-align:center}
.pair figure.v::after{content:"visualization"}
.pair figure.t::after{content:"with transparency"}
figcaption{font-size:11px;color:#778;text-align:center}
.refs img{height:72px;width:auto;max-width:100%;margin-top:6px;border-radius:4px;display:block}
.stats{font-size:12px;color:#444;margin-top:6px}
details{font-size:12px;margin-top:6px}
a{color:#1f5bd1}
svg.loss{width:220px;height:48px;display:block}
svg.loss polyline{fill:none;stroke:#2a6df4;stroke-width:1.5}
.card{position:relative}
.card a.open{color:inherit;text-decoration:none}
.card a.open::after{content:"";position:absolute;inset:0}
.card details{position:relative;z-index:1}
.card a.open:hover h2{text-decoration:underline}
ol.preds{font-size:12px;margin:6px 0 0;padding-left:18px;color:#333}
ol.preds li span{color:#778}
nav.crumbs{font-size:14px;padding:10px 24px;background:#fff;border-bottom:1px solid #dde1e7;display:flex;gap:16px;flex-wrap:wrap}
main{padding:16px 24px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;margin-bottom:16px}
section h2{font-size:16px;margin:0 0 8px}
.full{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.full figure{margin:0}
.full img{display:block;max-width:100%;min-width:min(256px,100%)}
.reflist{display:flex;gap:10px;flex-wrap:wrap}
.reflist figure{margin:0;max-width:240px}
.reflist img{display:block;max-width:224px;max-height:224px;border-radius:4px}
.reflist figcaption{word-break:break-all;text-align:left}
.note{font-size:13px;color:#444;max-width:760px}
table.runs{border-collapse:collapse;background:#fff;font-size:14px}
table.runs td,table.runs th{border:1px solid #dde1e7;padding:6px 10px;text-align:left;vertical-align:top}
pre{white-space:pre-wrap;word-break:break-word;font-size:11px;background:#f3f4f7;padding:6px;border-radius:4px}
.pager{padding:0 24px 24px;font-size:14px}
.pager button{margin-right:6px}
table.metrics{border-collapse:collapse;font-size:13px;margin:8px 0}
table.metrics td,table.metrics th{border:1px solid #dde1e7;padding:3px 8px}
"""

CHECK_JS = r"""
window.__vfErrors=0;window.addEventListener('error',function(){window.__vfErrors++;document.body.dataset.jsErrors=window.__vfErrors;},true);
window.addEventListener('load',function(){
  var imgs=[].slice.call(document.images),ok=0,bad=0;
  imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;else if(i.complete)bad++;});
  document.body.dataset.imagesLoaded=ok;document.body.dataset.imagesBroken=bad;document.body.dataset.imagesTotal=imgs.length;
  document.body.dataset.jsErrors=window.__vfErrors;
});
"""

JS = CHECK_JS + r"""
(function(){
  var cards=[].slice.call(document.querySelectorAll('.card'));
  cards.forEach(function(c){var h=c.querySelector('h2');c.dataset.search=(c.dataset.key+' '+(h?h.textContent:'')+' '+(c.dataset.layer||'')).toLowerCase();});
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
      return inr&&(!t||c.dataset.search.indexOf(t)>=0)&&(!l||(c.dataset.layer||'')===l)&&(!k||c.dataset.kind===k);});
  }
  /* index.html#index=4-9&q=cat&layer=...&kind=channel pre-fills the controls */
  (location.hash||'').replace(/^#/,'').split('&').forEach(function(kv){
    var e=kv.indexOf('='); if(e<0)return;
    var k=decodeURIComponent(kv.slice(0,e)),v=decodeURIComponent(kv.slice(e+1).replace(/\+/g,' '));
    var el={index:idx,q:q,layer:layer,kind:kind,sort:sort}[k]; if(el)el.value=v;
  });
  function key(c){var s=sort.value;
    if(s==='loss'||s==='-loss'){return parseFloat(c.dataset.loss);} if(s==='metric'||s==='-metric'){return parseFloat(c.dataset.metric||'NaN');}
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




def _metrics_table(m: Dict[str, Any]) -> str:
    metrics = m.get("metrics")
    if not isinstance(metrics, dict) or not metrics.get("summary"):
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in metrics["summary"].items())
    return f'<table class="metrics">{rows}</table>'


RUNS_MARKER = "runs.json"  # written beside a runs index: run galleries link back to it
COMPARISONS = "comparisons.json"  # in a run folder: the comparison pages that include it

TRANSPARENCY_NOTE = ("With transparency, each pixel is as opaque as it was relevant to the target: the relevance "
                     "accumulated during optimization, scaled to its 98th percentile, is the alpha channel, so "
                     "faded regions barely contributed to the target's activation (shown over a checkerboard).")


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _rel(path: str, from_dir: str) -> str:
    """``path`` (relative to the run folder) as seen from ``from_dir`` (also relative to it)."""
    return posixpath.relpath(path.replace(os.sep, "/"), from_dir.replace(os.sep, "/") or ".")


PAGES = "pages"  # the target pages: a folder of their own, so that target folders stay as the run wrote them


def target_dir(t: Dict[str, Any]) -> str:
    """The folder of a target's files, relative to the run folder."""
    img = (t.get("files") or {}).get("image")
    return posixpath.dirname(img.replace(os.sep, "/")) if img else f"targets/{t.get('slug') or 'x'}"


def page_dir(t: Dict[str, Any]) -> str:
    """The folder of a target's page, relative to the run folder."""
    return PAGES


def page_path(t: Dict[str, Any]) -> str:
    """``pages/<slug>.html``: the target's page, relative to the run folder."""
    return f"{PAGES}/{posixpath.basename(target_dir(t))}.html"


def run_when(m: Dict[str, Any]) -> str:
    """When the run happened: the manifest's ``created`` (else a sweep's last update), not now."""
    when = m.get("created") or (m.get("sweep") or {}).get("updated")
    return str(when).replace("T", " ")[:19] if when else "unknown"


def _pct(p: Any) -> str:
    try:
        return f"{100 * float(p):.3g}%"
    except (TypeError, ValueError):
        return esc(p)


def spark(losses: Sequence[float], w: int = 220, h: int = 48, points: int = 16) -> str:
    """A card's small loss curve: a few integer points, styled by the page's CSS (kept short)."""
    import math

    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return ""
    use_log = min(vals) > 0 and max(vals) / min(vals) > 20
    ys = [math.log10(v) for v in vals] if use_log else vals
    lo, span = min(ys), (max(ys) - min(ys)) or 1.0
    idx = sorted({round(i * (len(ys) - 1) / (points - 1)) for i in range(points)})
    pts = " ".join(f"{round(i / (len(ys) - 1) * (w - 4) + 2)},{round(h - 2 - (ys[i] - lo) / span * (h - 4))}" for i in idx)
    return f'<svg class="loss" viewBox="0 0 {w} {h}"><polyline points="{pts}"/></svg>'


SMALL = 200  # galleries up to this many targets also list each card's matched layers and references


def _card(t: Dict[str, Any], small: bool = False) -> str:
    """One card of the index, kept short (a sweep has thousands): the full view is the target's page."""
    files = t.get("files", {})
    layer = t.get("layer") or ""
    label = t.get("label") or t.get("key")
    final = t.get("final_loss")
    metric = (t.get("metrics") or {}).get("primary")
    refs = t.get("references", [])
    href = src(page_path(t))
    parts = [
        f'<div class="card" data-key="{esc(t.get("key"))}" data-layer="{esc(layer)}" data-kind="{esc(t.get("kind", ""))}" '
        f'data-index="{esc(t.get("index", 0))}" data-loss="{esc(f"{final:.6g}" if isinstance(final, (int, float)) else "NaN")}"'
        + (f' data-metric="{esc(metric)}">' if metric is not None else ">"),
        # the link covers the whole card (CSS); the key is shown when the label does not say it
        f'<a class="open" href="{href}"><h2>{esc(label)}</h2></a>',
        "" if str(t.get("index")) in str(label) else f'<div class="key">{esc(t.get("key"))}</div>',
        '<div class="pair">',
    ]
    if "image" in files:
        parts.append(f'<figure class="v"><img loading="lazy" src="{src(files["image"])}" '
                     f'alt="visualization"></figure>')  # captions come from the CSS
    if "image_rgba" in files:
        parts.append(f'<figure class="t"><div class="checker"><img loading="lazy" src="{src(files["image_rgba"])}" '
                     f'alt="with transparency"></div></figure>')
    parts.append("</div>")
    if "references" in files:
        parts.append(f'<div class="refs"><img loading="lazy" src="{src(files["references"])}" alt="references">'
                     f"<figcaption>{plural(len(refs), 'reference image or patch', 'reference images or patches')}</figcaption></div>")
    preds = t.get("predictions")
    if isinstance(preds, list) and preds:
        parts.append('<ol class="preds">' + "".join(f"<li>{esc(p[1])} {_pct(p[2])}" for p in preds[:5]
                                                     if isinstance(p, (list, tuple)) and len(p) >= 3) + "</ol>")
    elif isinstance(t.get("activation_ratio"), (int, float)):
        parts.append(f'<div class="stats">activation {t["activation_ratio"]:.2f}× its references\' mean</div>')
    probe = (t.get("direction") or {}).get("probe_accuracy")
    if isinstance(probe, (int, float)):
        parts.append(f'<div class="stats probe">probe accuracy {_pct(probe)} (held-out)</div>')
    parts.append(spark(t.get("losses", [])))
    stats = [f"final loss {final:.4g}" if isinstance(final, (int, float)) else "", f"seed {esc(t.get('seed'))}"]
    for k, v in (t.get("metrics") or {}).items():
        if k != "primary" and isinstance(v, (int, float)):
            stats.append(f"{esc(k)} {v:.4g}")
    parts.append(f'<div class="stats">{" · ".join(s for s in stats if s)}</div>')
    if small:
        layers_txt = ", ".join(f"{l} ×{w:g}" for l, w in t.get("layers", []))
        parts.append(f"<details><summary>matched layers and references</summary><pre>{esc(layers_txt)}\n\n"
                     + esc("\n".join(os.path.basename(str(r)) for r in refs)) + "</pre></details>")
    parts.append("</div>")
    return "".join(parts)


def loss_chart(losses: Sequence[float], w: int = 560, h: int = 240) -> str:
    """The loss curve with axes: step on x, loss on y (log scale when it spans decades), tick labels."""
    import math

    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return "<p>no loss curve recorded</p>"
    use_log = min(vals) > 0 and max(vals) / min(vals) > 20
    ys = [math.log10(v) for v in vals] if use_log else vals
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    L, R, T, B = 64, 12, 10, 40
    pw, ph = w - L - R, h - T - B
    X = lambda i: L + i / (len(ys) - 1) * pw  # noqa: E731
    Y = lambda y: T + ph - (y - lo) / span * ph  # noqa: E731
    step = max(1, len(ys) // 400)
    pts = " ".join(f"{X(i):.1f},{Y(y):.1f}" for i, y in list(enumerate(ys))[::step] + [(len(ys) - 1, ys[-1])])
    ticks = []
    for f in (0.0, 0.5, 1.0):
        y = lo + f * span
        v = 10 ** y if use_log else y
        ticks.append(f'<line x1="{L - 4}" x2="{L}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#555"/>'
                     f'<text x="{L - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{esc(f"{v:.3g}")}</text>')
    for f in (0.0, 0.5, 1.0):
        i = round(f * (len(ys) - 1))
        ticks.append(f'<line x1="{X(i):.1f}" x2="{X(i):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="#555"/>'
                     f'<text x="{X(i):.1f}" y="{T + ph + 16}" text-anchor="middle">{i + 1}</text>')
    ylab = "loss (log scale)" if use_log else "loss"
    title = f"loss {vals[0]:.4g} → {vals[-1]:.4g} over {len(vals)} steps"
    return (f'<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}" '
            f'font-size="11" font-family="system-ui,sans-serif"><title>{esc(title)}</title>'
            f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#555"/>'
            f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#555"/>{"".join(ticks)}'
            f'<text x="{L + pw / 2:.0f}" y="{h - 4}" text-anchor="middle">optimization step</text>'
            f'<text transform="translate(12 {T + ph / 2:.0f}) rotate(-90)" text-anchor="middle">{esc(ylab)}</text>'
            f'<polyline fill="none" stroke="#2a6df4" stroke-width="1.5" points="{pts}"/></svg>')


def _neighbours(targets: Sequence[Dict[str, Any]]) -> Dict[str, tuple]:
    """Previous and next target of each key within its group: the same layer (channels) or kind."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for t in targets:
        groups.setdefault((t.get("kind"), t.get("layer") if t.get("kind") != "class" else None), []).append(t)
    out = {}
    for g in groups.values():
        for i, t in enumerate(g):
            out[t.get("key")] = (g[i - 1] if i > 0 else None, g[i + 1] if i + 1 < len(g) else None)
    return out


def render_target_page(manifest: Dict[str, Any], t: Dict[str, Any], prev: Optional[Dict[str, Any]] = None,
                       nxt: Optional[Dict[str, Any]] = None, run_title: str = "run") -> str:
    """``targets/<slug>/index.html``: everything about one target, with links relative to its folder."""
    here = page_dir(t)
    files = t.get("files") or {}
    label = t.get("label") or t.get("key")
    group = f"layer {t.get('layer')}" if t.get("kind") != "class" else f"{t.get('kind')} targets"
    up = _rel("index.html", here)
    nav = [f'<a id="back" href="{src(up)}#q={esc(quote(str(t.get("key", ""))))}">← all targets of {esc(run_title)}</a>']
    if prev:
        nav.append(f'<a id="prev" rel="prev" href="{src(_rel(page_path(prev), here))}">‹ previous in {esc(group)}: '
                   f'{esc(prev.get("label") or prev.get("key"))}</a>')
    if nxt:
        nav.append(f'<a id="next" rel="next" href="{src(_rel(page_path(nxt), here))}">next in {esc(group)}: '
                   f'{esc(nxt.get("label") or nxt.get("key"))} ›</a>')
    figs = []
    if "image" in files:
        figs.append(f'<figure><img src="{src(_rel(files["image"], here))}" alt="{esc(label)}">'
                    f'<figcaption>visualization</figcaption></figure>')
    if "image_rgba" in files:
        figs.append(f'<figure><div class="checker"><img src="{src(_rel(files["image_rgba"], here))}" '
                    f'alt="{esc(label)} with transparency"></div><figcaption>with transparency</figcaption></figure>')
    downloads = [f'<a download href="{src(_rel(p, here))}">{esc(posixpath.basename(p))}</a>'
                 for k, p in files.items() if k in ("image", "image_rgba", "references")]
    downloads.append(f'<a download href="{src(_rel(target_dir(t) + "/result.json", here))}">result.json</a>')
    refs = [str(r) for r in t.get("references", [])]
    ref_files = sorted(k for k in files if k.startswith("ref_"))
    if ref_files:
        items = "".join(
            f'<figure><img loading="lazy" src="{src(_rel(files[k], here))}" alt="reference {i + 1}">'
            f'<figcaption title="{esc(refs[i] if i < len(refs) else "")}">{esc(os.path.basename(refs[i]) if i < len(refs) else k)}'
            f"</figcaption></figure>" for i, k in enumerate(ref_files))
        more = len(refs) - len(ref_files)
        if more > 0:
            items += f"<p>and {plural(more, 'more')}: " + esc(", ".join(os.path.basename(r) for r in refs[len(ref_files):])) + "</p>"
    else:
        strip = (f'<img src="{src(_rel(files["references"], here))}" alt="references of {esc(label)}" style="max-width:100%">'
                 if "references" in files else "")
        items = strip + "<ol>" + "".join(f'<li title="{esc(r)}">{esc(os.path.basename(r))}</li>' for r in refs) + "</ol>"
    says = ""
    preds = t.get("predictions")
    if isinstance(preds, list) and preds:
        rows = "".join(f"<tr><td>{i + 1}</td><td>{esc(p[0])}</td><td>{esc(p[1])}</td><td>{_pct(p[2])}</td></tr>"
                       for i, p in enumerate(preds) if isinstance(p, (list, tuple)) and len(p) >= 3)
        says = (f'<p class="note">The visualized model\'s top-{len(preds)} classes of this image (computed when the '
                f'run was saved):</p><table class="metrics"><tr><th>#</th><th>class</th><th>name</th><th>probability</th></tr>{rows}</table>')
    elif isinstance(t.get("activation_ratio"), (int, float)):
        unit = {"direction": "The direction's projection", "neuron": "The neuron's activation"}.get(
            str(t.get("kind")), "Channel activation")
        says = (f'<p class="note">{unit} on this image: <b>{t["activation_ratio"]:.3g}×</b> its mean '
                f"activation on its reference images (1 = as strong as on the references).</p>")
    d = t.get("direction") or {}
    if isinstance(d.get("probe_accuracy"), (int, float)):
        n = f" on {d['probe_n_test']} held-out images" if isinstance(d.get("probe_n_test"), int) else ""
        says += (f'<p class="note probe">A concept direction from a linear probe: accuracy <b>{_pct(d["probe_accuracy"])}'
                 f'</b>{n} (<code>{esc(os.path.basename(str(d.get("source", ""))))}</code>, row {esc(d.get("row"))}).</p>')
    metrics = t.get("metrics") or {}
    if metrics:
        says += ('<p class="note">Metrics (from <code>evaluate</code>, when run):</p><table class="metrics">'
                 + "".join(f"<tr><th>{esc(k)}</th><td>{esc(round(v, 4) if isinstance(v, float) else v)}</td></tr>"
                           for k, v in metrics.items()) + "</table>")
    model = manifest.get("model", {})
    layers_txt = "\n".join(f"{l} ×{w:g}" for l, w in t.get("layers", []))
    facts = (f"target <code>{esc(t.get('key'))}</code> · kind {esc(t.get('kind'))} · index {esc(t.get('index'))}"
             + (f" · layer <code>{esc(t.get('layer'))}</code>" if t.get("layer") else "")
             + f"<br>model <code>{esc(model.get('name'))}</code> <code>{esc(model.get('fingerprint'))}</code> · method "
             f"{esc(manifest.get('method', 'vital'))} · preset {esc(manifest.get('preset', 'custom'))} · seed "
             f"<b>{esc(t.get('seed'))}</b> (run seed {esc(manifest.get('seed'))}) · run {esc(run_when(manifest))}")
    final = t.get("final_loss")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(label)} — {esc(run_title)}</title><style>{CSS}</style></head>
<body><nav class="crumbs">{"".join(nav)}</nav>
<header><h1>{esc(label)}</h1><div class="meta">{facts}</div></header>
<main>
<section><h2>Visualization at full size</h2><div class="full">{"".join(figs)}</div>
<p class="note">{esc(TRANSPARENCY_NOTE)}</p><p class="note">Download: {" · ".join(downloads)}</p></section>
<section><h2>What the model says</h2>{says or '<p class="note">nothing recorded for this target</p>'}</section>
<section><h2>{plural(len(refs), "reference image or patch", "reference images or patches")}</h2><div class="reflist">{items}</div></section>
<section><h2>Loss</h2>{loss_chart(t.get("losses", []))}<p class="note">final loss {esc(f"{final:.6g}" if isinstance(final, (int, float)) else final)}</p></section>
<section><h2>Settings</h2><p class="note">matched layers and weights:</p><pre>{esc(layers_txt)}</pre>
<details><summary>all settings of the run</summary><pre>{esc(json.dumps(manifest.get("settings", {}), indent=1, default=str))}</pre></details></section>
</main>
<script>{CHECK_JS}</script>
</body></html>
"""


def _comparison_links(out_dir: Optional[str], prefix: str = ".") -> List[str]:
    """Links to the comparison pages that include the run in ``out_dir`` (from its comparisons.json),
    for a page in the folder where the run folder is ``prefix``."""
    if not out_dir:
        return []
    try:
        with open(os.path.join(out_dir, COMPARISONS), encoding="utf-8") as fh:
            items = json.load(fh)
    except (OSError, ValueError):
        return []
    out = []
    for c in items if isinstance(items, list) else []:
        if not isinstance(c, dict) or not c.get("page"):
            continue
        if not os.path.isfile(os.path.join(out_dir, c["page"])):
            continue
        out.append(f'<a class="cmp" href="{src(posixpath.normpath(posixpath.join(prefix, c["page"])))}">'
                   f'comparison with {esc(c.get("other", "?"))}</a>')
    return out


def render_gallery(manifest: Dict[str, Any], title: Optional[str] = None, *, runs_index: Optional[str] = None,
                   comparisons: Sequence[str] = ()) -> str:
    """The run's ``index.html``; ``runs_index``: relative link to an index of runs; ``comparisons``: links (HTML)."""
    targets: List[Dict[str, Any]] = manifest.get("targets", [])
    layers = sorted({t.get("layer") for t in targets if t.get("layer")})
    kinds = sorted({t.get("kind") for t in targets if t.get("kind")})
    model = manifest.get("model", {})
    settings = manifest.get("settings", {})
    title = title or f"vital_fast — {model.get('name', 'run')}"
    stages = settings.get("stages")
    meta = [
        f"model <code>{esc(model.get('name'))}</code> · weights fingerprint <code>{esc(model.get('fingerprint'))}</code>",
        f"vital_fast {esc(manifest.get('version'))} · torch {esc(manifest.get('torch'))} · method "
        f"{esc(manifest.get('method', 'vital'))} · preset <code>{esc(manifest.get('preset', 'custom'))}</code> · seed "
        f"{esc(manifest.get('seed'))} · stages {esc(stages)}",
        f"{plural(len(targets), 'target')} · took {esc(round(float(manifest.get('timings', {}).get('total_s', 0) or 0), 1))} s"
        f" · run {esc(run_when(manifest))}",
    ]
    links = ([f'<a id="runs" href="{src(runs_index)}">← all runs</a>'] if runs_index else []) + list(comparisons)
    links.append('<a download href="manifest.json">manifest.json</a>')
    nav = f'<nav class="crumbs">{"".join(l for l in links if l)}</nav>'
    opts_layer = "".join(f'<option value="{esc(l)}">{esc(l)}</option>' for l in layers)
    opts_kind = "".join(f'<option value="{esc(k)}">{esc(k)}</option>' for k in kinds)
    cards = "\n".join(_card(t, len(targets) <= SMALL) for t in targets)
    grid_img = (f'<p><img src="{src(manifest["grid"])}" alt="grid of all targets, labelled" style="max-width:100%"></p>'
                if manifest.get("grid") and len(targets) <= 64 else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>{nav}<header><h1>{esc(title)}</h1><div class="meta">{'<br>'.join(meta)}</div>{_metrics_table(manifest)}
<details><summary>all settings</summary><pre>{esc(json.dumps(settings, indent=1, default=str))}</pre></details>{grid_img}</header>
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


def _runs_index_link(out_dir: str) -> Optional[str]:
    parent = os.path.dirname(os.path.abspath(out_dir))
    return "../index.html" if os.path.isfile(os.path.join(parent, RUNS_MARKER)) else None


def build_gallery(out_dir: str) -> str:
    """(Re)build ``index.html`` of a run folder and a page per target from its manifest; returns its path."""
    manifest = read_manifest(out_dir)
    targets = manifest.get("targets", [])
    title = f"vital_fast — {manifest.get('model', {}).get('name', 'run')}"
    near = _neighbours(targets)
    if targets:
        os.makedirs(os.path.join(out_dir, PAGES), exist_ok=True)
    for t in targets:
        prev, nxt = near.get(t.get("key"), (None, None))
        atomic_write_bytes(os.path.join(out_dir, page_path(t)),
                           render_target_page(manifest, t, prev, nxt, title).encode("utf-8"))
    path = os.path.join(out_dir, "index.html")
    page = render_gallery(manifest, title, runs_index=_runs_index_link(out_dir), comparisons=_comparison_links(out_dir))
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def record_comparison(run_dir: str, page: str, other: str) -> None:
    """Note in ``run_dir/comparisons.json`` the comparison page ``page`` (with run ``other``)."""
    p = os.path.join(run_dir, COMPARISONS)
    with locked(run_dir):  # read-modify-write: never beside a run that is writing this folder
        try:
            with open(p, encoding="utf-8") as fh:
                items = json.load(fh)
            items = items if isinstance(items, list) else []
        except (OSError, ValueError):
            items = []
        rel = os.path.relpath(page, run_dir).replace(os.sep, "/")
        items = [c for c in items if isinstance(c, dict) and c.get("page") != rel]
        items.append({"page": rel, "other": other})
        atomic_write_bytes(p, json.dumps(items, indent=1).encode("utf-8"))
