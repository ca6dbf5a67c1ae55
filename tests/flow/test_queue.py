"""Priority queues: order, aging, producers while running, closing and cancelling.

Order is shown by the order in which attempts start, with one worker. The
first item keeps the worker waiting at a gate while the test puts the
others, so all of them wait in the queue when the gate opens.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools import (
    ConfigurationError,
    Context,
    Outcome,
    Report,
    RunAbortedError,
    State,
)
from batchtools.engine._api import build_engine, prepare
from batchtools.flow.queue import (
    PriorityQueue,
    QueueClosedError,
    SyncPriorityQueue,
    prioritized,
)
from batchtools.journal import count_states
from batchtools.testing import FakeClock, fast_retries, flaky
from tests.engine.support import threads_still_alive

WAIT_LIMIT = 30.0
"""Seconds a task or helper waits for a gate before it fails, so a broken test ends."""

# (item, priority) in the order they are put.
MIXED = [
    ("low-a", 1),
    ("high-a", 5),
    ("mid-a", 3),
    ("high-b", 5),
    ("low-b", 1),
    ("mid-b", 3),
]
MIXED_ORDER = ["high-a", "high-b", "mid-a", "mid-b", "low-a", "low-b"]


class GatedTask:
    """Tasks that record their start order; each held item waits at its gate.

    The gates are threading events, so that thread tasks and async tasks
    (which wait for them on a helper thread) share one recorder.
    """

    def __init__(self, held: tuple[str, ...] = ("first",)) -> None:
        self.started: list[Any] = []
        self._started = {item: threading.Event() for item in held}
        self._gates = {item: threading.Event() for item in held}

    def _is_held(self, item: Any) -> bool:
        return isinstance(item, str) and item in self._gates

    def run(self, item: Any) -> Any:
        """Record ``item``; a held item waits until its gate opens."""
        self.started.append(item)
        if self._is_held(item):
            self._started[item].set()
            if not self._gates[item].wait(WAIT_LIMIT):
                raise TimeoutError(f"the gate of {item!r} never opened")
        return item

    async def run_async(self, item: Any) -> Any:
        """Record ``item``; a held item waits until its gate opens."""
        self.started.append(item)
        if self._is_held(item):
            self._started[item].set()
            if not await asyncio.to_thread(self._gates[item].wait, WAIT_LIMIT):
                raise TimeoutError(f"the gate of {item!r} never opened")
        return item

    def run_cancellable(self, item: Any, context: Context) -> Any:
        """Like `run`, but a held item also returns when its attempt is cancelled."""
        self.started.append(item)
        if self._is_held(item):
            assert context.cancelled is not None
            self._started[item].set()
            context.cancelled.wait(WAIT_LIMIT)
        return item

    def release(self, item: str = "first") -> None:
        """Open the gate of ``item``."""
        self._gates[item].set()

    def has_started(self, item: str = "first") -> bool:
        """Wait, blocking this thread, until ``item`` has started."""
        return self._started[item].wait(WAIT_LIMIT)

    async def wait_started(self, item: str = "first") -> None:
        """Wait until ``item`` has started."""
        if not await asyncio.to_thread(self._started[item].wait, WAIT_LIMIT):
            raise TimeoutError(f"{item!r} never started")


def task_for(gated: GatedTask, backend: str) -> Callable[[Any], Any]:
    """Return the recorder's task for ``backend``."""
    return gated.run_async if backend == "async" else gated.run


async def put_behind_first(
    queue: PriorityQueue, gated: GatedTask, entries: Sequence[tuple[Any, float]]
) -> None:
    """Put ``"first"``, wait until it occupies the worker, then put ``entries``."""
    await queue.put("first")
    await gated.wait_started()
    for item, priority in entries:
        await queue.put(item, priority=priority)
        # Let idle workers run, as between the puts of a real producer.
        for _ in range(5):
            await asyncio.sleep(0)


# -- order -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["async", "thread"])
def test_queue_runs_highest_priority_first(backend: str) -> None:
    gated = GatedTask()

    async def scenario() -> Report:
        async with PriorityQueue(
            task_for(gated, backend), backend=backend, concurrency=1
        ) as queue:
            await put_behind_first(queue, gated, MIXED)
            gated.release()
        return queue.report

    report = asyncio.run(scenario())

    assert gated.started == ["first", *MIXED_ORDER]
    assert report.counts["succeeded"] == 7
    assert report.ok


