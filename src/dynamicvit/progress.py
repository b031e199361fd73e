"""Progress that suits where the output goes.

On a terminal: a tqdm bar. In a file or a pipe (CI, cluster logs) a bar's carriage-return updates pile
up into thousands of fragments, so there the same calls print one plain line per interval instead,
through `logging` (the CLI sends it to stderr).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Optional

_logger = logging.getLogger("dynamicvit.progress")

# Seconds between plain progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 30.0


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
):
    """A tqdm bar on a terminal, `LineProgress` elsewhere, nothing when not `enabled`.

    Both support iteration over `iterable`, `update(n)`, `set_postfix(dict)` and `close()`.
    """
    if enabled and _is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, enabled=enabled)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class LineProgress:
    """The tqdm calls the package uses, reported as one log line per `LINE_INTERVAL_S` seconds."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, enabled=True):
        self.iterable = iterable
        self.total = total if total is not None else _len(iterable)
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.n = initial
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.start_n = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= LINE_INTERVAL_S:
            self.last = now
            _logger.info(self.line(now))

    def set_postfix(self, postfix: Optional[dict] = None, **kwargs) -> None:
        self.postfix = {**(postfix or {}), **kwargs}

    def line(self, now: Optional[float] = None) -> str:
        """`desc: n/total (p%), r unit/s, key=value ...`."""
        elapsed = (now or time.monotonic()) - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}, {rate:.3g} {self.unit}/s{extra}"

    def close(self) -> None:
        pass


def _len(iterable) -> Optional[int]:
    try:
        return len(iterable)
    except TypeError:
        return None
