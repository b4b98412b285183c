"""Progress of long work, visible where a job's stderr is a file (SLURM, nohup) as well as on a terminal.

    from foundation.progress import Progress

    with Progress(total=len(rows), desc="teacher embeddings", unit="row") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

On a terminal (the stream, stderr by default, is a TTY) this is a tqdm bar. Without one it logs a line through
`logging` at the first update, then at most every `interval` seconds, and at the end:

    teacher embeddings: 12800/2800000 row (0%) in 01:02, 206.5 row/s, ~03:45:07 left

`interval` defaults to the environment's CLIPCOMPRESS_PROGRESS_SECONDS, else 30 seconds. Nothing is shown or
logged when `enabled` is False (a caller's --log-level warning), when `logger` does not pass INFO records, or,
with `rank_zero_only` (the default), on a process other than rank 0 of a process group. Work that reports no
count while it runs (one long library call, such as a faiss k-means) runs inside `progress.ticking()`, which
refreshes the bar every second, or logs the elapsed time at the same interval.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional

from foundation.errors import UserError

INTERVAL_ENV = "CLIPCOMPRESS_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0
# how often `ticking` redraws a terminal bar (its elapsed time) while the work reports nothing
BAR_REFRESH_S = 1.0


def default_interval() -> float:
    """Seconds between two logged progress lines: $CLIPCOMPRESS_PROGRESS_SECONDS, else 30."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:  # `not >=` also refuses NaN
        raise UserError(f"{INTERVAL_ENV}={value!r}: must be a number of seconds, at least 0")
    return seconds


def process_rank() -> int:
    """This process's rank in an initialised process group, else the launcher's RANK (0 without one)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0") or 0)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A counter of done work shown as a tqdm bar on a terminal, else as log lines at a steady interval."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 enabled: bool = True, logger: Optional[logging.Logger] = None, interval: Optional[float] = None,
                 stream: Any = None, leave: bool = False, rank_zero_only: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._initial = initial
        self.logger = logger or logging.getLogger()
        self.interval = default_interval() if interval is None else interval
        stream = sys.stderr if stream is None else stream
        shown = (enabled and self.logger.isEnabledFor(logging.INFO)
                 and not (rank_zero_only and process_rank() != 0))
        self.mode = None if not shown else "bar" if _is_terminal(stream) else "log"
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, leave=leave,
                             dynamic_ncols=True)
        self.started = time.monotonic()  # when the count began (its rate and the time left are since then)
        self._logged_at: Optional[float] = None
        self._logged_n: Optional[int] = None
        self._postfix = ""
        self._lock = threading.Lock()  # `ticking`'s thread and the caller's updates
        self._closed = False

    # --- the caller's side ---------------------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.mode == "log":
                now = time.monotonic()
                if self._logged_at is None or now - self._logged_at >= self.interval:
                    self._log(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (e.g. loss=0.52): on the bar, and in the next logged line."""
        with self._lock:
            self._postfix = ", ".join(f"{key} {value}" for key, value in values.items())
            if self._bar is not None:
                self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Ends the bar, or logs the last line (unless the last update's line already gave the final count)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "log" and (self._logged_at is None or self._logged_n != self.n or not self.n):
                self._log(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextlib.contextmanager
    def ticking(self) -> Iterator["Progress"]:
        """Keep the progress visible while the work inside reports nothing: the bar's elapsed time is redrawn
        every second; without a terminal a line with the elapsed time is logged every `interval` seconds."""
        if self.mode is None:
            yield self
            return
        stop = threading.Event()
        period = BAR_REFRESH_S if self.mode == "bar" else max(self.interval, 0.05)

        def tick() -> None:
            while not stop.wait(period):
                with self._lock:
                    if self._bar is not None:
                        self._bar.refresh()
                    else:
                        self._log(time.monotonic())

        thread = threading.Thread(target=tick, name=f"progress: {self.desc}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    # --- the log line --------------------------------------------------------------------------------------

    def line(self, now: Optional[float] = None) -> str:
        """What a logged progress line says at time `now` (time.monotonic())."""
        from tqdm import tqdm

        elapsed = (time.monotonic() if now is None else now) - self.started
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        elif self.n or self.total is not None:
            text = f"{self.desc}: {self.n} {self.unit}"
        else:  # work without a count (`ticking`)
            text = f"{self.desc}: {'done' if self._closed else 'running'}"
        text += f" in {tqdm.format_interval(elapsed)}"
        if done:
            text += f", {rate:.4g} {self.unit}/s"
            if self.total and rate > 0 and self.n < self.total:
                text += f", ~{tqdm.format_interval((self.total - self.n) / rate)} left"
        return text + (f", {self._postfix}" if self._postfix else "")

    def _log(self, now: float) -> None:
        self.logger.info("%s", self.line(now))
        self._logged_at, self._logged_n = now, self.n
