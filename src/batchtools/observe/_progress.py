"""The progress of a run: a live line on a terminal, a periodic log line elsewhere.

Both count outcomes as the engine emits them, so a batch (``-n``) or a
chunk of items sent to one worker counts as its items, not as one. Items
finished in an earlier session of the run count from the start: the engine
emits them as it re-reads the input, and `ProgressCounts.add_earlier`
counts those that this session never reads (a retry, a resume of items
read from standard input). They are left out of the rate, which measures
this session's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.text import Text

from batchtools.engine._outcome import Outcome, Report, State
from batchtools.observe._summary import format_duration

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine

progress_log = logging.getLogger("batchtools.progress")


class ProgressCounts:
    """An engine observer that counts finished items and describes the progress.

    Args:
        total: The number of items, when known, for the percentage and ETA.
        clock: Returns monotonic seconds; tests pass a fake clock.

    Attributes:
        total: The number of items, or ``None``; may be set during the run.
        done: Items with an outcome, those of earlier sessions included.
        failed: Those of them that failed.
        carried: Those of them finished in an earlier session.
    """

    def __init__(
        self, total: int | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.carried = 0
        self._clock = clock
        self._engine: Engine | None = None
        self._started = clock()

    def add_earlier(self, done: int, failed: int = 0) -> None:
        """Count items that an earlier session finished and this one does not read.

        Args:
            done: Items with an outcome, failed ones included.
            failed: Those of them that failed.
        """
        self.done += done
        self.failed += failed
        self.carried += done

    def on_start(self, engine: Engine) -> None:
        self._engine = engine
        self._started = self._clock()

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.done += 1
        if outcome.state is State.FAILED:
            self.failed += 1
        if outcome.source == "journal":
            self.carried += 1

    def on_finish(self, report: Report) -> None:
        return None

    def line(self) -> str:
        """Return the progress as one line of text."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = (self.done - self.carried) / elapsed
        engine = self._engine
        parts = []
        if self.total:
            percent = 100.0 * self.done / self.total
            parts.append(f"{self.done}/{self.total} done ({percent:.0f}%)")
        else:
            parts.append(f"{self.done} done")
        parts.append(f"{self.failed} failed")
        if engine is not None:
            # Attempts queued ahead at threads or worker processes are handed
            # over but do not execute yet; at most `concurrency` do.
            running = min(engine.in_flight, engine.backend.concurrency)
            parts.append(f"{engine.retrying} retrying")
            parts.append(f"{running} running")
        parts.append(f"{rate:,.1f}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        limiter = engine.settings.concurrency_limiter if engine is not None else None
        if limiter is not None:
            parts.append(f"limit {limiter.limit}")
        gate = engine.settings.memory_gate if engine is not None else None
        if gate is not None and gate.paused:
            parts.append(gate.reason())
        return " | ".join(parts)


class Progress(ProgressCounts):
    """An engine observer that keeps the progress line on a terminal's stderr.

    The engine only bumps counters; rich redraws the line a few times a
    second on its own thread, so a fast run does not pay for drawing.

    Args:
        console: The stderr console to draw on.
        total: The number of items, when known, for the percentage and ETA.
        clock: Returns monotonic seconds; tests pass a fake clock.
    """

    def __init__(
        self,
        console: Console,
        total: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(total, clock=clock)
        self.console = console
        self._live = Live(
            self,
            console=console,
            refresh_per_second=4,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def on_start(self, engine: Engine) -> None:
        super().on_start(engine)
        self._live.start()

    def on_finish(self, report: Report) -> None:
        self.stop()

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """Erase the line and keep it away while the block writes to the terminal.

        Command output on the same terminal would otherwise be appended to the
        progress line; the next refresh draws the line again below it. The
        lock is rich's own, which its refresh thread takes to draw.
        """
        with self._live._lock:
            if self._live.is_started:
                self.console.file.write("\r\x1b[2K")
                self.console.file.flush()
            yield

    def stop(self) -> None:
        """Remove the line from the terminal."""
        if self._live.is_started:
            self._live.stop()

    def __rich__(self) -> Text:
        return Text(self.line(), no_wrap=True, overflow="ellipsis")


class ProgressLog(ProgressCounts):
    """An engine observer that logs the progress line every ``interval`` seconds.

    For output that is not a terminal (a log file, a CI job), where a line
    redrawn in place would not work. It logs at INFO to the
    ``batchtools.progress`` logger, from a timer on the engine's event loop,
    so a run shorter than ``interval`` logs nothing.

    Args:
        total: The number of items, when known, for the percentage and ETA.
        interval: Seconds between two lines.
        clock: Returns monotonic seconds; tests pass a fake clock.

    Raises:
        ValueError: ``interval`` is not a positive number.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval={interval!r} must be a positive number")
        super().__init__(total, clock=clock)
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None

    def on_start(self, engine: Engine) -> None:
        super().on_start(engine)
        self._schedule()

    def on_finish(self, report: Report) -> None:
        self.stop()

    def stop(self) -> None:
        """Log no more lines."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        progress_log.info("%s", self.line())
        self._schedule()
