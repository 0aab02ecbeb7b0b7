"""The CLI's help: grouped by purpose in every subcommand, and every documented default true to what runs."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from vital_fast.cli.common import GROUPS
from vital_fast.cli.main import build_parser, main
from vital_fast.optim import get_preset
from vital_fast.optim.presets import Settings

PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
FIELDS = {f.name for f in dataclasses.fields(Settings)}
PRESETS = ("fast", "paper")


def _help(action) -> str:
    return " ".join((action.help or "").split())


def _fmt(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


@pytest.mark.parametrize("cmd", ["demo", "visualize", "sweep", "concept", "evaluate"])
def test_options_are_grouped_by_purpose_in_order(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    text = capsys.readouterr().out
    heads = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[:-1] in GROUPS]
    assert len(heads) >= 2 and heads == [g for g in GROUPS if g in heads], heads
    sp = SUBCOMMANDS[cmd]
    ungrouped = [a.option_strings for g in sp._action_groups if g.title not in GROUPS for a in g._group_actions
                 if a.option_strings and not set(a.option_strings) & {"-h", "--help", "--verbose", "--version"}]
    assert not ungrouped, f"{cmd}: options outside the groups: {ungrouped}"


def _documented(cmd):
    for a in SUBCOMMANDS[cmd]._actions:
        if a.option_strings and a.help:
            yield a, _help(a)


@pytest.mark.parametrize("cmd", sorted(SUBCOMMANDS))
def test_every_documented_default_is_what_runs(cmd):
    """"X for fast, Y for paper", "the preset's, X" and "default: X" in a setting's help name the presets' values;
    an option with its own default names that one."""
    checked = 0
    for a, h in _documented(cmd):
        if a.dest in FIELDS and a.default is None:
            for value, preset in re.findall(r"(\S+) for (fast|paper)\b", h):
                assert value == _fmt(getattr(get_preset(preset), a.dest)), (cmd, a.dest, h)
                checked += 1
            m = re.search(r"default: (?:the preset's, )?([\w.]+)\)", h)
            if m and not re.search(r"\S+ for (fast|paper)", h):
                for preset in PRESETS:
                    assert m.group(1) == _fmt(getattr(get_preset(preset), a.dest)), (cmd, a.dest, preset, h)
                checked += 1
        elif a.default not in (None, False, True, argparse.SUPPRESS, []) and "default" in h:
            m = re.search(r"default: ([^);,:]+)", h)
            if m and m.group(1).strip() not in ("the model's",):
                assert m.group(1).strip() == _fmt(a.default), (cmd, a.dest, a.default, h)
                checked += 1
    if cmd in ("visualize", "sweep", "demo"):
        assert checked >= 8, checked


def test_a_setting_with_preset_dependent_default_says_so():
    """Every run option that sets a field the presets disagree on documents both values or defers to the preset."""
    differ = {f for f in FIELDS if len({repr(getattr(get_preset(p), f)) for p in PRESETS}) > 1}
    for cmd in ("visualize", "sweep", "demo"):
        for a, h in _documented(cmd):
            if a.dest in differ:
                assert "preset" in h or re.search(r"for fast", h), (cmd, a.dest, h)


def _complete(script_text: str, words, tmp_path) -> list:
    """COMPREPLY of the generated bash completion for the command line ``words`` (the last one being completed)."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    f = tmp_path / "complete.bash"
    f.write_text(script_text)
    arr = " ".join(f"'{w}'" for w in words)
    cmd = (f"source {f}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; _vital_fast; "
           'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.splitlines() if w]


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_completes_subcommands_options_and_choices(shell, tmp_path, capsys):
    assert main(["completion", shell]) == 0
    text = capsys.readouterr().out
    assert "complete -o filenames" in text and ("bashcompinit" in text) == (shell == "zsh")
    if shell == "zsh":
        return
    assert _complete(text, ["vital-fast", "vis"], tmp_path) == ["visualize"]
    assert set(_complete(text, ["vital-fast", "visualize", "--chan"], tmp_path)) == {
        "--channel-refs", "--channel-relevance", "--channels-last"}
    assert _complete(text, ["vital-fast", "visualize", "--amp", "b"], tmp_path) == ["bf16"]
    assert set(_complete(text, ["vital-fast", "completion", ""], tmp_path)) == {"bash", "zsh"}  # positional choices
    (tmp_path / "photos").mkdir()
    assert _complete(text, ["vital-fast", "visualize", "--images", "pho"], tmp_path) == ["photos"]


def test_completion_of_an_unknown_shell_is_one_line(capsys):
    assert main(["completion", "fish"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fish'" in err


@pytest.mark.parametrize("cmd", ["demo", "visualize", "sweep"])
def test_run_help_lists_every_setting_with_its_values(cmd, capsys):
    """Settings declares each field's type, allowed values and range once; the CLI's help lists them (issue 24)."""
    assert main([cmd, "--help"]) == 0
    text = capsys.readouterr().out
    tail = text[text.index("settings (--set NAME=VALUE"):]
    for f in FIELDS:
        assert f"\n  {f} " in tail, f
    assert "amp" in tail and "off|bf16|fp16|auto" in tail and "warmup" in tail and ">= 0" in tail
