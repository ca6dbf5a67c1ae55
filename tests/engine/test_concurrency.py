"""The concurrency limit is reached and never exceeded.

A barrier of size ``concurrency`` that every attempt waits at can only open
when that many attempts execute at once, and a probe that counts the
attempts executing records the peak.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import batchtools
from tests.engine import tasks

BARRIER_LIMIT = 30.0
"""Seconds an attempt waits at the barrier before it fails, so a broken test ends."""


class Probe:
    """Counts the attempts executing now and the peak of that count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.executing = 0
        self.peak = 0

    def enter(self) -> None:
        with self._lock:
            self.executing += 1
            self.peak = max(self.peak, self.executing)

    def leave(self) -> None:
        with self._lock:
            self.executing -= 1


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_async_concurrency_bound_exact(concurrency: int) -> None:
    barrier = asyncio.Barrier(concurrency)
    probe = Probe()

    async def task(x: int) -> int:
        probe.enter()
        try:
            async with asyncio.timeout(BARRIER_LIMIT):
                await barrier.wait()
        finally:
            probe.leave()
        return x

    report = batchtools.run(range(10 * concurrency), task, concurrency=concurrency)

    assert report.counts["succeeded"] == 10 * concurrency, list(report.failed())
    assert probe.peak == concurrency
    assert probe.executing == 0


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_thread_concurrency_bound_exact(concurrency: int) -> None:
    barrier = threading.Barrier(concurrency, timeout=BARRIER_LIMIT)
    probe = Probe()

    def task(x: int) -> int:
        probe.enter()
        try:
            barrier.wait()
        finally:
            probe.leave()
        return x

    report = batchtools.run(
        range(10 * concurrency), task, backend="thread", concurrency=concurrency
    )

    assert report.counts["succeeded"] == 10 * concurrency, list(report.failed())
    assert probe.peak == concurrency
    assert probe.executing == 0


def test_thread_bound_exact_with_timeout() -> None:
    # With a timeout the thread backend queues nothing ahead, which is a
    # different path to the same bound.
    concurrency = 3
    barrier = threading.Barrier(concurrency, timeout=BARRIER_LIMIT)
    probe = Probe()

    def task(x: int) -> int:
        probe.enter()
        try:
            barrier.wait()
        finally:
            probe.leave()
        return x

    report = batchtools.run(
        range(30), task, backend="thread", concurrency=concurrency, timeout=60
    )

    assert report.counts["succeeded"] == 30, list(report.failed())
    assert probe.peak == concurrency


def test_process_concurrency_bound_exact(tmp_path: Path) -> None:
    concurrency = 3
    items = [(str(tmp_path), x, concurrency) for x in range(40)]

    report = batchtools.run(
        items,
        tasks.hold_slot_until_gathered,
        backend="process",
        concurrency=concurrency,
    )

    assert report.counts["succeeded"] == 40, list(report.failed())
    slots = [outcome.value for outcome in report.outcomes]
    # Slot numbers start at 0, so the highest one is the peak minus one.
    assert max(slots) == concurrency - 1
    assert (tmp_path / "gathered").exists()
    assert not list(tmp_path.glob("slot-*"))
