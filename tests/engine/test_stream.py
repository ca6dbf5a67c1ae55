"""`stream` and `astream`: lazy reading, order, and cancellation on exit."""

from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools import Context, State
from tests.engine import tasks
from tests.engine.support import child_processes, threads_still_alive

WAIT_LIMIT = 60.0
"""Seconds a task or helper waits before it fails, so a broken test ends."""

READ_BOUND = 4096
"""Items the engine may read ahead of the consumer.

The stream buffers at most 1,024 unconsumed outcomes, and the engine reads
its input in blocks of 256 into a buffer of 512. With a consumer that
waited a second before taking the first outcome, about 2,050 items were
read (measured on 2 CPUs). Twice that still proves reading is bounded.
"""


class CountingIterator:
    """Wraps an iterator and counts the items taken from it."""

    def __init__(self, inner: Iterator[int]) -> None:
        self._inner = inner
        self.reads = 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> int:
        item = next(self._inner)
        self.reads += 1
        return item


async def identity_async(x: int) -> int:
    """Return ``x``."""
    return x


def identity(x: int) -> int:
    """Return ``x``."""
    return x


@pytest.mark.parametrize(
    ("backend", "task"),
    [("async", identity_async), ("thread", identity)],
    ids=["async", "thread"],
)
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_stream_reads_endless_input_lazily(
    backend: str, task: Callable[[int], Any], ordered: bool
) -> None:
    before = set(threading.enumerate())
    source = CountingIterator(itertools.count())

    with batchtools.stream(
        source, task, backend=backend, concurrency=4, ordered=ordered
    ) as outcomes:
        for outcome in outcomes:
            reads_at_first = source.reads
            first = outcome
            break

    assert first.state is State.SUCCEEDED
    if ordered:
        assert first.item == 0
    assert 1 <= reads_at_first <= READ_BOUND
    # The reader thread is gone, so nothing reads the source any more.
    assert threads_still_alive(before) == []
    assert source.reads <= READ_BOUND


class RandomReleaser:
    """Lets executing attempts finish one at a time, in a seeded random order.

    Each attempt reports that it started and waits at its own gate. A
    controller thread waits until every attempt that can execute has
    started, then opens the gate of one of them chosen at random.
    """

    def __init__(self, total: int, concurrency: int, seed: int) -> None:
        self.total = total
        self.concurrency = concurrency
        self._rng = random.Random(seed)
        self._started: queue.Queue[int] = queue.Queue()
        self._gates = {x: threading.Event() for x in range(total)}
        self.release_order: list[int] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._control, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(WAIT_LIMIT)

    def task(self, x: int) -> int:
        self._started.put(x)
        if not self._gates[x].wait(WAIT_LIMIT):
            raise TimeoutError(f"item {x} was never released")
        return x

    def _control(self) -> None:
        waiting: list[int] = []
        try:
            while len(self.release_order) < self.total:
                executing = min(self.concurrency, self.total - len(self.release_order))
                while len(waiting) < executing:
                    waiting.append(self._started.get(timeout=WAIT_LIMIT))
                chosen = waiting.pop(self._rng.randrange(len(waiting)))
                self.release_order.append(chosen)
                self._gates[chosen].set()
        except BaseException as error:
            self.errors.append(error)
            for gate in self._gates.values():
                gate.set()


def test_ordered_stream_yields_input_order() -> None:
    releaser = RandomReleaser(total=60, concurrency=4, seed=20240601)
    releaser.start()

    items = [
        outcome.item
        for outcome in batchtools.stream(
            range(60), releaser.task, backend="thread", concurrency=4, ordered=True
        )
    ]
    releaser.join()

    assert releaser.errors == []
    assert releaser.release_order != sorted(releaser.release_order)
    assert items == list(range(60))


def test_unordered_stream_yields_all() -> None:
    releaser = RandomReleaser(total=60, concurrency=4, seed=7)
    releaser.start()

    outcomes = list(
        batchtools.stream(range(60), releaser.task, backend="thread", concurrency=4)
    )
    releaser.join()

    assert releaser.errors == []
    assert sorted(outcome.item for outcome in outcomes) == list(range(60))
    assert all(outcome.state is State.SUCCEEDED for outcome in outcomes)


