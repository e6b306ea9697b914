"""Progress for batch jobs: a tqdm bar on a terminal, one plain log line every N seconds otherwise.

tqdm redraws its bar with carriage returns; written into a file (`make demo > log`,
a Docker batch job's log) that is thousands of '\\r' fragments on one line. Off a
terminal we print `[desc] 120/400 (30%) 3.2 it/s loss=0.41` every VIKER_PROGRESS_SECONDS
(default 30) seconds instead, and one closing line for bars that are kept (leave=True).
`progress(...)` takes tqdm's arguments, so callers only change their import.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def log_every_seconds() -> float:
    return float(os.environ.get("VIKER_PROGRESS_SECONDS", "30"))


def progress(iterable=None, desc=None, total=None, disable=False, leave=True, initial=0, stream=None, **kwargs):
    """tqdm on a terminal; a LogProgress writing plain lines otherwise. disable=True shows nothing."""
    stream = stream if stream is not None else sys.stderr
    if disable is True:
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    # VIKER_PROGRESS_LINES=1: plain lines even on a terminal (processes side by side: bars would overwrite).
    if stream.isatty() and os.environ.get("VIKER_PROGRESS_LINES") != "1":
        return tqdm(iterable, desc=desc, total=total, leave=leave, initial=initial, file=stream, **kwargs)
    if disable is None:
        # tqdm's disable=None means "only on a terminal": these are short nested bars, not worth a log line.
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    return LogProgress(iterable, desc=desc, total=total, leave=leave, initial=initial, stream=stream,
                       every=log_every_seconds(), unit=kwargs.get("unit", "it"))


class LogProgress:
    """The part of tqdm's interface the pipeline uses (iterate, update, set_postfix, close), as log lines."""

    def __init__(self, iterable=None, desc=None, total=None, leave=True, initial=0, stream=None,
                 every: float = 30.0, unit: str = "it", clock=time.monotonic):
        self.iterable, self.desc, self.leave, self.unit = iterable, desc or "progress", leave, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.n, self.start_n = total, initial, initial
        self.stream, self.every, self.clock = stream or sys.stderr, every, clock
        self.t0 = self.last = clock()
        self.postfix = ""
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._write(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave:
            self._write(self.clock(), done=True)

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        text = f"[{self.desc}] {count} {rate:.2f} {self.unit}/s, {elapsed:.0f}s"
        text += " done" if done else ""
        return text + (f" {self.postfix}" if self.postfix else "")

    def _write(self, now: float, done: bool = False) -> None:
        self.stream.write(self.line(now, done) + "\n")
        self.stream.flush()
