"""Progress of long stages: a tqdm bar on a terminal, plain lines otherwise.

tqdm turns itself off when stderr is not a terminal (`> log`, `| tee`, CI), so a redirected run
would show nothing for many minutes. `progress` keeps tqdm's interface (iterate, `update`,
`set_postfix`, `close`) and, without a terminal, prints one line when a stage starts, every
`every` items or `seconds` seconds, and when it ends:

    zoo grid [0/1]: 3/12 (25%) 41 s, 13.7 s/it, eta 2 min 03 s, loss=0.412
"""

import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

SECONDS = 30.0  # a line at least this often without a terminal


def _interactive() -> bool:
    """stderr is a terminal, or a Jupyter kernel shows the bar."""
    if sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, initial: int = 0,
             every: int | None = None, seconds: float = SECONDS, disable: bool | None = False,
             **tqdm_kwargs: Any) -> "tqdm | LineProgress":
    """tqdm(iterable, desc=, total=, initial=, **tqdm_kwargs) on a terminal; else a LineProgress with
    a line every `every` items (None: by time only) or `seconds`. disable=True shows nothing
    (disable=None, tqdm's "only on a terminal", counts as False: lines are the point)."""
    if disable:
        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=True)
    if _interactive():
        return tqdm(iterable, desc=desc, total=total, initial=initial, **tqdm_kwargs)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, every=every, seconds=seconds)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


class LineProgress:
    """tqdm's interface, printing plain lines to stderr (one per `every` items or `seconds`)."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None, initial: int = 0,
                 every: int | None = None, seconds: float = SECONDS):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.every, self.seconds = every, seconds
        self.postfix = ""
        self.start_n, self.start_t = initial, time.time()
        self.last_n, self.last_t = initial, self.start_t
        self.closed = False
        self._print("start" + (f", {initial}/{total} done before" if initial else ""))

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if (self.every and self.n - self.last_n >= self.every) or now - self.last_t >= self.seconds:
            self._print(self._status(now))
            self.last_n, self.last_t = self.n, now

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            ended = "done" if self.total is None or self.n >= self.total else "stopped"
            self._print(f"{ended}, {self._status(time.time())}")

    def _status(self, now: float) -> str:
        """`3/12 (25%) 41 s, 13.7 s/it, eta 2 min 03 s, loss=0.412`"""
        elapsed, done = now - self.start_t, self.n - self.start_n
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}",
                 _duration(elapsed)]
        if done > 0:
            parts.append(f"{elapsed / done:.2f} s/it" if elapsed >= done else f"{done / max(elapsed, 1e-9):.1f} it/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_duration(elapsed / done * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self, msg: str) -> None:
        print(f"{self.desc}: {msg}" if self.desc else msg, file=sys.stderr, flush=True)