def test_queue_item_put_later_passes_queued_items() -> None:
    # Taking "second" must not move "x" and "y" out of the queue, or "z",
    # put after them with a higher priority, would run after them.
    gated = GatedTask(held=("first", "second"))

    async def scenario() -> None:
        async with PriorityQueue(gated.run_async, concurrency=1) as queue:
            await put_behind_first(queue, gated, [("second", 5), ("x", 1), ("y", 1)])
            gated.release()
            await gated.wait_started("second")
            await queue.put("z", priority=3)
            gated.release("second")

    asyncio.run(scenario())

    assert gated.started == ["first", "second", "z", "x", "y"]


def test_queue_orders_infinite_priorities() -> None:
    gated = GatedTask()
    entries: list[tuple[Any, float]] = [
        ("bottom", -math.inf),
        ("middle", 0),
        ("top", math.inf),
    ]

    async def scenario() -> None:
        async with PriorityQueue(gated.run_async, concurrency=1) as queue:
            await put_behind_first(queue, gated, entries)
            gated.release()

    asyncio.run(scenario())

    assert gated.started == ["first", "top", "middle", "bottom"]


@pytest.mark.parametrize(
    ("aging", "expected"),
    [
        # At t=10, old-low has waited 10 s: 0 + 10 = 10 beats new-high's 5,
        # and equal-later (10, put at t=10) ties with it, so first in wins.
        (1.0, ["first", "new-top", "old-low", "equal-later", "new-high"]),
        (None, ["first", "new-top", "equal-later", "new-high", "old-low"]),
    ],
    ids=["aging", "no-aging"],
)
def test_queue_aging_with_fake_clock(aging: float | None, expected: list[str]) -> None:
    gated = GatedTask()
    clock = FakeClock()

    async def scenario() -> None:
        async with PriorityQueue(
            gated.run_async, concurrency=1, aging=aging, clock=clock
        ) as queue:
            await put_behind_first(queue, gated, [("old-low", 0)])
            clock.advance(10)
            await queue.put("new-high", priority=5)
            await queue.put("new-top", priority=12)
            await queue.put("equal-later", priority=10)
            gated.release()

    asyncio.run(scenario())

    assert gated.started == expected


# -- producers ---------------------------------------------------------------


def test_queue_accepts_items_from_running_tasks() -> None:
    holder: list[PriorityQueue] = []

    async def crawl(depth: int) -> int:
        # Each item below the top puts two children, as a crawler would.
        if depth > 0:
            for _ in range(2):
                await holder[0].put(depth - 1, priority=depth - 1)
        await asyncio.sleep(0)
        return depth

    async def scenario() -> tuple[int, int, bool]:
        async with PriorityQueue(crawl, concurrency=3) as queue:
            holder.append(queue)
            await queue.put(4, priority=4)
            report = await queue.join()
            after_join = report.total
            still_open = not queue.statistics().closed
            await queue.put(0)
        return after_join, queue.report.total, still_open

    after_join, total, still_open = asyncio.run(scenario())

    assert after_join == 1 + 2 + 4 + 8 + 16
    assert still_open
    assert total == after_join + 1


def test_queue_takes_items_from_concurrent_producers() -> None:
    async def produce(queue: PriorityQueue, name: str) -> None:
        for number in range(20):
            await queue.put((name, number), priority=number % 3)
            await asyncio.sleep(0)

    async def work(item: tuple[str, int]) -> tuple[str, int]:
        await asyncio.sleep(0)
        return item

    async def scenario() -> Report:
        async with PriorityQueue(work, concurrency=2) as queue:
            await asyncio.gather(produce(queue, "a"), produce(queue, "b"))
        return queue.report

    report = asyncio.run(scenario())

    assert report.counts["succeeded"] == 40
    expected = {(name, n) for name in "ab" for n in range(20)}
    assert {outcome.item for outcome in report.outcomes} == expected


