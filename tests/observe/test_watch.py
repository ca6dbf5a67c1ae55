"""Warnings during a run: slow attempts and steady memory growth.

Slow attempts are found in real runs whose observer reads a fake clock, so
an attempt becomes "slow" when the test moves the clock, not after a real
wait. Memory growth is judged from readings that the test supplies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import batchtools
from batchtools import ConfigurationError
from batchtools.observe.watch import MemoryGrowth, SlowAttempts, run_memory

MIB = 1024 * 1024
WAIT = 60.0


class FakeClock:
    """The wall clock plus an offset that the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class StepClock:
    """A clock that shows only the times the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class WarningCatcher(logging.Handler):
    """Collects the messages of ``batchtools.watch`` and sets an event on each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.arrived.set()


@pytest.fixture
def warnings() -> Iterator[WarningCatcher]:
    catcher = WarningCatcher()
    logger = logging.getLogger("batchtools.watch")
    logger.addHandler(catcher)
    try:
        yield catcher
    finally:
        logger.removeHandler(catcher)


def _wait_for(condition: Callable[[], bool], description: str) -> None:
    """Poll ``condition`` every few milliseconds, failing after `WAIT` seconds."""
    pause = threading.Event()
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {description}"
        pause.wait(0.002)


def test_slow_attempt_warned_once_with_key(warnings: WarningCatcher) -> None:
    clock = FakeClock()
    watch = SlowAttempts(factor=10, after=1.0, interval=0.002, clock=clock)

    def task(item: str) -> str:
        if item != "slow":
            return item
        # Once the quick items have their outcomes, only this attempt is in
        # flight. Moving the clock makes it look 100 s old.
        _wait_for(lambda: len(watch._durations) == 10, "the quick items")
        clock.offset = 100.0
        assert warnings.arrived.wait(WAIT), "no warning about the slow item"
        # Later checks see the same attempt and must stay quiet.
        checked = watch.checks
        _wait_for(lambda: watch.checks >= checked + 3, "three more checks")
        return item

    report = batchtools.run(
        ["slow"] + [f"quick-{n}" for n in range(10)],
        task,
        backend="thread",
        concurrency=2,
        observers=[watch],
    )

    assert report.ok
    slow_key = next(o.key for o in report.outcomes if o.item == "slow")
    assert len(warnings.messages) == 1
    message = warnings.messages[0]
    assert f"item {slow_key} attempt 1 has run for 100." in message
    assert "10 times the median attempt duration" in message
    assert "slot 1" in message or "slot 2" in message


def test_slow_attempts_quiet_without_enough_samples(warnings: WarningCatcher) -> None:
    clock = FakeClock()
    watch = SlowAttempts(after=1.0, interval=0.002, min_samples=5, clock=clock)

    def task(item: int) -> int:
        if item == 0:
            clock.offset = 100.0
            _wait_for(lambda: watch.checks >= 5, "five checks")
        return item

    batchtools.run(range(3), task, backend="thread", concurrency=1, observers=[watch])

    assert watch.checks >= 5
    assert warnings.messages == []


def test_slow_threshold_follows_median() -> None:
    watch = SlowAttempts(factor=10, after=1.0, min_samples=3)
    assert watch.threshold() is None

    for duration in (0.5, 0.3, 0.4):
        watch._durations.append(duration)

    assert watch.threshold() == pytest.approx(4.0)
    watch._durations.extend([0.01] * 10)
    assert watch.threshold() == 1.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"factor": 0}, "slow factor must be above 0"),
        ({"after": -1}, "must be 0 seconds or more"),
        ({"window": 0}, "must be 1 or more"),
        ({"interval": 0.0}, "check interval must be above 0"),
    ],
)
def test_slow_attempts_rejects_invalid_settings(
    arguments: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SlowAttempts(**arguments)  # type: ignore[arg-type]  # floats for int fields


class Readings:
    """A sampler that returns the given sizes in turn, moving a clock 5 s each time."""

    def __init__(self, clock: StepClock, sizes: list[int]) -> None:
        self.clock = clock
        self.sizes = iter(sizes)

    def __call__(self) -> int:
        self.clock.now += 5.0
        return next(self.sizes)


def _growth(sizes: list[int], **settings: float) -> MemoryGrowth:
    clock = StepClock()
    return MemoryGrowth(
        sampler=Readings(clock, sizes),
        clock=clock,
        **settings,  # type: ignore[arg-type]  # floats for the float settings
    )


def _check(watch: MemoryGrowth, times: int) -> None:
    for _ in range(times):
        watch.check()


def test_memory_steady_growth_warns(warnings: WarningCatcher) -> None:
    # 12 readings 5 s apart, 8 MiB more each time: 96 MiB a minute.
    watch = _growth([500 * MIB + n * 8 * MIB for n in range(12)])

    _check(watch, 12)

    assert watch.warnings == 1
    assert len(warnings.messages) == 1
    assert "grew steadily over the last 55 s" in warnings.messages[0]
    assert "by 96.0 MiB a minute" in warnings.messages[0]
    assert "to 588.0 MiB now" in warnings.messages[0]


def test_memory_growth_below_threshold_is_quiet(warnings: WarningCatcher) -> None:
    # 1 MiB a reading is 12 MiB a minute, below the default 32 MiB.
    watch = _growth([500 * MIB + n * MIB for n in range(30)])

    _check(watch, 30)

    assert watch.warnings == 0
    assert warnings.messages == []


def test_memory_jumps_are_not_steady(warnings: WarningCatcher) -> None:
    # Up and down by 200 MiB, then a jump: a steep slope, but a poor fit.
    sizes = [500 * MIB + (200 * MIB if n % 2 else 0) for n in range(24)]
    sizes[-1] += 300 * MIB
    watch = _growth(sizes)

    _check(watch, 24)

    assert watch.warnings == 0
    assert warnings.messages == []


def test_memory_warning_repeats_after_quiet_time(warnings: WarningCatcher) -> None:
    # A steady leak for about 4 minutes: a warning at 55 s, the next one
    # 120 s later at the earliest.
    watch = _growth([500 * MIB + n * 8 * MIB for n in range(50)], repeat_after=120.0)

    _check(watch, 50)

    assert watch.warnings == 2
    assert len(warnings.messages) == 2


def test_memory_growth_in_run_reports_per_items(warnings: WarningCatcher) -> None:
    sizes = [500 * MIB + n * 8 * MIB for n in range(200)]
    watch = _growth(sizes, interval=0.002)
    gate = threading.Event()

    def task(item: int) -> int:
        # Item n waits for check n // 8, so that items end between readings.
        deadline = time.monotonic() + WAIT
        while watch.checks <= item // 8 and not warnings.messages:
            assert time.monotonic() < deadline, "the timer made too few checks"
            gate.wait(0.002)
        return item

    report = batchtools.run(
        range(120), task, backend="thread", concurrency=1, observers=[watch]
    )

    assert report.ok
    assert watch.checks >= 12
    assert len(warnings.messages) == 1
    assert "per 10,000 items" in warnings.messages[0]


def test_memory_rejects_invalid_settings() -> None:
    with pytest.raises(ConfigurationError, match="memory window must be 3 or more"):
        MemoryGrowth(window=2)
    with pytest.raises(ConfigurationError, match="min_fit must be from 0 to 1"):
        MemoryGrowth(min_fit=1.5)
    with pytest.raises(ConfigurationError, match="memory interval must be above 0"):
        MemoryGrowth(interval=0)


def test_run_memory_counts_this_process() -> None:
    assert run_memory() > 1 * MIB
