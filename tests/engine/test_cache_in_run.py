"""The result cache inside a run: hits skip the task, one flight per cold key."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

import batchtools
from batchtools import Cache, ConfigurationError, State
from batchtools.testing import FakeClock


class CountingTask:
    """Doubles items, counting calls per item; fails items in ``failing``."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.calls: list[int] = []
        self.failing = failing

    def __call__(self, item: int) -> int:
        self.calls.append(item)
        if item in self.failing:
            raise ValueError(f"item {item} failed")
        return item * 2


def test_cold_key_wanted_by_32_items_runs_once() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def slow_fetch(item: str) -> str:
        calls.append(item)
        # Every other item arrives while this call waits.
        await release.wait()
        return item.upper()

    async def main() -> batchtools.Report:
        async def gate_opener() -> None:
            while not calls:
                await asyncio.sleep(0)
            for _ in range(100):
                await asyncio.sleep(0)
            release.set()

        opener = asyncio.ensure_future(gate_opener())
        report = await batchtools.arun(
            ["same"] * 32, slow_fetch, concurrency=32, policies=[Cache()]
        )
        await opener
        return report

    report = asyncio.run(main())

    assert calls == ["same"]
    assert report.counts["succeeded"] == 32
    assert report.cache_hits == 31
    assert [o.value for o in report.outcomes] == ["SAME"] * 32
    assert sum(1 for o in report.outcomes if o.source == "cache") == 31


def test_disk_cache_serves_a_second_run(tmp_path: Path) -> None:
    cache = Cache(path=tmp_path / "cache.db", ttl="1h")
    task = CountingTask()

    report_one = batchtools.run(range(10), task, policies=[cache])
    first_calls = sorted(task.calls)
    task.calls.clear()
    report_two = batchtools.run(range(10), task, policies=[cache])

    assert first_calls == list(range(10))
    assert task.calls == []
    assert report_one.cache_hits == 0
    assert report_two.cache_hits == 10
    assert report_two.values() == [n * 2 for n in range(10)]
    assert all(o.source == "cache" for o in report_two.outcomes)


def test_failed_outcomes_are_not_cached(tmp_path: Path) -> None:
    cache = Cache(path=tmp_path / "cache.db")
    task = CountingTask(failing=frozenset({3}))

    report_one = batchtools.run(range(5), task, policies=[cache])
    task.calls.clear()
    task.failing = frozenset()
    report_two = batchtools.run(range(5), task, policies=[cache])

    assert report_one.counts["failed"] == 1
    assert task.calls == [3]
    assert report_two.ok
    assert report_two.cache_hits == 4


def test_waiters_run_themselves_when_the_first_call_fails() -> None:
    calls: list[int] = []

    async def fails_once(item: int) -> int:
        calls.append(item)
        await asyncio.sleep(0)
        if len(calls) == 1:
            raise ConnectionError("first call fails")
        return item

    report = batchtools.run([7] * 5, fails_once, concurrency=5, policies=[Cache()])

    assert calls == [7, 7]
    assert report.counts["failed"] == 1
    assert report.counts["succeeded"] == 4
    assert report.cache_hits == 3


def test_entries_expire_after_the_ttl(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    cache = Cache(path=tmp_path / "cache.db", ttl=10, clock=clock)
    task = CountingTask()

    batchtools.run(range(3), task, policies=[cache])
    clock.advance(5)
    batchtools.run(range(3), task, policies=[cache])
    clock.advance(6)
    report = batchtools.run(range(3), task, policies=[cache])

    assert len(task.calls) == 6
    assert report.cache_hits == 0


def test_cache_hits_are_journaled_as_succeeded(tmp_path: Path) -> None:
    cache = Cache(path=tmp_path / "cache.db")
    task = CountingTask()
    batchtools.run(range(4), task, policies=[cache])

    journal = tmp_path / "run.db"
    report = batchtools.run(range(4), task, policies=[cache], journal=journal)

    assert report.cache_hits == 4
    with sqlite3.connect(journal) as connection:
        states = connection.execute("select state, value from items").fetchall()
    assert sorted(states) == [("succeeded", str(n * 2)) for n in range(4)]


def test_commands_and_batches_take_no_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="Python tasks"):
        batchtools.run(["a"], "echo {}", policies=[Cache()])
    with pytest.raises(ConfigurationError, match="batch_size=4"):
        batchtools.run(range(8), CountingTask(), batch_size=4, policies=[Cache()])


def test_stop_cancels_cache_waiters() -> None:
    async def main() -> batchtools.Report:
        from batchtools.engine._api import build_engine, prepare

        started = asyncio.Event()

        async def hang(item: int) -> int:
            started.set()
            await asyncio.Event().wait()
            return item

        job = prepare(hang, concurrency=4, policies=[Cache()], collect=True)
        engine = build_engine([1, 1, 1], job, None)
        running = asyncio.ensure_future(engine.run())
        await started.wait()
        engine.stop("received SIGINT", cancel=True)
        return await running

    report = asyncio.run(main())

    assert report.counts["cancelled"] == 3
    assert all(o.state is State.CANCELLED for o in report.outcomes)


def test_callable_objects_keep_their_cache_across_instances(tmp_path: Path) -> None:
    cache = Cache(path=tmp_path / "cache.db")
    first = CountingTask()
    second = CountingTask()

    batchtools.run(range(3), first, policies=[cache])
    report = batchtools.run(range(3), second, policies=[cache])

    assert second.calls == []
    assert report.cache_hits == 3


def test_damaged_cache_file_runs_items(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    task = CountingTask()
    batchtools.run(range(20), task, policies=[Cache(path=path)])
    # Keep the header page, and make every other page garbage.
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[page:] = b"\xff" * (len(data) - page)
    path.write_bytes(bytes(data))
    task.calls.clear()

    report = batchtools.run(range(20), task, policies=[Cache(path=path)])

    assert report.ok
    assert report.cache_errors > 0
    assert sorted(task.calls) == list(range(20))
