"""``--set NAME=VALUE`` and ``--config FILE``: any field of :class:`~vital_fast.optim.Settings` from the
command line.

Order of application (later wins): the ``--preset``, then ``--config FILE``, then each ``--set`` in
the order given, then the dedicated flags (``--steps`` scales whatever stages that left,
``--lrp-every``, ``--class-relevance``, ``--channel-refs``).

A config file holds setting names at its top level, in TOML (``lr = 0.1``,
``stages = [[0.5, 60], [1.0, 90]]``) or JSON (``{"lr": 0.1}``); ``.json`` files are read as JSON,
any other as TOML. ``--set`` values are read by the field's type: ints, floats, booleans
(true/false, 1/0, yes/no, on/off), strings as written, and lists or tuples (``stages``, ``betas``)
as JSON (``--set 'stages=[[1.0, 50]]'``).

Every error is a :class:`ValueError` with a one-line message; the CLI reports it with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Dict, Iterable, List, Optional, Tuple

from vital_fast.optim.presets import CHOICES, MINIMUM, Settings, check_setting, get_preset, type_name

__all__ = ["apply_overrides", "coerce_setting", "load_config", "parse_set", "setting_types", "settings_epilog"]

# The allowed values and lower bounds are Settings' own (declared once, in vital_fast.optim.presets).
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def setting_types() -> Dict[str, Any]:
    """``{field name: resolved type}`` of :class:`Settings`, in declaration order."""
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


_type_name = type_name


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown setting {name!r}; valid: {', '.join(setting_types())}")


def _convert(value: Any, tp) -> Any:
    """``value`` (already parsed: JSON/TOML types) as type ``tp``; TypeError when it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_convert(v, args[0]) for v in value] if args else list(value)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_convert(v, a) for v, a in zip(value, args))
    raise TypeError  # a field type this module does not know: refuse rather than guess


_check = check_setting


def coerce_setting(name: str, value: Any, where: str = "") -> Any:
    """``value`` (a JSON/TOML value) checked and converted to the type of setting ``name``."""
    types = setting_types()
    if name not in types:
        raise _unknown(name)
    prefix = f"{where}: " if where else ""
    try:
        out = _convert(value, types[name])
    except TypeError:
        raise ValueError(f"{prefix}setting {name} expects {_type_name(types[name])}, got {value!r}") from None
    try:
        _check(name, out)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    return out


def _parse_text(name: str, text: str, tp) -> Any:
    """The value of ``--set name=text`` as a JSON/TOML-like value; TypeError when it does not parse."""
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise TypeError
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise TypeError from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise TypeError from None
    if tp is str:
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise TypeError from None


def parse_set(item: str) -> Tuple[str, Any]:
    """``"name=value"`` -> ``(name, value)``, the value converted to the setting's type."""
    name, eq, text = item.partition("=")
    name = name.strip()
    if not eq or not name:
        raise ValueError(f"--set {item!r}: expected NAME=VALUE (valid names: {', '.join(setting_types())})")
    types = setting_types()
    if name not in types:
        raise ValueError(f"--set {item}: unknown setting {name!r}; valid: {', '.join(types)}")
    tp = types[name]
    try:
        value = _parse_text(name, text, tp)
    except TypeError:
        hint = " (true/false, yes/no, 1/0)" if tp is bool else " (JSON)" if tp not in (int, float, str) else ""
        raise ValueError(f"--set {item}: setting {name} expects {_type_name(tp)}{hint}, got {text!r}") from None
    return name, coerce_setting(name, value, where=f"--set {item}")


def _toml_loads():
    """``tomllib.loads`` (Python 3.11+), else ``tomli.loads``; a ValueError saying what to do without either."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("reading a TOML config needs Python 3.11+ or the package tomli "
                             "(pip install tomli); or write the config as JSON (a .json file)") from None
    return tomllib.loads


def load_config(path: str) -> Dict[str, Any]:
    """The settings of a config file, each checked and converted (``{name: value}``)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc}") from None
    fmt = "JSON" if path.lower().endswith(".json") else "TOML"
    if fmt == "JSON":
        loads = json.loads
    else:
        try:
            loads = _toml_loads()
        except ValueError as exc:
            raise ValueError(f"--config {path}: {exc}") from None
    try:
        data = loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        msg = " ".join(str(exc).split())
        raise ValueError(f"--config {path}: not valid {fmt}: {msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected setting names at the top level (a {fmt} "
                         f"{'object' if fmt == 'JSON' else 'table'}), got {type(data).__name__}")
    types = setting_types()
    out = {}
    for name, value in data.items():
        if name not in types:
            where = " (setting names go at the top level, not in a table)" if isinstance(value, dict) else ""
            raise ValueError(f"--config {path}: unknown setting {name!r}{where}; valid: {', '.join(types)}")
        out[name] = coerce_setting(name, value, where=f"--config {path}")
    return out


def apply_overrides(settings: Settings, config: Optional[str] = None, sets: Iterable[str] = ()) -> Settings:
    """``settings`` with ``config``'s values, then each ``--set`` (in order) applied."""
    kw: Dict[str, Any] = {}
    if config:
        kw.update(load_config(config))
    for item in sets or ():
        name, value = parse_set(item)
        kw[name] = value
    return settings.replace(**kw) if kw else settings



def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return json.dumps(v) if len(json.dumps(v)) <= 24 else "[...]"
    return str(v).lower() if isinstance(v, bool) else str(v)


# What check_setting allows beyond CHOICES and MINIMUM.
_OTHER = {"lr": " > 0", "compile": " off|on|BACKEND", "param": " pixel|fourier|maco|auto|registered"}


def settings_epilog() -> str:
    """Every setting ``--set`` and ``--config`` take, one a line: its type, its allowed values or minimum (declared
    once in :class:`Settings`) and its value in the ``fast`` and ``paper`` presets."""
    fast, paper = get_preset("fast"), get_preset("paper")
    rows = []
    for name, tp in setting_types().items():
        allowed = (" in " + "|".join(CHOICES[name])) if name in CHOICES else (
            f" >= {MINIMUM[name]}" if name in MINIMUM else _OTHER.get(name, ""))
        a, b = _short(getattr(fast, name)), _short(getattr(paper, name))
        rows.append((name, f"{type_name(tp)}{allowed}", a if a == b else f"fast {a}, paper {b}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"  {n:<{w0}}  {t:<{w1}}  {v}" for n, t, v in rows]
    return ("settings (--set NAME=VALUE, --config FILE; checked when made, with the valid values named):\n"
            + "\n".join(lines))
