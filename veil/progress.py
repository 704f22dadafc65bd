"""A one-line progress bar for long CLI jobs (reindex, knowledge ingestion)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """A one-line bar on a terminal (or plain lines when not a terminal)."""

    def __init__(
        self,
        total: int,
        out: TextIO = sys.stderr,
        width: int = 30,
        *,
        unit: str = "events",
        made: str = "memories",
        rate_of_made: bool = False,
    ) -> None:
        self.unit = unit
        self.made = made
        # The rate of what is made (chunks/s) when the units are uneven (files).
        self.rate_of_made = rate_of_made
        self.total = max(total, 1)
        self.out = out
        self.width = width
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, records: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        share = min(done / self.total, 1.0)
        filled = int(share * self.width)
        rated, per = (records, self.made) if self.rate_of_made else (done, self.unit)
        rate = rated / max(now - self.started, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {share:6.1%} "
            f"{done}/{self.total} {self.unit}, {records} {self.made}, {rate:,.1f} {per}/s"
        )
        end = "\n" if final or not self.out.isatty() else ""
        self.out.write(("\r" if self.out.isatty() else "") + line + end)
        self.out.flush()
