"""The gallery as a user reads it: a page per target reached from its card and back, a runs index,
compare pages linking both runs, every link and image resolving, escaping, and a page small enough
for a sweep of 2,000 targets. Pages are driven in headless Chromium where it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlparse

import pytest
import torch

from vital_fast import results
from vital_fast.optim import Settings, Target, VisualizationResult
from vital_fast.references.images import ImageSet
from vital_fast.report import gallery, runs
from vital_fast.report.compare import compare_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

EVIL = "<b>x&'\"</b>"


def fake_result(n_class=3, n_chan=2, refs=3):
    targets = [Target("class", i) for i in range(n_class)] + [Target("channel", i, "conv2") for i in range(n_chan)]
    B = len(targets)
    return VisualizationResult(
        targets=targets, images=torch.rand(B, 3, 32, 32), transparency=torch.rand(B, 1, 32, 32),
        losses=torch.rand(B, 6) + 0.1, settings=Settings(stages=[(1.0, 6)]), seeds=list(range(B)),
        references=[ImageSet([torch.rand(3, 40, 30) for _ in range(refs)],
                             [f"/data/{EVIL}/img {j}#?.png" for j in range(refs)], ["h"] * refs) for _ in targets],
        layers=[[("conv1", 1.0)] for _ in targets], timings={"total_s": 2.5}, model_name="tiny", fingerprint="abc",
    )


def make_run(path, **kw):
    res = fake_result(**kw)
    labels = {t.key: f"{t.key} {EVIL}" for t in res.targets}
    ann = {t.key: ({"predictions": [[t.index, f"name {EVIL}", 0.5], [7, "other", 0.25]]} if t.kind == "class"
                   else {"activation_ratio": 1.25}) for t in res.targets}
    results.save_result(res, str(path), seed=0, labels=labels, annotations=ann)
    gallery.build_gallery(str(path))
    return path


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"):
            self.srcs.append(a["src"])


def links_of(page):
    p = Links()
    p.feed(open(page, encoding="utf-8").read())
    return p


def assert_resolves(page):
    """Every relative link and image of ``page`` names an existing file."""
    p = links_of(page)
    base = "file://" + os.path.abspath(page)
    for ref in p.hrefs + p.srcs:
        if ref.startswith("#"):
            continue
        url = urlparse(urljoin(base, ref))
        assert url.scheme == "file", ref
        assert os.path.isfile(unquote(url.path)), (page, ref)
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "run-a")


def test_cards_link_target_pages_that_link_back(run):
    m = json.loads((run / "manifest.json").read_text())
    assert m["created"][:19].replace("T", " ") in (run / "index.html").read_text()  # the run's time, not now
    p = assert_resolves(run / "index.html")
    pages = [h for h in p.hrefs if h.startswith("pages/")]
    assert len(set(pages)) == len(m["targets"])
    for t in m["targets"]:
        page = run / gallery.page_path(t)
        q = assert_resolves(page)
        assert any(h.startswith("../index.html") for h in q.hrefs)
        assert "../targets/%s/result.json" % t["slug"] in q.hrefs and any(h.endswith("image_rgba.png") for h in q.hrefs)
        assert sum(1 for s in q.srcs if "ref_" in s) == 3
        text = page.read_text()
        assert "transparency" in text and "optimization step" in text
    # previous/next stay within a kind (classes) or layer (channels)
    first_chan = next(t for t in m["targets"] if t["kind"] == "channel")
    q = links_of(run / gallery.page_path(first_chan))
    assert not any("class" in h for h in q.hrefs if h.startswith("../") and "targets" not in h)
    text = (run / gallery.page_path(first_chan)).read_text()
    assert 'id="prev"' not in text and 'id="next"' in text and "1.25" in text


def test_everything_is_escaped_and_plural(run):
    for page in [run / "index.html"] + list((run / "pages").glob("*.html")):
        text = page.read_text()
        assert "<b>x" not in text and "&lt;b&gt;x" in text, page
    idx = (run / "index.html").read_text()
    assert "3 reference images or patches" in idx and "name &lt;b&gt;x" in idx
    assert "1 reference images" not in idx


def test_manifest_has_predictions_and_created(run):
    m = json.loads((run / "manifest.json").read_text())
    assert "T" in m["created"]
    cls = [t for t in m["targets"] if t["kind"] == "class"]
    assert cls[0]["predictions"][0][1].startswith("name")
    assert json.loads((run / cls[0]["files"]["image"]).parent.joinpath("result.json").read_text())["predictions"]


def test_labelled_grid(run):
    from PIL import Image

    im = Image.open(run / "grid.png")
    assert im.height > 160 + 8  # room for the labels under the tiles


def test_top_predictions_on_a_real_model():
    from vital_fast.models.predict import channel_activation_ratio, top_predictions

    class L:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 10)).eval()
        input_size = 16
        device = torch.device("cpu")

        def normalize(self, x):
            return x * 2 - 1

        def channel_dim_of(self, layer):
            return 1

    p = top_predictions(L(), [torch.rand(3, 20, 20), torch.rand(3, 8, 8)], ["c%d" % i for i in range(10)])
    assert len(p) == 2 and len(p[0]) == 5 and p[0][0][1] == "c%d" % p[0][0][0]
    assert abs(sum(x[2] for x in p[0])) <= 1.0 + 1e-4
    r = channel_activation_ratio(L(), "0", 1, torch.rand(3, 16, 16), [torch.rand(3, 16, 16)] * 2)
    assert r is None or isinstance(r, float)


def test_runs_index_and_compare(tmp_path):
    root = tmp_path / "runs"
    a = make_run(root / "a")
    b = root / "b"
    shutil.copytree(a, b)
    out = root / "cmp"
    compare_runs(str(a), str(b), str(out))
    cmp_page = out / "index.html"
    p = assert_resolves(cmp_page)
    assert "../a/index.html" in p.hrefs and "../b/index.html" in p.hrefs
    assert any(h.startswith("../a/pages/") for h in p.hrefs)
    for run_dir in (a, b):
        assert "../cmp/index.html" in links_of(run_dir / "index.html").hrefs
    index = runs.build_report(str(root))
    q = assert_resolves(index)
    assert "a/index.html" in q.hrefs and "b/index.html" in q.hrefs and "cmp/index.html" in q.hrefs
    assert "../index.html" in links_of(a / "index.html").hrefs  # each run links back to the runs index
    text = open(index).read()
    assert "tiny" in text and "2.5 s" in text


def test_report_of_a_folder_without_runs(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a vital_fast run folder"):
        runs.build_report(str(tmp_path))


def test_two_thousand_targets_page_is_small():
    targets = []
    for i in range(2000):
        kind = "class" if i % 2 else "channel"
        slug = f"{kind}-{i}"
        targets.append({
            "key": f"{kind}:{i}" if kind == "class" else f"channel:features.12:{i}", "kind": kind, "index": i,
            "layer": None if kind == "class" else "features.12", "slug": slug,
            "label": f"{i} some fairly long class name", "seed": i,
            "layers": [["features.1", 1.0], ["features.5", 1.0], ["features.9", 0.5]],
            "losses": [1.0 / (s + 1) for s in range(400)], "final_loss": 1 / 400,
            "references": [f"/data/imagenet/train/n0{i:07d}/n0{i:07d}_{j}.JPEG" for j in range(16)],
            "files": {n: f"targets/{slug}/{n}.png" for n in ("image", "image_rgba", "references")},
            "predictions": [[i + j, f"class name {i + j}", 0.1] for j in range(5)] if kind == "class" else None,
            "activation_ratio": 0.9 if kind == "channel" else None,
        })
    m = {"tool": "vital_fast", "model": {"name": "m", "fingerprint": "f"}, "settings": {"stages": [[1.0, 400]]},
         "targets": targets, "created": "2024-01-01T00:00:00"}
    page = gallery.render_gallery(m).encode("utf-8")
    assert len(page) < 2 * 1024 * 1024, len(page)
    assert page.count(b'loading="lazy"') >= 2000 * 3
    assert page.count(b"<img ") == page.count(b'loading="lazy"')


# ---- headless Chromium ---------------------------------------------------------------------------

def chromium_dom(url, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,4000", "--virtual-time-budget=4000",
           "--enable-logging=stderr", "--v=0", "--dump-dom", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert 'data-images-total="' in res.stdout, res.stderr[-2000:]
    assert 'data-js-errors="0"' in res.stdout, url
    assert 'data-images-broken="0"' in res.stdout, url
    console = [l for l in res.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not [l for l in console if "error" in l.lower() or "Uncaught" in l], console
    return res.stdout


def hrefs_in(dom, cls=None, id_=None):
    pat = r'<a[^>]*%s[^>]*href="([^"]+)"' % (f'class="{cls}"' if cls else f'id="{id_}"')
    return [h.replace("&amp;", "&") for h in re.findall(pat, dom)]


@needs_chromium
def test_chromium_index_to_target_and_back(run, tmp_path):
    index_url = (run / "index.html").as_uri()
    dom = chromium_dom(index_url, tmp_path)
    first = hrefs_in(dom, cls="open")[0]  # "clicking" a card: follow its link as the browser resolves it
    target_url = urljoin(index_url, first)
    tdom = chromium_dom(target_url, tmp_path)
    assert "with transparency" in tdom and 'class="chart"' in tdom
    back = urljoin(target_url, hrefs_in(tdom, id_="back")[0])
    assert urlparse(back).path == urlparse(index_url).path
    chromium_dom(back, tmp_path)
    nxt = hrefs_in(tdom, id_="next")
    if nxt:
        chromium_dom(urljoin(target_url, nxt[0]), tmp_path)


@needs_chromium
def test_chromium_runs_index_and_compare(tmp_path):
    root = tmp_path / "runs"
    a = make_run(root / "a", n_class=2, n_chan=1, refs=1)
    b = root / "b"
    shutil.copytree(a, b)
    compare_runs(str(a), str(b), str(b / "compare-a"))
    index = runs.build_report(str(root))
    url = "file://" + os.path.abspath(index)
    dom = chromium_dom(url, tmp_path)
    run_url = urljoin(url, hrefs_in(dom, cls="run")[0])
    rdom = chromium_dom(run_url, tmp_path)
    assert "1 reference image or patch" in rdom
    cmp_url = urljoin(run_url, hrefs_in(rdom, cls="cmp")[0])
    cdom = chromium_dom(cmp_url, tmp_path)
    for id_ in ("run-a", "run-b"):
        chromium_dom(urljoin(cmp_url, hrefs_in(cdom, id_=id_)[0]), tmp_path)
    assert urlparse(urljoin(run_url, hrefs_in(rdom, id_="runs")[0])).path == urlparse(url).path
