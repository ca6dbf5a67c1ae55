"""Memory: the admission gate, the concurrency cap and their validation."""

from __future__ import annotations

import asyncio

import pytest

import batchtools
from batchtools import ConfigurationError, Memory
from batchtools.testing import FakeClock

MiB = 2**20


class FakeMemory:
    """Available memory the test sets; counts how often it was read."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.readings = 0

    def __call__(self) -> int:
        self.readings += 1
        return self.available


def test_gate_pauses_below_free_and_resumes_above() -> None:
    clock = FakeClock()
    memory = FakeMemory(900 * MiB)
    gate = Memory(free="1G", available=memory, clock=clock, check_every=0.5).gate()
    assert gate is not None

    assert gate.admit() == 0.5
    assert gate.paused
    assert gate.reason() == "paused: 900 MiB available, below 1,024 MiB"
    clock.advance(0.2)
    assert gate.admit() == pytest.approx(0.3)
    assert memory.readings == 1
    clock.advance(0.3)
    memory.available = 2048 * MiB
    assert gate.admit() == 0.0
    assert not gate.paused
    assert gate.pauses == 1
    assert gate.paused_time() == pytest.approx(0.5)


def test_gate_reads_memory_at_most_once_per_interval() -> None:
    clock = FakeClock()
    memory = FakeMemory(4096 * MiB)
    gate = Memory(free="1G", available=memory, clock=clock, check_every=0.25).gate()
    assert gate is not None

    for _ in range(1000):
        assert gate.admit() == 0.0
    clock.advance(0.25)
    gate.admit()

    assert memory.readings == 2


def test_gate_counts_the_current_pause() -> None:
    clock = FakeClock()
    gate = Memory(free=100, available=lambda: 10, clock=clock).gate()
    assert gate is not None
    gate.admit()
    clock.advance(7.0)

    assert gate.paused_time() == pytest.approx(7.0)


def test_no_free_size_means_no_gate() -> None:
    assert Memory(per_item="1M").gate() is None


def test_cap_divides_available_memory_and_keeps_one() -> None:
    memory = Memory(per_item="1G", available=lambda: 5 * 2**30 + 7)

    assert memory.cap(64) == 5
    assert memory.cap(3) == 3
    assert Memory(per_item="1G", available=lambda: 1).cap(8) == 1
    assert Memory().cap(8) == 8


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"free": "lots"}, "--memfree"),
        ({"per_item": 0}, "--mem-per-item"),
        ({"max_worker": "-1G"}, "--max-memory"),
        ({"max_items_per_worker": 0}, "--max-items-per-worker"),
        ({"max_items_per_worker": True}, "--max-items-per-worker"),
        ({"check_every": 0}, "check_every=0"),
    ],
)
def test_bad_values_are_rejected_when_built(
    kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Memory(**kwargs)  # type: ignore[arg-type]

    assert fragment in str(caught.value)


def test_run_starts_nothing_while_memory_is_short() -> None:
    started: list[int] = []
    seen_at_low: list[int] = []

    def available() -> int:
        low = len(seen_at_low) < 3
        if low:
            seen_at_low.append(len(started))
            return 10 * MiB
        return 8192 * MiB

    async def task(item: int) -> int:
        started.append(item)
        return item

    report = batchtools.run(
        range(20),
        task,
        concurrency=4,
        policies=[Memory(free="1G", available=available, check_every=0.001)],
    )

    assert report.ok
    assert seen_at_low == [0, 0, 0]
    assert len(started) == 20
    assert report.memory_pauses == 1
    assert report.paused_seconds > 0


def test_stop_ends_memory_pause() -> None:
    async def main() -> batchtools.Report:
        from batchtools.engine._api import build_engine, prepare

        async def task(item: int) -> int:
            return item

        job = prepare(
            task,
            policies=[Memory(free="1G", available=lambda: 0, check_every=60)],
            collect=True,
        )
        engine = build_engine(range(5), job, None)
        running = asyncio.ensure_future(engine.run())
        while not (engine.settings.memory_gate and engine.settings.memory_gate.paused):
            await asyncio.sleep(0)
        engine.stop("received SIGINT")
        return await running

    report = asyncio.run(main())

    assert report.counts["succeeded"] == 0
    assert report.interrupted
    assert report.memory_pauses == 1


def test_per_item_memory_caps_concurrency() -> None:
    from batchtools.engine._api import prepare

    job = prepare(
        lambda item: item,
        concurrency=10,
        policies=[Memory(per_item="1M", available=lambda: 3 * MiB)],
    )

    assert job.backend.concurrency == 3


def test_decorator_waits_for_memory_before_each_call() -> None:
    readings: list[int] = []
    calls: list[int] = []

    def available() -> int:
        # Short for the first two readings, then plenty.
        readings.append(len(calls))
        return 10 * MiB if len(readings) <= 2 else 8192 * MiB

    @Memory(free="1G", available=available, check_every=0.001)
    def work(item: int) -> int:
        calls.append(item)
        return item

    assert work(5) == 5
    assert readings[:2] == [0, 0]
    assert calls == [5]


def test_async_decorator_waits_too() -> None:
    readings: list[int] = []

    def available() -> int:
        readings.append(1)
        return 0 if len(readings) == 1 else 8192 * MiB

    @Memory(free="1G", available=available, check_every=0.001)
    async def work(item: int) -> int:
        return item * 2

    assert asyncio.run(work(4)) == 8
    assert len(readings) == 2


def test_decorator_needs_a_free_size() -> None:
    with pytest.raises(ConfigurationError, match="needs free=SIZE"):
        Memory(per_item="1M")(print)
