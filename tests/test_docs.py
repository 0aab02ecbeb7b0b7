"""The documentation: the MkDocs site builds in strict mode (API and CLI reference included), README.md stays
a short landing page, relative links resolve, and every Python example of README.md and docs/ runs.

The examples run offline on efficientnet-lite0 and the photographs that ship in installed packages (the
``demo`` extra), at tiny sizes, each page in its own temporary folder; a whole page takes seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(not (ROOT / "mkdocs.yml").is_file() or not DOCS.is_dir(),
                                reason="needs the source checkout (mkdocs.yml and docs/)")

# A fenced block: ``` or longer, an optional language, the body, the same fence closing it.
FENCE = re.compile(r"^(?P<fence>`{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def pages() -> List[Path]:
    """README.md and every Markdown page under docs/."""
    return [README] + sorted(DOCS.rglob("*.md"))


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(text: str, lang: str) -> List[str]:
    return [m.group("body") for m in FENCE.finditer(text) if m.group("lang") == lang]


def commands(block: str) -> List[str]:
    """The command lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def section(text: str, heading: str) -> str:
    """The text of the Markdown section whose heading contains ``heading``, up to the next heading of its
    level."""
    m = re.search(rf"^(#+) [^\n]*{re.escape(heading)}[^\n]*$", text, re.MULTILINE | re.IGNORECASE)
    assert m, f"no section headed {heading!r}"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[m.end():], re.MULTILINE)
    return text[m.end():m.end() + end.start()] if end else text[m.end():]


def photos_folder() -> None:
    """``photos/967/`` (espresso) and a few more offline photographs under ``photos/``, in the working
    folder."""
    from vital_fast.references.images import offline_photo_path

    os.makedirs("photos/967", exist_ok=True)
    shutil.copy(offline_photo_path("coffee"), "photos/967/")
    for name in ("chelsea", "rocket", "china", "flower"):
        shutil.copy(offline_photo_path(name), "photos/")


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    """A clean working folder, the prototype cache inside it, matplotlib without a display."""
    pytest.importorskip("efficientnet_lite_pytorch",
                        reason="the examples use efficientnet-lite0 (extra 'demo')")
    pytest.importorskip("skimage", reason="the examples use the offline photographs (extra 'demo')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITAL_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


# --------------------------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONDONTWRITEBYTECODE="1")  # no docs/__pycache__
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return out


def subcommand_names() -> List[str]:
    import argparse

    from vital_fast.cli.main import build_parser

    parser = build_parser()
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names += list(action.choices)
    return names


def test_site_builds_strict_with_the_cli_reference(site):
    html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    names = subcommand_names()
    assert {"demo", "visualize", "sweep", "evaluate", "concept"} <= set(names)
    for name in names:
        assert f"vital-fast {name}" in html, f"the CLI reference has no section for `vital-fast {name}`"
    for option in ("--target", "--images", "--preset", "--resume", "--channels"):
        assert option in html, option
    assert "&lt;!-- cli-reference --&gt;" not in html and "<!-- cli-reference -->" not in html
    assert not list(site.rglob("*.py")) and not list(site.rglob("__pycache__")), "build files in the site"


def test_site_has_the_api_reference(site):
    html = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("vital_fast.sort_match_loss", "vital_fast.optim.visualize.visualize",
                 "vital_fast.models.load_model",
                 "vital_fast.references.images.load_images", "vital_fast.integrations.layer_prototype",
                 "vital_fast.results.save_result", "vital_fast.optim.Settings"):
        assert f'id="{name}"' in html, f"the API reference does not document {name}"


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # !!python/name: tags of the config
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)

    def listed(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from listed(value)
            else:
                yield value

    in_nav = set(listed(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk <= in_nav, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - in_nav)}"


# --------------------------------------------------------------------------------------------
# README.md: a landing page
# --------------------------------------------------------------------------------------------


def test_readme_is_a_short_landing_page():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= 200, f"README.md has {n} lines; the details belong in docs/"
    first = blocks(text, "bash")[0]
    assert commands(first) == ["make demo", "make test"], first
    assert 'pip install --no-build-isolation ".[all]"' in text
    assert "make docs" in text


def _links(text: str) -> List[str]:
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_point_to_files(page):
    bad = []
    for target in _links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the page itself
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            bad.append(target)
    assert not bad, f"{rel(page)}: links to missing files: {bad}"


def cli_lines(page: Path) -> List[str]:
    text = page.read_text(encoding="utf-8")
    return [c for b in blocks(text, "bash") for c in commands(b) if c.startswith("vital-fast")]


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_cli_lines_parse(page):
    """Every ``vital-fast ...`` line of a ```bash block parses, but those with placeholders: ``...``
    (and, outside README.md, ``[--option VALUE]`` for optional parts)."""
    from vital_fast.cli.main import build_parser

    lines = cli_lines(page)
    if page == README:
        assert len(lines) >= 3, lines
    for line in lines:
        if "..." in line or (page != README and "[" in line):
            continue
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except (Exception, SystemExit) as exc:  # the Parser raises UsageError; argparse may exit
            pytest.fail(f"{rel(page)}: `{line}` does not parse: {type(exc).__name__}: {exc}")


SMALL = {"--steps": "2", "--size": "64"}


def small(args: List[str]) -> List[str]:
    """``args`` with ``--steps 2 --size 64`` (replaced or appended) for the commands that optimize."""
    if args[0] not in ("demo", "visualize", "sweep"):
        return args
    args = list(args)
    for opt, value in SMALL.items():
        if opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value]
    return args + ["--workers", "0"]


def test_readme_cli_example_runs(offline_run, capsys):
    from vital_fast.cli.main import main

    photos_folder()
    found = blocks(section(README.read_text(encoding="utf-8"), "command line"), "bash")
    assert found, "README.md: no ```bash block in its command-line section"
    example = found[0]
    lines = [c for c in commands(example) if c.startswith("vital-fast")]
    assert 2 <= len(lines) <= 4, lines
    for line in lines:
        args = small(shlex.split(line)[1:])
        code = main(args)
        err = capsys.readouterr().err[-3000:]
        assert code == 0, f"`vital-fast {shlex.join(args)}` exited with {code}:\n{err}"


# --------------------------------------------------------------------------------------------
# Every Python example runs
# --------------------------------------------------------------------------------------------


def python_pages() -> List[Tuple[Path, List[str]]]:
    out = []
    for page in pages():
        code = blocks(page.read_text(encoding="utf-8"), "python")
        if code:
            out.append((page, code))
    return out


def test_the_docs_have_python_examples():
    names = {rel(p) for p, _ in python_pages()}
    assert {"README.md", "docs/guide/loss.md", "docs/guide/visualize.md"} <= names, names


@pytest.mark.parametrize("page,code", python_pages(), ids=[rel(p) for p, _ in python_pages()])
def test_python_examples_run(page, code, offline_run):
    """A page's ```python blocks, in order, in one namespace, in an empty working folder."""
    ns = {"__name__": "__docs__"}
    for i, src in enumerate(code):
        try:
            exec(compile(src, f"{rel(page)}:block{i}", "exec"), ns)
        except Exception as exc:
            what = f"{rel(page)}, Python block {i} failed: {type(exc).__name__}: {exc}"
            raise AssertionError(f"{what}\n{src}") from exc
    try:
        import matplotlib.pyplot as plt

        plt.close("all")
    except ImportError:
        pass
