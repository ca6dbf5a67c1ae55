"""Warnings while a run goes on: slow attempts and steady memory growth.

Two engine observers, which ``batchtools run``, ``resume`` and ``retry``
attach and a library caller may pass in ``observers=``:

- `SlowAttempts` logs an attempt that has run longer than ``factor`` times
  the running median of attempt durations, and at least ``after`` seconds,
  once per attempt, naming its key and how long it has run.
- `MemoryGrowth` samples the resident memory of this process and its child
  processes, and logs when it grows steadily.

Both check on a timer of the engine's event loop, so an attempt pays
nothing for them beyond a duration appended to a window. A check of slow
attempts scans the attempts in flight once. Both log to the
``batchtools.watch`` logger at WARNING.

Example::

    report = batchtools.run(
        items, task, observers=[SlowAttempts(factor=5, after=30), MemoryGrowth()]
    )
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from batchtools._exceptions import ConfigurationError, format_size
from batchtools.engine._outcome import Outcome, Report

if TYPE_CHECKING:
    from batchtools.engine._engine import AttemptInFlight, Engine

__all__ = ["MemoryGrowth", "MemorySample", "SlowAttempts", "run_memory"]

log = logging.getLogger("batchtools.watch")

_MIB = 1024 * 1024


class _Periodic:
    """Calls `check` every ``interval`` seconds of the engine's loop while it runs.

    Attributes:
        checks: How many checks the timer has made.
    """

    interval: float

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checks = 0

    def on_start(self, engine: Engine) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.interval, self._tick)

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        pass

    def on_outcome(self, outcome: Outcome) -> None:
        pass

    def on_finish(self, report: Report) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._engine = None

    def check(self) -> None:
        """Check once; called on the engine's loop."""

    def _tick(self) -> None:
        engine = self._engine
        if engine is None or engine.report.duration:
            # The run ended; it sets its duration even when it was aborted,
            # which skips `on_finish`.
            self._engine = self._timer = None
            return
        try:
            self.check()
            self.checks += 1
        except Exception:
            # A broken check must not end the run, and it has no caller.
            log.exception("%s failed to check the run", type(self).__name__)
        if self._loop is not None:
            self._timer = self._loop.call_later(self.interval, self._tick)