def test_queue_put_waits_for_room_at_maxsize() -> None:
    gated = GatedTask()

    async def scenario() -> tuple[bool, bool]:
        async with PriorityQueue(gated.run_async, concurrency=1, maxsize=2) as queue:
            await put_behind_first(queue, gated, [("a", 0), ("b", 0)])
            with pytest.raises(asyncio.QueueFull):
                queue.put_nowait("c")
            waiting = asyncio.ensure_future(queue.put("c", priority=9))
            for _ in range(20):
                await asyncio.sleep(0)
            done_while_full = waiting.done()
            gated.release()
            await waiting
            return done_while_full, waiting.done()

    done_while_full, done_after = asyncio.run(scenario())

    assert not done_while_full
    assert done_after
    assert sorted(gated.started) == ["a", "b", "c", "first"]


# -- closing and invalid input -----------------------------------------------


def test_queue_put_after_close_raises() -> None:
    async def scenario() -> PriorityQueue:
        async with PriorityQueue(GatedTask().run_async, concurrency=1) as queue:
            await queue.put("one")
            queue.close()
            with pytest.raises(QueueClosedError, match=r"close\(\) was called"):
                await queue.put("two")
            with pytest.raises(QueueClosedError, match="accepts no more items"):
                queue.put_nowait("three")
        return queue

    queue = asyncio.run(scenario())

    assert queue.report.counts["succeeded"] == 1
    with pytest.raises(QueueClosedError):
        queue.put_nowait("after the block")


