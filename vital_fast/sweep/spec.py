"""Which targets a sweep covers: index specs (``"0-511"``, ``"0,3,8-15"``, ``"all"``), their compact
form, and the one-resolution schedule of ``--single-stage``."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from vital_fast.optim.presets import Settings


def parse_index_spec(spec: Union[None, str, int, Sequence[int]], n: Optional[int], what: str) -> List[int]:
    """``"all"``, ``"0-511"``, ``"0,3,8-15"`` or a list of ints -> sorted unique indices.

    ``n`` is the number of valid indices (``None``: unknown, "all" not allowed). Raises
    ValueError for a malformed spec, an empty one or an index outside ``0..n-1``.
    """
    if spec is None:
        spec = "all"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            if n is None:
                raise ValueError(f"{what}: 'all' needs a known count")
            return list(range(n))
        out = set()
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise ValueError(f"{what}: bad range {part!r} in {spec!r}; use e.g. 0-511, 0,3,8-15 or all"
                                 ) from None
        vals = sorted(out)
    else:
        vals = sorted({int(v) for v in spec})
    if not vals:
        raise ValueError(f"{what}: no indices given ({spec!r})")
    if vals[0] < 0 or (n is not None and vals[-1] >= n):
        bad = [v for v in vals if v < 0 or (n is not None and v >= n)]
        rng = f"{bad[0]}" if len(bad) == 1 else f"{bad[0]}..{bad[-1]} ({len(bad)} indices)"
        raise ValueError(f"{what}: {rng} outside the valid range 0-{(n or 0) - 1}")
    return vals


def single_stage(settings: Settings) -> Settings:
    """The schedule collapsed to one resolution: the last stage's scale for the total step budget.

    With several stages, slots in different stages cannot share a stack, so a refilled batch runs
    one (smaller) pass per stage each tick; one resolution keeps every slot in one stack.
    """
    return settings.replace(stages=[(settings.stages[-1][0], settings.steps)])


def _compact(vals: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    out, i = [], 0
    vals = list(vals)
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)
