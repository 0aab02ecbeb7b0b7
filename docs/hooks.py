"""MkDocs hooks (``hooks:`` in mkdocs.yml): the command-line reference, generated from the parser.

``on_page_markdown`` replaces the marker ``<!-- cli-reference -->`` with the ``--help`` text of
``vital-fast`` and of every subcommand, as ``vital_fast.cli.main.build_parser()`` formats it at a fixed
width, so the page always says what the installed parser says.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import List, Tuple

MARKER = "<!-- cli-reference -->"
WIDTH = "100"


def subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, argparse.ArgumentParser]]:
    """``[(name, subparser), ...]`` in the order the parser lists them (aliases once)."""
    out, seen = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.append((name, sub))
    return out


def section(title: str, help_text: str) -> List[str]:
    """A heading and the help in a ``text`` block, its fence longer than any run of backticks in the help."""
    longest = max((len(run) for run in re.findall(r"`+", help_text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"## {title}", "", f"{fence}text", help_text.rstrip(), fence, ""]


def cli_reference() -> str:
    """Markdown: a section per command, each with its help in a ``text`` block."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps at the terminal width it reads from COLUMNS
    try:
        from vital_fast.cli.main import build_parser

        parser = build_parser()
        parts = section("vital-fast", parser.format_help())
        for name, sub in subcommands(parser):
            parts += section(f"vital-fast {name}", sub.format_help())
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
