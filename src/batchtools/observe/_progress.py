"""The live progress line on a terminal: done, failed, retrying, rate, ETA."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from batchtools.engine._outcome import Outcome, Report, State
from batchtools.observe._summary import format_duration

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine


class Progress:
    """An engine observer that keeps a one-line summary on stderr.

    The engine only bumps counters; rich redraws the line a few times a
    second on its own thread, so a fast run does not pay for drawing.

    Args:
        console: The stderr console to draw on.
        total: The number of items, when known, for the percentage and ETA.
    """

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.failed = 0
        self._engine: Engine | None = None
        self._started = time.monotonic()
        self._live = Live(
            self,
            console=console,
            refresh_per_second=4,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def on_start(self, engine: Engine) -> None:
        self._engine = engine
        self._started = time.monotonic()
        self._live.start()

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.done += 1
        if outcome.state is State.FAILED:
            self.failed += 1

    def on_finish(self, report: Report) -> None:
        self.stop()

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """Erase the line and keep it away while the block writes to the terminal.

        Command output on the same terminal would otherwise be appended to the
        progress line; the next refresh draws the line again below it.
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

    def line(self) -> str:
        """Return the progress line's text."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        engine: Any = self._engine
        retrying = engine.retrying if engine is not None else 0
        running = engine.in_flight if engine is not None else 0
        parts = []
        if self.total:
            percent = 100.0 * self.done / self.total
            parts.append(f"{self.done}/{self.total} done ({percent:.0f}%)")
        else:
            parts.append(f"{self.done} done")
        parts.append(f"{self.failed} failed")
        parts.append(f"{retrying} retrying")
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
