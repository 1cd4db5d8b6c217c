"""Progress that is seen wherever a command runs: a bar on a terminal, log lines elsewhere.

tqdm draws nothing when stderr is not a terminal (``disable=None``), so under SLURM, ``nohup``
or a pipe a long imputation printed nothing for half an hour. :func:`progress` keeps the bar
on a terminal and otherwise logs a plain line (done, total, elapsed, ETA) every ``every``
seconds and at the end, as Beagle's log does.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress:
    """tqdm's ``update``/``close`` as log lines: ``what: 12/40 windows (30 %), 0:01:10 elapsed,
    ETA 0:02:43``, at most one every ``every`` seconds (and the last one always)."""

    def __init__(self, total: int, what: str, unit: str, log: logging.Logger, every: float):
        self.total, self.what, self.unit, self.log, self.every = total, what, unit, log, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        share = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        eta_text = _clock(eta) if eta == eta else "?"
        return (
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * share:.0f} %), "
            f"{_clock(elapsed)} elapsed, ETA {eta_text}"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.log.info(self.line())

    def close(self) -> None:
        self.log.info(self.line())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()


def progress(
    total: int,
    what: str,
    unit: str,
    log: logging.Logger,
    *,
    enabled: bool = True,
    every: float = 30.0,
    stream=None,
) -> tqdm | LineProgress:
    """A bar on a terminal, log lines (``log.info``) otherwise; nothing when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if enabled and not stream.isatty():
        return LineProgress(total, what, unit, log, every)
    return tqdm(total=total, desc=what, unit=f" {unit}", file=stream, disable=not enabled)
