"""lock_key: items with equal keys run one at a time, other keys in parallel."""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest

import batchtools
from batchtools import ConfigurationError


def folder(path: str) -> str:
    return path.rsplit("/", 1)[0]


def test_increments_under_one_key_never_interleave() -> None:
    totals: collections.Counter[str] = collections.Counter()

    async def increment(item: tuple[str, int]) -> None:
        key, _ = item
        value = totals[key]
        await asyncio.sleep(0)  # another item of the key would read here
        totals[key] = value + 1

    items = [(key, n) for n in range(100) for key in ("a", "b")]
    report = batchtools.run(
        items, increment, concurrency=32, lock_key=lambda item: item[0]
    )

    assert report.ok
    assert totals == {"a": 100, "b": 100}


def test_other_keys_run_while_one_key_is_held() -> None:
    # The item of folder a waits until the item of folder b has run. With
    # one global lock instead of one per key, it would wait forever.
    b_ran = threading.Event()

    def task(path: str) -> str:
        if folder(path) == "b":
            b_ran.set()
        elif not b_ran.wait(timeout=30):
            raise TimeoutError("the item of folder b never ran")
        return path

    report = batchtools.run(
        ["a/1", "b/1"], task, backend="thread", concurrency=2, lock_key=folder
    )

    assert report.ok


def test_lock_key_one_item_per_key() -> None:
    running: collections.Counter[str] = collections.Counter()
    worst: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    paths = [f"{d}/{n}" for n in range(30) for d in ("x", "y", "z")]

    def task(path: str) -> None:
        key = folder(path)
        with lock:
            running[key] += 1
            worst[key] = max(worst[key], running[key])
        with lock:
            running[key] -= 1

    report = batchtools.run(
        paths, task, backend="thread", concurrency=8, lock_key=folder
    )

    assert report.ok
    assert worst == {"x": 1, "y": 1, "z": 1}


def test_failing_lock_key_fails_item() -> None:
    def key_of(item: int) -> int:
        if item == 3:
            raise ValueError("no key for 3")
        return item % 2

    async def task(item: int) -> int:
        return item

    report = batchtools.run(range(6), task, lock_key=key_of)

    assert report.counts["succeeded"] == 5
    (failed,) = report.failed()
    assert failed.item == 3
    assert "no key for 3" in str(failed.error)


def test_stop_cancels_key_waiters() -> None:
    async def main() -> batchtools.Report:
        from batchtools.engine._api import build_engine, prepare

        started = asyncio.Event()

        async def hang(item: int) -> int:
            started.set()
            await asyncio.Event().wait()
            return item

        job = prepare(hang, concurrency=4, lock_key=lambda item: "one", collect=True)
        engine = build_engine(range(4), job, None)
        running = asyncio.ensure_future(engine.run())
        await started.wait()
        engine.stop("received SIGINT", cancel=True)
        return await running

    report = asyncio.run(main())

    assert report.counts["cancelled"] == 4


def test_lock_key_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="lock_key='folder'"):
        batchtools.run([1], print, lock_key="folder")  # type: ignore[arg-type]