@pytest.mark.parametrize(
    ("priority", "message"),
    [
        (math.nan, r"priority=nan for item 'x' is NaN"),
        ("5", r"priority='5' for item 'x' is not a number"),
        (None, r"priority=None for item 'x' is not a number"),
        (True, r"priority=True for item 'x' is not a number"),
        ([1], r"priority=\[1\] for item 'x' is not a number"),
        (10**400, r"priority=1000.* for item 'x' is too large"),
    ],
    ids=["nan", "text", "none", "bool", "list", "huge-int"],
)
def test_queue_rejects_invalid_priority(priority: Any, message: str) -> None:
    async def scenario() -> PriorityQueue:
        async with PriorityQueue(GatedTask().run_async) as queue:
            with pytest.raises(ConfigurationError, match=message):
                await queue.put("x", priority=priority)
            with pytest.raises(ConfigurationError, match=message):
                queue.put_nowait("x", priority=priority)
        return queue

    queue = asyncio.run(scenario())

    assert queue.statistics().put == 0
    assert queue.report.total == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"aging": -1.0}, r"aging=-1.0 must be priority points per second"),
        ({"aging": math.inf}, r"aging=inf must be"),
        ({"aging": "fast"}, r"aging='fast' must be"),
        ({"maxsize": 0}, r"maxsize=0 must be a whole number of at least 1"),
        ({"clock": 5}, r"clock=5 must be a callable"),
        ({"on_outcome": "print"}, r"on_outcome='print' must be a callable"),
        ({"backend": "gpu"}, r"backend='gpu' is not one of"),
    ],
    ids=[
        "negative-aging",
        "infinite-aging",
        "text-aging",
        "maxsize",
        "clock",
        "hook",
        "backend",
    ],
)
def test_queue_rejects_invalid_options(option: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PriorityQueue(GatedTask().run_async, **option)


# -- failures, retries and the journal ----------------------------------------


def fail_odd(x: int) -> int:
    """Return ``x``, or raise ValueError for odd ``x``."""
    if x % 2:
        raise ValueError(f"item {x} is odd")
    return x


def attempts_by_item(report: Report) -> dict[Any, tuple[State, int]]:
    """Return each item's final state and number of attempts."""
    return {o.item: (o.state, len(o.attempts)) for o in report.outcomes}


def test_queue_counts_failures_and_retries_like_run() -> None:
    items = list(range(6))

    async def scenario() -> Report:
        task = flaky(fail_odd, fail_first=1)
        async with PriorityQueue(task, backend="thread", retry=2) as queue:
            for item in items:
                await queue.put(item)
            # join() with the queue still open returns only once every
            # retry has run, although no item is put meanwhile.
            report = await queue.join()
            assert report.total == len(items)
        return queue.report

    with fast_retries():
        report = asyncio.run(scenario())
        expected = batchtools.run(items, flaky(fail_odd, fail_first=1), retry=2)

    assert report.counts == expected.counts
    assert report.counts["failed"] == 3
    assert attempts_by_item(report) == attempts_by_item(expected)
    assert attempts_by_item(report)[1] == (State.FAILED, 3)
    assert attempts_by_item(report)[2] == (State.SUCCEEDED, 2)
    groups = report.failures.most_common()
    assert [group.count for group in groups] == [3]


async def double(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def test_queue_records_outcomes_in_journal(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    seen: list[Outcome] = []

    async def scenario() -> Report:
        async with PriorityQueue(
            double, concurrency=2, journal=path, on_outcome=seen.append
        ) as queue:
            for item in range(10):
                await queue.put(item, priority=item)
            report = await queue.join()
            # Outcomes are delivered once committed, so the file has them.
            assert count_states(path) == {"succeeded": 10}
            assert len(seen) == 10
        return report

    report = asyncio.run(scenario())

    assert report.journal == str(path)
    assert sorted(o.value for o in report.outcomes) == [2 * x for x in range(10)]


def test_queue_runs_command_templates() -> None:
    async def scenario() -> Report:
        async with PriorityQueue(["true"], concurrency=2) as queue:
            for number in range(3):
                await queue.put(str(number), priority=number)
        return queue.report

    report = asyncio.run(scenario())

    assert report.counts["succeeded"] == 3


def test_queue_on_outcome_error_aborts_run() -> None:
    def broken_hook(outcome: Outcome) -> None:
        raise KeyError(outcome.item)

    async def scenario() -> None:
        async with PriorityQueue(double, on_outcome=broken_hook) as queue:
            await queue.put(1)

    with pytest.raises(
        RunAbortedError, match=r"on_outcome raised KeyError\(1\)"
    ) as caught:
        asyncio.run(scenario())
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert isinstance(caught.value.__cause__.__cause__, KeyError)


# -- stopping early ------------------------------------------------------------


class Boom(Exception):
    """Raised inside a queue's block to leave it early."""


def test_queue_left_early_cancels_queued_items() -> None:
    before = set(threading.enumerate())
    gated = GatedTask()
    seen: list[Outcome] = []
    holder: list[PriorityQueue] = []

    async def scenario() -> None:
        async with PriorityQueue(
            gated.run_cancellable,
            backend="thread",
            concurrency=1,
            on_outcome=seen.append,
        ) as queue:
            holder.append(queue)
            entries = [(f"queued-{n}", n) for n in range(5)]
            await put_behind_first(queue, gated, entries)
            raise Boom

    with pytest.raises(Boom):
        asyncio.run(scenario())
    report = holder[0].report

    assert gated.started == ["first"]
    assert report.counts["cancelled"] == 6
    assert report.counts["succeeded"] == 0
    assert report.interrupted
    assert len(seen) == 6
    assert all("Boom" in (o.reason or "") for o in seen)
    assert holder[0].statistics().unfinished == 0
    assert threads_still_alive(before) == []


def test_queue_cancel_ends_queued_items_cancelled() -> None:
    gated = GatedTask()

    async def scenario() -> Report:
        async with PriorityQueue(gated.run_async, concurrency=1) as queue:
            await put_behind_first(queue, gated, [("a", 1), ("b", 2)])
            queue.cancel("no longer needed")
            report = await queue.join()
        gated.release()
        return report

    report = asyncio.run(scenario())

    assert report.counts["cancelled"] == 3
    reasons = {o.item: o.reason for o in report.outcomes}
    assert reasons == {name: "no longer needed" for name in ("first", "a", "b")}


def test_queue_halt_closes_queue() -> None:
    gated = GatedTask()

    async def fail_bad(item: Any) -> Any:
        if item == "bad":
            raise ValueError("bad item")
        return await gated.run_async(item)

    async def scenario() -> Report:
        async with PriorityQueue(fail_bad, concurrency=1, halt="now,fail=1") as queue:
            await put_behind_first(queue, gated, [("bad", 1), ("later", 0)])
            gated.release()
            # The halt ends the run, so join() returns with "later" cancelled.
            report = await queue.join()
            with pytest.raises(QueueClosedError, match="halted"):
                await queue.put("after the halt")
        return report

    report = asyncio.run(scenario())

    assert report.halted is not None
    assert report.counts["succeeded"] == 1
    assert report.counts["failed"] == 1
    assert report.counts["cancelled"] == 1
    states = {o.item: o.state for o in report.outcomes}
    assert states["later"] is State.CANCELLED


# -- the thread twin -------------------------------------------------------------


def test_sync_queue_takes_items_from_several_threads() -> None:
    before = set(threading.enumerate())
    producers = 4
    barrier = threading.Barrier(producers)

    def work(item: tuple[int, int]) -> tuple[int, int]:
        return item

    with SyncPriorityQueue(work, backend="thread", concurrency=4) as queue:

        def produce(number: int) -> None:
            barrier.wait(WAIT_LIMIT)
            for count in range(25):
                queue.put((number, count), priority=count)

        threads = [
            threading.Thread(target=produce, args=(n,)) for n in range(producers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_LIMIT)

    report = queue.report
    assert report.counts["succeeded"] == 100
    expected = {(n, c) for n in range(producers) for c in range(25)}
    assert {o.item for o in report.outcomes} == expected
    with pytest.raises(QueueClosedError):
        queue.put((0, 0))
    assert threads_still_alive(before) == []


def test_sync_queue_runs_highest_priority_first() -> None:
    gated = GatedTask()

    with SyncPriorityQueue(gated.run, backend="thread", concurrency=1) as queue:
        queue.put("first")
        assert gated.has_started()
        for item, priority in MIXED:
            queue.put(item, priority=priority)
        gated.release()

    assert gated.started == ["first", *MIXED_ORDER]


def test_sync_queue_left_early_cancels() -> None:
    before = set(threading.enumerate())
    gated = GatedTask()

    with (
        pytest.raises(Boom),
        SyncPriorityQueue(
            gated.run_cancellable, backend="thread", concurrency=1
        ) as queue,
    ):
        queue.put("first")
        assert gated.has_started()
        queue.put("queued", priority=3)
        raise Boom

    assert queue.report.counts["cancelled"] == 2
    assert threads_still_alive(before) == []


def test_sync_queue_keyboard_interrupt_cancels() -> None:
    before = set(threading.enumerate())
    gated = GatedTask()
    queue = SyncPriorityQueue(gated.run_cancellable, backend="thread", concurrency=1)
    queue.put("first")
    queue.put("queued")
    assert gated.has_started()
    main_thread = threading.get_ident()
    polled = threading.Event()

    def interrupt() -> None:
        # The queue closes once shutdown() runs, which then waits for
        # "first", and "first" waits until it is cancelled.
        while not queue.statistics().closed:
            polled.wait(0.001)
        signal.pthread_kill(main_thread, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        queue.shutdown()
    interrupter.join(WAIT_LIMIT)

    assert queue.report.counts["cancelled"] == 2
    reasons = {o.reason for o in queue.report.outcomes}
    assert reasons == {"interrupted by KeyboardInterrupt"}
    assert threads_still_alive(before) == []


# -- prioritized -----------------------------------------------------------------

PAIRS = [("c", 1), ("a", "3"), ("d", 0.5), ("b", 2), ("e", 1)]
PAIRS_ORDER = ["a", "b", "c", "e", "d"]


class CountingPriority:
    """Returns the priority of a pair and sets ``all_seen`` at the last one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.calls = 0
        self.all_seen = asyncio.Event()

    def __call__(self, pair: tuple[str, Any]) -> Any:
        self.calls += 1
        if self.calls == self.total:
            self.all_seen.set()
        return pair[1]


def pairs_generator(pairs: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Yield ``pairs`` from a generator, which the reader pulls on a thread."""
    yield from pairs


async def pairs_async(pairs: list[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
    """Yield ``pairs`` from an async generator."""
    for pair in pairs:
        await asyncio.sleep(0)
        yield pair


@pytest.mark.parametrize(
    "make_source",
    [pairs_generator, pairs_async],
    ids=["sync-iterator", "async-iterator"],
)
def test_prioritized_yields_highest_priority_first(
    make_source: Callable[[list[tuple[str, Any]]], Any],
) -> None:
    async def scenario() -> list[str]:
        priority = CountingPriority(len(PAIRS))
        async with prioritized(make_source(PAIRS), priority=priority) as items:
            # Every item is in the heap once its priority was computed.
            await priority.all_seen.wait()
            return [name async for name, _ in items]

    assert asyncio.run(scenario()) == PAIRS_ORDER


def test_prioritized_pauses_reading_at_maxsize() -> None:
    reads = 0

    async def source() -> AsyncIterator[int]:
        nonlocal reads
        for number in range(20):
            reads += 1
            yield number

    async def scenario() -> tuple[int, list[int]]:
        priority = CountingPriority(5)
        async with prioritized(
            source(), priority=lambda n: priority((str(n), n)), maxsize=5
        ) as items:
            await priority.all_seen.wait()
            for _ in range(20):
                await asyncio.sleep(0)
            reads_when_full = reads
            return reads_when_full, [n async for n in items]

    reads_when_full, numbers = asyncio.run(scenario())

    assert reads_when_full == 5
    assert sorted(numbers) == list(range(20))


@pytest.mark.parametrize(
    ("priority", "message"),
    [
        (lambda name: "high", r"--priority='high' for item 1 of the input \('b'\)"),
        (lambda name: math.nan, r"--priority=nan for item 1 of the input .* is NaN"),
        (
            lambda name: {"a": 1}[name],
            r"--priority of item 1 of the input \('b'\) could not be computed: "
            r"KeyError",
        ),
    ],
    ids=["text", "nan", "raises"],
)
def test_prioritized_rejects_invalid_priority(
    priority: Callable[[str], Any], message: str
) -> None:
    def checked(name: str) -> Any:
        return 1 if name == "a" else priority(name)

    async def scenario() -> None:
        async with prioritized(
            iter(["a", "b"]), priority=checked, name="--priority"
        ) as items:
            async for _ in items:
                pass

    with pytest.raises(ConfigurationError, match=message):
        asyncio.run(scenario())


def test_prioritized_closed_early_stops_reader_thread() -> None:
    before = set(threading.enumerate())

    async def scenario() -> int:
        endless = (number for number in range(10**9))
        async with prioritized(endless, priority=lambda n: n, maxsize=10) as items:
            first = int(await anext(items))
        return first

    assert asyncio.run(scenario()) >= 0
    assert threads_still_alive(before) == []


def test_prioritized_on_invalid_runs_item_last() -> None:
    rejected: list[tuple[Any, str]] = []

    def on_invalid(item: Any, error: ConfigurationError) -> float:
        rejected.append((item, str(error)))
        return -math.inf

    async def scenario() -> list[str]:
        pairs = [("bad", "high"), ("a", 2), ("b", 1)]
        priority = CountingPriority(len(pairs))
        async with prioritized(
            pairs_async(pairs), priority=priority, on_invalid=on_invalid
        ) as items:
            await priority.all_seen.wait()
            return [name async for name, _ in items]

    assert asyncio.run(scenario()) == ["a", "b", "bad"]
    assert len(rejected) == 1
    assert "priority='high' for item 0 of the input" in rejected[0][1]


def test_prioritized_feeds_engine_in_priority_order() -> None:
    started: list[str] = []

    async def scenario() -> Report:
        first_started = asyncio.Event()
        gate = asyncio.Event()

        async def task(pair: tuple[str, Any]) -> str:
            started.append(pair[0])
            if len(started) == 1:
                # The first pair taken occupies the only worker until all
                # pairs are read.
                first_started.set()
                await gate.wait()
            return pair[0]

        priority = CountingPriority(len(PAIRS))
        job = prepare(task, concurrency=1, collect=True)
        job.settings.read_ahead = 0
        source = prioritized(pairs_generator(PAIRS), priority=priority)
        running = asyncio.ensure_future(build_engine(source, job, None).run())
        await priority.all_seen.wait()
        await first_started.wait()
        gate.set()
        return await running

    report = asyncio.run(scenario())

    assert report.counts["succeeded"] == len(PAIRS)
    # Which pair runs first depends on what was read when the worker was
    # free; every later one was taken by priority.
    assert started[1:] == [name for name in PAIRS_ORDER if name != started[0]]
