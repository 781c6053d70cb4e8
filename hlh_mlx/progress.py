"""Counts and a time estimate for long commands, on a terminal and when piped.

On a terminal: click's bar (position, ETA). Piped (CI logs, `| tee`): one plain line every
`every` items or `seconds`, so a log shows how far a 10-minute check has come.
"""

from __future__ import annotations

import sys
import time

import click


def eta_text(done: int, total: int, elapsed: float) -> str:
    if not done or done >= total:
        return "0s" if done >= total else "?"
    left = elapsed / done * (total - done)
    return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"


class Progress:
    def __init__(self, total: int, label: str, *, stream=None, every: int | None = None, seconds: float = 15.0,
                 status=None):
        """`status()`: a line on the state of each worker (`pool.Pool.states`), shown with
        the counts when several workers run at once."""
        self.total, self.label, self.done = max(total, 0), label, 0
        self.status = status
        self.stream = stream or sys.stderr
        self.every = every or max(1, self.total // 10)
        self.seconds = seconds
        self._bar = None
        self._start = self._last = time.monotonic()

    def __enter__(self):
        if self.stream.isatty():
            self._bar = click.progressbar(length=self.total, label=self.label, file=self.stream,
                                          show_eta=True, show_pos=True,
                                          item_show_func=(lambda _: self._status(short=True)) if self.status else None)
            self._bar.__enter__()
        else:
            click.echo(f"{self.label}: 0/{self.total}", file=self.stream)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.done % self.every == 0 or now - self._last >= self.seconds or self.done >= self.total:
            self._last = now
            click.echo(self.line(), file=self.stream)

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        elapsed = time.monotonic() - self._start
        status = self._status()
        return (f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {elapsed:.0f}s elapsed, "
                f"eta {eta_text(self.done, self.total, elapsed)}" + (f" | {status}" if status else ""))

    def _status(self, short: bool = False) -> str:
        if not self.status:
            return ""
        try:
            return self.status(short=short)
        except Exception:  # noqa: BLE001 (a progress line never stops the work)
            return ""

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
