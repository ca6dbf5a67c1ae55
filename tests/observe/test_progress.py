"""The progress line and the periodic progress log, over real runs."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

import batchtools
from batchtools.engine._engine import Engine
from batchtools.observe._progress import Progress, ProgressCounts, ProgressLog
from tests.engine.tasks import report_pid

WAIT = 30.0
"""Seconds a test waits for a run's thread or a log record."""


class FakeClock:
    """A monotonic clock that the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError(f"item {item} is bad")
    return item


def _batch(items: list[int]) -> list[int]:
    return items


def _terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=200), screen


# -- counting -----------------------------------------------------------------


def test_batches_count_their_items() -> None:
    progress = ProgressCounts(101)

    report = batchtools.run(range(101), _batch, batch_size=10, observers=[progress])

    assert report.total == 101
    assert progress.done == 101
    assert progress.line().startswith("101/101 done (100%) | 0 failed")


def test_process_chunks_count_their_items() -> None:
    progress = ProgressCounts(101)

    report = batchtools.run(
        range(101), report_pid, backend="process", concurrency=2, observers=[progress]
    )

    assert report.total == 101
    assert progress.done == 101
    assert progress.line().startswith("101/101 done (100%)")


def test_terminal_line_ends_at_all_items() -> None:
    console, screen = _terminal()
    progress = Progress(console, 101)

    batchtools.run(range(101), _batch, batch_size=10, observers=[progress])

    # The last frame rich draws before it erases the line.
    assert "101/101 done (100%)" in screen.getvalue()
    assert "11/101" not in screen.getvalue()


def test_resume_counts_earlier_session_from_start(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run(range(4), _fail_on_three, journal=journal)
    clock = FakeClock()
    progress = ProgressCounts(6, clock=clock)

    class Seen:
        """Notes the progress when the first item of this session finishes."""

        first: str | None = None

        def on_start(self, engine: Engine) -> None:
            clock.now += 2.0

        def on_retry(self, *arguments: object) -> None:
            return None

        def on_outcome(self, outcome: batchtools.Outcome) -> None:
            if outcome.source == "run" and self.first is None:
                self.first = progress.line()

        def on_finish(self, report: batchtools.Report) -> None:
            return None

    seen = Seen()
    batchtools.run(
        range(6), _fail_on_three, journal=journal, observers=[progress, seen]
    )

    assert seen.first is not None
    assert seen.first.startswith("5/6 done (83%) | 1 failed")
    assert progress.done == 6
    assert progress.failed == 1
    assert progress.carried == 4
    # Two items ran in the 2 s of the fake clock; the carried ones do not count.
    assert "| 1.0/s" in progress.line()


def test_add_earlier_counts_towards_done_not_rate() -> None:
    clock = FakeClock()
    progress = ProgressCounts(6, clock=clock)

    progress.add_earlier(4, failed=1)
    clock.now += 10.0

    assert progress.line() == "4/6 done (67%) | 1 failed | 0.0/s"


def test_running_counts_only_executing_attempts() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)
    engines: list[Engine] = []

    def hold(item: int) -> int:
        started.release()
        release.wait(WAIT)
        return item

    class Keep(ProgressCounts):
        def on_start(self, engine: Engine) -> None:
            super().on_start(engine)
            engines.append(engine)

    progress = Keep(20)
    runner = threading.Thread(
        target=batchtools.run,
        args=(range(20), hold),
        kwargs={"concurrency": 2, "backend": "thread", "observers": [progress]},
    )
    runner.start()
    try:
        for _ in range(2):
            assert started.acquire(timeout=WAIT)
        # The thread backend queues attempts ahead of its two threads.
        engine = engines[0]
        deadline = time.monotonic() + WAIT
        while engine.in_flight <= 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.in_flight > 2
        line = progress.line()
    finally:
        release.set()
        runner.join(WAIT)

    assert "| 2 running |" in line


# -- the periodic log -----------------------------------------------------------


class _Records(logging.Handler):
    """Keeps the records of the progress logger; `seen` is set at the first one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.seen.set()


@pytest.fixture
def progress_records() -> Iterator[_Records]:
    logger = logging.getLogger("batchtools.progress")
    handler = _Records()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_log_writes_lines_while_running(progress_records: _Records) -> None:
    def wait_for_a_line(item: int) -> int:
        assert progress_records.seen.wait(WAIT), "no progress line was logged"
        return item

    progress = ProgressLog(3, interval=0.02)

    report = batchtools.run(range(3), wait_for_a_line, observers=[progress])

    assert report.counts["succeeded"] == 3
    assert progress_records.messages
    assert progress_records.messages[0].startswith("0/3 done (0%) | 0 failed")


def test_progress_log_silent_for_short_run(progress_records: _Records) -> None:
    progress = ProgressLog(3, interval=3600)

    batchtools.run(range(3), _batch, batch_size=3, observers=[progress])

    assert progress_records.messages == []


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_progress_log_rejects_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="must be a positive number"):
        ProgressLog(interval=interval)