def test_ordered_astream_yields_input_order() -> None:
    total, concurrency = 40, 4
    rng = random.Random(99)
    release_order: list[int] = []

    async def main() -> list[int]:
        started: asyncio.Queue[int] = asyncio.Queue()
        gates = {x: asyncio.Event() for x in range(total)}

        async def task(x: int) -> int:
            await started.put(x)
            await gates[x].wait()
            return x

        async def control() -> None:
            waiting: list[int] = []
            while len(release_order) < total:
                executing = min(concurrency, total - len(release_order))
                while len(waiting) < executing:
                    waiting.append(await started.get())
                chosen = waiting.pop(rng.randrange(len(waiting)))
                release_order.append(chosen)
                gates[chosen].set()

        async with asyncio.timeout(WAIT_LIMIT):
            controller = asyncio.create_task(control())
            async with batchtools.astream(
                range(total), task, concurrency=concurrency, ordered=True
            ) as outcomes:
                items = [outcome.item async for outcome in outcomes]
            await controller
        return items

    items = asyncio.run(main())

    assert release_order != sorted(release_order)
    assert items == list(range(total))


class CancelWatcher:
    """A thread task that waits until the engine cancels its attempt.

    Item 0 returns at once. Every other attempt waits on its context's
    cancellation flag, and records whether the flag was set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.saw_cancel = 0

    def task(self, x: int, context: Context) -> int:
        if x == 0:
            return x
        with self._lock:
            self.started += 1
        assert context.cancelled is not None
        cancelled = context.cancelled.wait(WAIT_LIMIT)
        with self._lock:
            self.saw_cancel += cancelled
        return x


def test_stream_exit_cancels_threads() -> None:
    before = set(threading.enumerate())
    watcher = CancelWatcher()

    with batchtools.stream(
        range(100), watcher.task, backend="thread", concurrency=4, ordered=True
    ) as outcomes:
        for outcome in outcomes:
            assert outcome.item == 0
            break

    # Threads that wait on the flag end only if the cancel reached them.
    assert threads_still_alive(before) == []
    assert watcher.started >= 1
    assert watcher.saw_cancel == watcher.started
    report = outcomes.report
    assert report is not None
    assert report.interrupted
    assert report.counts["succeeded"] == 1


def test_stream_break_cancels_at_once() -> None:
    before = set(threading.enumerate())
    watcher = CancelWatcher()

    for outcome in batchtools.stream(
        range(100), watcher.task, backend="thread", concurrency=4, ordered=True
    ):
        assert outcome.item == 0
        break

    assert threads_still_alive(before) == []
    assert watcher.saw_cancel == watcher.started


def test_stream_exit_reaps_processes(tmp_path: Path) -> None:
    items = [(str(tmp_path), x) for x in range(20)]

    with batchtools.stream(
        items, tasks.wait_for_file, backend="process", concurrency=2, ordered=True
    ) as outcomes:
        for outcome in outcomes:
            assert outcome.value == 0
            assert len(child_processes()) >= 1
            break

    assert child_processes() == set()
    report = outcomes.report
    assert report is not None
    assert report.interrupted


def test_astream_exit_cancels_attempts() -> None:
    started = 0
    cancelled = 0

    async def task(x: int) -> int:
        nonlocal started, cancelled
        if x == 0:
            return x
        started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return x

    async def main() -> set[asyncio.Task[Any]]:
        async with asyncio.timeout(WAIT_LIMIT):
            async with batchtools.astream(
                range(100), task, concurrency=4, ordered=True
            ) as outcomes:
                async for outcome in outcomes:
                    assert outcome.item == 0
                    break
            assert outcomes.report is not None
            assert outcomes.report.interrupted
        return asyncio.all_tasks() - {asyncio.current_task()}

    left_over = asyncio.run(main())

    assert left_over == set()
    assert started >= 1
    assert cancelled == started
