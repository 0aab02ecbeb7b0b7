"""A plain-text progress bar with rate and time left, for terminals and logs alike."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, label: str = "", stream: Optional[TextIO] = None, width: int = 28,
                 min_interval: float = 0.5) -> None:
        self.total = max(1, int(total))
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.min_interval = min_interval
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @staticmethod
    def fmt(seconds: float) -> str:
        seconds = max(0, int(round(seconds)))
        m, s = divmod(seconds, 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < (self.min_interval if self.tty else 15.0):
            return
        self.last = now
        el = now - self.t0
        frac = min(1.0, done / self.total)
        eta = el / frac * (1 - frac) if frac > 0 else float("nan")
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        eta_s = self.fmt(eta) if eta == eta else "--:--"
        line = f"{self.label} [{bar}] {done}/{self.total} {100 * frac:5.1f}% elapsed {self.fmt(el)} left {eta_s} {note}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