class SlowAttempts(_Periodic):
    """Log attempts that run much longer than is usual in their run.

    An attempt is slow when it has run for more than ``factor`` times the
    median duration of the last ``window`` attempts, and for at least
    ``after`` seconds. Each slow attempt is logged once. Nothing is logged
    before ``min_samples`` attempts have ended, because the median of
    fewer is unreliable.

    An attempt's time runs from when the engine handed it to the backend,
    as its timeout does. Where attempts queue ahead of workers (threads,
    processes and Dask without a timeout), an attempt waiting behind a slow
    one on the same worker would look slow too. So only the oldest attempt
    of each job slot is checked.

    Args:
        factor: How many times the median duration makes an attempt slow.
        after: Seconds an attempt must have run, at least, to be slow.
        interval: Seconds between checks; by default half of ``after``,
            between 0.01 and 1.
        window: How many of the latest attempt durations the median covers.
        min_samples: Attempts that must have ended before any warning.
        clock: Returns the time in seconds since the epoch.

    Attributes:
        wants_attempts: Tells the engine to keep every attempt in outcomes,
            because the median is measured from them.

    Raises:
        ConfigurationError: A value is out of range.
    """

    wants_attempts = True

    def __init__(
        self,
        *,
        factor: float = 10.0,
        after: float = 1.0,
        interval: float | None = None,
        window: int = 1000,
        min_samples: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        if not factor > 0:
            raise ConfigurationError(f"slow factor must be above 0, not {factor!r}")
        if not after >= 0:
            raise ConfigurationError(
                f"slow attempt threshold must be 0 seconds or more, not {after!r}"
            )
        if window < 1 or min_samples < 1:
            raise ConfigurationError(
                f"window ({window!r}) and min_samples ({min_samples!r}) must be 1 "
                "or more"
            )
        self.factor = factor
        self.after = after
        self.interval = (
            interval if interval is not None else max(0.01, min(1.0, after / 2))
        )
        if not self.interval > 0:
            raise ConfigurationError(
                f"check interval must be above 0 seconds, not {interval!r}"
            )
        self.min_samples = min_samples
        self._clock = clock
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        # (key, attempt) of the slow attempts logged and still in flight.
        self._warned: set[tuple[str, int]] = set()
        self.warnings = 0

    def on_start(self, engine: Engine) -> None:
        self._durations.clear()
        self._warned.clear()
        super().on_start(engine)

    def on_outcome(self, outcome: Outcome) -> None:
        if outcome.source != "run":
            return
        for attempt in outcome.attempts:
            self._durations.append(attempt.duration)

    def threshold(self) -> float | None:
        """Return the seconds after which an attempt is slow, or ``None`` if unknown."""
        if len(self._durations) < self.min_samples:
            return None
        return max(self.after, self.factor * statistics.median(self._durations))

    def check(self) -> None:
        """Log the attempts in flight that became slow since the last check."""
        engine = self._engine
        threshold = self.threshold()
        if engine is None or threshold is None:
            return
        now = self._clock()

        oldest: dict[int, AttemptInFlight] = {}
        for attempt in engine.attempts_in_flight(started_before=now - threshold):
            known = oldest.get(attempt.slot)
            if known is None or attempt.started < known.started:
                oldest[attempt.slot] = attempt

        still_slow = set()
        for attempt in oldest.values():
            mark = (attempt.key, attempt.attempt)
            still_slow.add(mark)
            if mark in self._warned:
                continue
            self.warnings += 1
            where = f"slot {attempt.slot}"
            if attempt.worker is not None:
                where += f", {attempt.worker}"
            log.warning(
                "item %s attempt %d has run for %.1f s (%s), more than %.1f s: "
                "%g times the median attempt duration of this run",
                attempt.key,
                attempt.attempt,
                now - attempt.started,
                where,
                threshold,
                self.factor,
            )
        # Attempts that ended are forgotten, so the set stays as small as
        # the number of slow attempts in flight.
        self._warned = still_slow


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One reading of a run's memory.

    Attributes:
        time: When it was taken, in seconds of the observer's clock.
        rss: Resident memory in bytes, of this process and its children.
        items: Items with an outcome at that time.
    """

    time: float
    rss: int
    items: int


def run_memory() -> int:
    """Return the resident memory of this process and its child processes, in bytes.

    Workers of a Dask cluster on other hosts are not counted.
    """
    me = psutil.Process()
    total = int(me.memory_info().rss)
    for child in me.children(recursive=True):
        try:
            total += int(child.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # It ended, or is not ours to read.
    return total


class MemoryGrowth(_Periodic):
    """Log when the memory of a run grows steadily.

    Every ``interval`` seconds it reads the resident memory (by default of
    this process and its children, see `run_memory`). Over the last
    ``window`` readings it fits a line by least squares. It logs a warning
    when the line rises by at least ``per_minute`` bytes a minute and fits
    the readings well, with a coefficient of determination of at least
    ``min_fit``. A leak fits a rising line well, but the ups and downs of
    a healthy run do not. The warning gives the growth a minute and, when
    items ended meanwhile, per 10,000 items. After a warning the readings
    start over, and the next warning comes ``repeat_after`` seconds later
    at the earliest.

    With the defaults, memory must grow by 32 MiB a minute or more, for a
    minute (12 readings, 5 seconds apart).

    Args:
        interval: Seconds between readings.
        window: Readings the line is fitted to, at least 3.
        per_minute: Growth in bytes a minute that is worth a warning.
        min_fit: The minimum coefficient of determination, from 0 to 1.
        repeat_after: Seconds after a warning before the next one.
        sampler: Returns the resident memory in bytes.
        clock: Returns the time in seconds.

    Raises:
        ConfigurationError: A value is out of range.
    """

    def __init__(
        self,
        *,
        interval: float = 5.0,
        window: int = 12,
        per_minute: int = 32 * _MIB,
        min_fit: float = 0.9,
        repeat_after: float = 600.0,
        sampler: Callable[[], int] = run_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not interval > 0:
            raise ConfigurationError(
                f"memory interval must be above 0 seconds, not {interval!r}"
            )
        if window < 3:
            raise ConfigurationError(f"memory window must be 3 or more, not {window!r}")
        if not 0 <= min_fit <= 1:
            raise ConfigurationError(f"min_fit must be from 0 to 1, not {min_fit!r}")
        self.interval = interval
        self.per_minute = per_minute
        self.min_fit = min_fit
        self.repeat_after = repeat_after
        self._sampler = sampler
        self._clock = clock
        self.samples: collections.deque[MemorySample] = collections.deque(maxlen=window)
        self._quiet_until = float("-inf")
        self.warnings = 0

    def on_start(self, engine: Engine) -> None:
        self.samples.clear()
        self._quiet_until = float("-inf")
        super().on_start(engine)

    def check(self) -> None:
        """Take a reading, and log a warning if memory grows steadily."""
        engine = self._engine
        items = engine.report.total if engine is not None else 0
        now = self._clock()
        self.samples.append(MemorySample(now, self._sampler(), items))
        if len(self.samples) < (self.samples.maxlen or 0) or now < self._quiet_until:
            return

        times = [sample.time for sample in self.samples]
        sizes = [float(sample.rss) for sample in self.samples]
        slope, fit = _line_fit(times, sizes)
        growth = slope * 60
        if growth < self.per_minute or fit < self.min_fit:
            return

        first, last = self.samples[0], self.samples[-1]
        done = last.items - first.items
        per_items = ""
        if done > 0:
            per_item = (last.rss - first.rss) / done
            per_items = (
                f", {format_size(max(0, int(per_item * 10_000)))} per 10,000 items"
            )
        self.warnings += 1
        log.warning(
            "memory of the run grew steadily over the last %.0f s: by %s a minute%s, "
            "to %s now; a task or the input may be leaking memory",
            last.time - first.time,
            format_size(int(growth)),
            per_items,
            format_size(last.rss),
        )
        self.samples.clear()
        self._quiet_until = now + self.repeat_after


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Return the least-squares slope of ``ys`` over ``xs`` and the fit's R squared.

    R squared is 0 for points with no spread in ``xs``, and 1 for points
    that all lie on the line, a flat one included.
    """
    count = len(xs)
    mean_x = sum(xs) / count
    mean_y = sum(ys) / count
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    if sxx == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    if syy == 0:
        return slope, 1.0
    return slope, (sxy * sxy) / (sxx * syy)
