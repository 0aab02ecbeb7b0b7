"""The ``progress`` argument of :func:`~vital_fast.optim.visualize` and the baselines.

``progress=True`` shows a tqdm bar (``tqdm.auto``: the notebook widget in Jupyter, text elsewhere,
on stderr) with the mean loss of the batch. tqdm is optional: without it, ``progress=True`` prints
a plain line to stderr at every tenth of the steps (and at the end). ``False`` or ``None`` shows
nothing; a callable is called as ``progress(step, total_steps, losses)`` at every read of the losses from the
device: every ``Settings.loss_every`` steps (10 by default), when a stage ends and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Tuple, Union

import torch

from vital_fast.optim.result import ProgressFn

__all__ = ["ProgressArg", "resolve_progress"]

ProgressArg = Union[bool, None, ProgressFn]


class _TqdmBar:
    def __init__(self, tqdm, desc: str) -> None:
        self._tqdm = tqdm
        self._desc = desc
        self._bar = None

    def __call__(self, step: int, total: int, losses: torch.Tensor) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=self._desc, unit="step", file=sys.stderr, leave=True)
        self._bar.set_postfix(loss=f"{float(losses.float().mean()):.4g}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _PlainLines:
    """The fallback without tqdm: one stderr line per tenth of the steps."""

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._t0: Optional[float] = None
        self._next = 0

    def __call__(self, step: int, total: int, losses: torch.Tensor) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if step < self._next and step < total:
            return
        self._next = step + max(1, total // 10)
        el = time.perf_counter() - self._t0
        sys.stderr.write(f"{self._desc}: step {step}/{total} ({100 * step / max(1, total):.0f}%) "
                         f"loss {float(losses.float().mean()):.4g} elapsed {el:.1f}s\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


def _noop() -> None:
    pass


def resolve_progress(progress: ProgressArg, desc: str = "visualize") -> Tuple[Optional[ProgressFn], Callable[[], None]]:
    """``(callback, close)`` for a ``progress`` argument: ``close()`` ends a bar (call it when done)."""
    if progress is None or progress is False:
        return None, _noop
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            bar = _PlainLines(desc)
        else:
            bar = _TqdmBar(tqdm, desc)
        return bar, bar.close
    if callable(progress):
        return progress, _noop
    raise TypeError(f"progress must be True, False, None or a callable progress(step, total, losses), "
                    f"got {type(progress).__name__}")
