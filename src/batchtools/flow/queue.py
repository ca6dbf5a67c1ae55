"""Priority queues on the engine: `PriorityQueue`, its thread twin, `prioritized`.

`asyncio.PriorityQueue` does not fit, for three reasons. It breaks ties
between equal priorities by comparing the items (a TypeError for dicts).
It has no aging and no way to close before Python 3.13. And nothing runs
its items. Here `heapq` orders entries by ``(-rank, ticket)``: the
ticket keeps first in, first out among equal ranks, so items are never
compared.

Aging: an item waiting since ``put_time`` has the priority
``priority + aging * (now - put_time)``. Every item ages at the same
rate, so the order is that of ``priority - aging * put_time``, a rank that
does not change while the item waits, and the heap never needs reordering.

A `PriorityQueue` is the item source of one engine run. The run reads no
item ahead (``Settings.read_ahead = 0``), and its backend queues no attempt
ahead of its workers. So the engine takes an item only when a worker is
free, and takes the one with the highest priority at that moment. Limits,
retries, timeouts, policies, the journal and the report are the engine's,
as in `run`::

    put() --> heap --(a worker is free)--> engine --> outcome --> report
                                                           --> on_outcome
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import (
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from batchtools._exceptions import ConfigurationError, QueueClosedError
from batchtools.engine._api import open_journal, prepare
from batchtools.engine._engine import Engine, Observer
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.flow._priority import (
    DEFAULT_PRIORITY,
    Clock,
    T,
    _aging_rate,
    _check_clock,
    _Heap,
    _item_text,
    _set_result,
    _size_limit,
    check_priority,
)
from batchtools.flow.prioritized import Prioritized, prioritized
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.retry import Retry

log = logging.getLogger("batchtools.flow")

__all__ = [
    "Prioritized",
    "PriorityQueue",
    "QueueClosedError",
    "QueueStatistics",
    "SyncPriorityQueue",
    "check_priority",
    "prioritized",
]


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """Counts of a priority queue at one moment.

    Attributes:
        queued: Items waiting in the queue for a free worker.
        unfinished: Items put and without an outcome yet: queued, running
            or waiting out a retry's backoff.
        put: Items put since the queue was made.
        closed: Whether the queue no longer accepts items.
    """

    queued: int
    unfinished: int
    put: int
    closed: bool


class _QueueEngine(Engine):
    """An engine that notifies its queue when it stops, whatever stopped it."""

    on_stop: Callable[[str], None] | None = None

    def stop(self, reason: str = "interrupted", *, cancel: bool = False) -> None:
        super().stop(reason, cancel=cancel)
        if self.on_stop is not None:
            self.on_stop(reason)


class _Source:
    """The engine's view of a queue: its items, highest priority first."""

    def __init__(self, queue: PriorityQueue) -> None:
        self._queue = queue

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> Any:
        return await self._queue._next_item()

    async def aclose(self) -> None:
        # The engine calls this as its run ends, and reads no more items.
        self._queue._reading_ended()


class PriorityQueue:
    """Run ``task`` on items put while it runs, the highest priority first.

    Use it as an async context manager. Leaving the block normally closes
    the queue and waits until every item put has its outcome. Leaving it
    with an exception cancels what runs and what is queued. ``put`` after
    `close` raises `QueueClosedError`, and so does ``put`` after the run
    stopped by itself (a halt, a deadline)::

        async with PriorityQueue(fetch, concurrency=8, retry=2) as queue:
            await queue.put(url, priority=5)
            await queue.put(other_url)          # priority 0
            report = await queue.join()         # the queue stays open
        print(queue.report.counts)

    The concurrency limit, retries, timeouts, policies, journal and report
    are those of `run`. An item that was put is taken from the queue when
    a worker is free. A retry waits out its backoff outside the queue and
    runs before any queued item. Outcomes reach ``on_outcome`` as they
    finish (with a journal, once committed), on the event loop's thread.
    Items that had not started when the queue was cancelled or the run
    stopped end ``cancelled``, with the stop's reason.

    With a journal, an item is recorded once the engine takes it from the
    queue. Items still queued at a cancel were never recorded, so a resume
    of that journal does not run them.

    Args:
        task: A sync or async callable taking one item, or a command
            template, as for `run`.
        aging: Priority points an item gains per second of waiting, so
            that low priorities are not starved; ``None`` for no aging.
        clock: Returns seconds for aging; a fake clock in tests.
        maxsize: The maximum number of items waiting in the queue. At the
            maximum, ``put`` waits for room and ``put_nowait`` raises
            `asyncio.QueueFull`. ``None`` for no limit.
        on_outcome: Called with each outcome. If it raises, the run stops
            and `join` and `aclose` raise `RunAbortedError`.
        collect: Keep every outcome in the report, as `run` does. A
            long-lived queue may pass ``False``; counts and failures are
            kept either way.
        concurrency, retry, timeout, backend, policies, journal, key, halt,
            deadline, observers, force, shell, env, setup, teardown: As
            for `run`.

    Raises:
        ConfigurationError: An option or the task is invalid; nothing ran.
        JournalError: The journal cannot be used; nothing ran.
    """

    def __init__(
        self,
        task: Any,
        *,
        concurrency: int | str | Concurrency | None = None,
        retry: Retry | int | None = None,
        timeout: float | str | None = None,
        backend: str | None = None,
        aging: float | None = None,
        clock: Clock = time.monotonic,
        maxsize: int | None = None,
        policies: Sequence[object] = (),
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], str] | None = None,
        halt: Halt | str | None = None,
        deadline: float | str | None = None,
        observers: Sequence[Observer] = (),
        on_outcome: Callable[[Outcome], Any] | None = None,
        collect: bool = True,
        force: bool = False,
        shell: bool = False,
        env: Mapping[str, str] | None = None,
        setup: Callable[[], Any] | None = None,
        teardown: Callable[[Any], Any] | None = None,
    ) -> None:
        self._heap = _Heap(_aging_rate(aging), _check_clock(clock))
        self._maxsize = _size_limit("maxsize", maxsize)
        if on_outcome is not None and not callable(on_outcome):
            raise ConfigurationError(f"on_outcome={on_outcome!r} must be a callable")
        self._on_outcome = on_outcome

        job = prepare(
            task,
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            backend=backend,
            key=key,
            halt=halt,
            policies=policies,
            deadline=deadline,
            collect=collect,
            shell=shell,
            env=env,
            setup=setup,
            teardown=teardown,
        )
        job.settings.read_ahead = 0
        # Thread and process backends queue attempts ahead of their workers
        # unless `queue_ahead` is off, and queued attempts run in the order
        # taken, whatever their priority.
        if getattr(job.backend, "queue_ahead", False):
            job.backend.queue_ahead = False  # type: ignore[attr-defined]

        engine = _QueueEngine(
            _Source(self),
            job.backend,
            job.settings,
            journal=open_journal(journal, job, force=force),
            observers=observers,
        )
        engine.on_stop = self._engine_stopped
        engine.set_output(self._delivered, self._backlog, 1)
        self._engine = engine

        # Why the queue accepts no more items, once it does not.
        self._closed: str | None = None
        self._stop_reason: str | None = None
        # Whether the engine may still take items from the queue.
        self._reading = True
        self._put_count = 0
        self._unfinished = 0
        self._next_seq: int | None = None
        # Items handed to the engine and still without an outcome, by
        # identity, because the engine passes the same object back in the
        # outcome.
        self._handed: dict[int, list[Any]] = collections.defaultdict(list)
        self._item_waiter: asyncio.Future[None] | None = None
        self._put_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[Report] | None = None
        self._hook_failed = False

    def __repr__(self) -> str:
        stats = self.statistics()
        state = "closed" if stats.closed else "open"
        return (
            f"<PriorityQueue queued={stats.queued} unfinished={stats.unfinished} "
            f"put={stats.put} {state}>"
        )

    @property
    def report(self) -> Report:
        """The run's report, counting outcomes as they arrive; final once the
        queue has ended."""
        return self._engine.report

    def statistics(self) -> QueueStatistics:
        """Return the queue's counts at this moment."""
        return QueueStatistics(
            queued=len(self._heap),
            unfinished=self._unfinished,
            put=self._put_count,
            closed=self._closed is not None,
        )

    # -- putting items ---------------------------------------------------

    def put_nowait(self, item: Any, priority: float = DEFAULT_PRIORITY) -> None:
        """Queue ``item``; a larger ``priority`` runs first.

        Raises:
            QueueClosedError: The queue accepts no more items.
            ConfigurationError: ``priority`` is not a number, or is NaN.
            asyncio.QueueFull: The queue has ``maxsize`` items waiting.
        """
        number = self._check_put(item, priority)
        if self._maxsize is not None and len(self._heap) >= self._maxsize:
            raise asyncio.QueueFull
        self._push(item, number)

    async def put(self, item: Any, priority: float = DEFAULT_PRIORITY) -> None:
        """Queue ``item``, waiting while ``maxsize`` items are waiting.

        Raises:
            QueueClosedError: The queue accepts no more items, or it stopped
                accepting them while this call waited for room.
            ConfigurationError: ``priority`` is not a number, or is NaN.
        """
        number = self._check_put(item, priority)
        while self._maxsize is not None and len(self._heap) >= self._maxsize:
            waiter = asyncio.get_running_loop().create_future()
            self._put_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._put_waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake_one_putter()  # pass the room on
                raise
            self._check_open()
        self._push(item, number)

    def _check_put(self, item: Any, priority: float) -> float:
        self._check_open()
        return check_priority(priority, where=f" for item {_item_text(item)}")

    def _check_open(self) -> None:
        if self._closed is not None:
            raise QueueClosedError(self._closed)

    def _push(self, item: Any, number: float) -> None:
        was_empty = not self._heap
        self._heap.push(item, number)
        self._put_count += 1
        self._unfinished += 1
        _set_result(self._item_waiter)
        if was_empty:
            # Workers that found the queue empty wait for this (`_backlog`).
            self._engine.output_taken()

    # -- ending ----------------------------------------------------------

    def close(self) -> None:
        """Stop accepting items; the items put so far still run."""
        if self._closed is not None:
            return
        self._closed = "close() was called"
        log.debug("priority queue of run %s closed", self._engine.run_id)
        self._wake_all()

    def cancel(self, reason: str = "the priority queue was cancelled") -> None:
        """Stop accepting items and cancel the queued and running ones.

        Running attempts are cancelled as by a second Ctrl-C. Their items,
        and the queued ones, end ``cancelled`` with ``reason``.
        """
        if self._closed is None:
            self._closed = reason
        self._engine.stop(reason, cancel=True)

    async def start(self) -> None:
        """Start the run, if it has not started; `__aenter__` calls this."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._engine.run())
        self._task.add_done_callback(lambda _: self._wake_idle())
        log.debug("priority queue of run %s started", self._engine.run_id)

    async def join(self) -> Report:
        """Wait until every item put has its outcome; return the report.

        Items put while this waits are waited for too. The queue stays
        open, and the report goes on counting items put later.

        Raises:
            RunAbortedError: The run could not go on (the journal failed,
                or ``on_outcome`` raised).
        """
        await self.start()
        assert self._task is not None
        while self._unfinished and not self._task.done():
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter
        if self._task.done():
            return await self._finish()
        return self.report

    async def aclose(self) -> Report:
        """Close the queue, wait for every outcome, and return the report.

        Raises:
            RunAbortedError: The run could not go on.
        """
        self.close()
        await self.start()
        return await self._finish()

    async def __aenter__(self) -> PriorityQueue:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            await self.aclose()
            return
        self.cancel(f"the queue's block raised {type(error).__name__}")
        # The block's exception propagates; an error of the run would hide it.
        with contextlib.suppress(Exception):
            await self._finish()

    async def _finish(self) -> Report:
        task = self._task
        assert task is not None
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            self.cancel("the task waiting for the priority queue was cancelled")
            await asyncio.wait([task])
            raise
        # Whatever is still queued if the run failed before it closed its
        # source, then items read by the engine but never started.
        self._reading_ended()
        leftovers = [item for items in self._handed.values() for item in items]
        self._handed.clear()
        self._cancel_items(leftovers)
        return task.result()

    # -- the engine's side -----------------------------------------------

    async def _next_item(self) -> Any:
        """Return the next item for the engine, waiting while the queue is empty."""
        while self._reading:
            if self._heap:
                item = self._heap.pop()
                self._handed[id(item)].append(item)
                self._wake_one_putter()
                return item
            if self._closed is not None:
                break
            self._item_waiter = asyncio.get_running_loop().create_future()
            await self._item_waiter
        raise StopAsyncIteration

    def _backlog(self) -> int:
        """Return 1 while workers should wait for a put rather than read, else 0.

        The engine's output limit is 1, so 1 pauses admission. A paused
        worker wakes for a retry whose backoff ended. A worker reading from an
        empty queue would not, because it waits inside the read.
        """
        if self._heap or self._closed is not None or not self._reading:
            return 0
        engine = self._engine
        # Items read and neither final, executing nor backing off wait for a
        # worker in the engine's ready buffer, so workers must go on.
        # NOTE: an item parked by an open circuit breaker or by the result
        # cache counts as waiting too. A worker may then block in
        # `_next_item`, and when that item comes back it waits for the next
        # put or close().
        waiting = (
            engine.read_count - engine.report.total - engine.in_flight - engine.retrying
        )
        return 0 if waiting > 0 else 1

    def _delivered(self, outcome: Outcome) -> None:
        handed = self._handed.get(id(outcome.item))
        if handed:
            handed.pop()
            if not handed:
                del self._handed[id(outcome.item)]
        self._finished_one()
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(outcome)
        except Exception as error:
            # The engine stops the run and names the item; this names the hook.
            raise RuntimeError(f"on_outcome raised {error!r}") from error

    def _engine_stopped(self, reason: str) -> None:
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._reading = False
        if self._closed is None:
            self._closed = reason
        self._wake_all()

    def _reading_ended(self) -> None:
        """Cancel the items the engine will never read."""
        self._reading = False
        if self._closed is None:
            self._closed = "the run ended"
        self._wake_all()
        leftovers = self._heap.pop_all()
        if leftovers:
            log.info(
                "priority queue of run %s: %d queued items cancelled: %s",
                self._engine.run_id,
                len(leftovers),
                self._stop_reason or self._closed,
            )
        self._cancel_items(leftovers)

    def _cancel_items(self, items: list[Any]) -> None:
        """Give each item a ``cancelled`` outcome, as the engine does."""
        engine = self._engine
        report = engine.report
        reason = self._stop_reason or self._closed or "the run ended"
        if self._next_seq is None:
            self._next_seq = engine.read_count
        for item in items:
            outcome = Outcome(
                self._next_seq, self._key_of(item), item, State.CANCELLED, reason=reason
            )
            self._next_seq += 1
            report.counts[State.CANCELLED.value] += 1
            if engine.settings.collect:
                report.collected.append(outcome)
            for observer in engine.observers:
                observer.on_outcome(outcome)
            self._finished_one()
            self._call_hook(outcome)

    def _key_of(self, item: Any) -> str | None:
        function = self._engine.settings.key
        if function is None:
            return None  # computed from the content when read
        try:
            return str(function(item))
        except Exception:
            return None

    def _call_hook(self, outcome: Outcome) -> None:
        """Call ``on_outcome`` after the run ended, where no caller sees errors."""
        if self._on_outcome is None or self._hook_failed:
            return
        try:
            self._on_outcome(outcome)
        except Exception:
            self._hook_failed = True
            log.exception(
                "priority queue of run %s: on_outcome raised for item %s; "
                "it is not called for the remaining cancelled items",
                self._engine.run_id,
                outcome.key,
            )

    def _finished_one(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._wake_idle()

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            _set_result(waiter)

    def _wake_one_putter(self) -> None:
        while self._put_waiters:
            waiter = self._put_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        _set_result(self._item_waiter)
        while self._put_waiters:
            _set_result(self._put_waiters.popleft())
        self._engine.output_taken()


class SyncPriorityQueue:
    """`PriorityQueue` for threads: ``put`` from any thread.

    The run goes on a helper thread with its own event loop. Leaving the
    ``with`` block normally closes the queue and waits for every outcome.
    Leaving it with an exception, or a `KeyboardInterrupt` while it waits,
    cancels what runs and what is queued::

        with SyncPriorityQueue(resize, backend="thread", concurrency=4) as queue:
            for path in paths:
                queue.put(path, priority=size_of(path))
        print(queue.report.counts)

    Takes the same options as `PriorityQueue`. ``on_outcome`` is called on
    the helper thread.

    Raises:
        ConfigurationError: An option or the task is invalid; nothing ran.
        JournalError: The journal cannot be used; nothing ran.
    """

    def __init__(self, task: Any, **options: Any) -> None:
        self._queue = PriorityQueue(task, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Held while a call is scheduled on the loop, so that no call is
        # scheduled after `shutdown` began stopping the loop.
        self._lock = threading.Lock()
        self._shut_down = False

    def __repr__(self) -> str:
        return f"<SyncPriorityQueue of {self._queue!r}>"

    @property
    def report(self) -> Report:
        """The run's report; final once `shutdown` has returned."""
        return self._queue.report

    def statistics(self) -> QueueStatistics:
        """Return the queue's counts at this moment."""
        return self._queue.statistics()

    def start(self) -> None:
        """Start the helper thread and the run, if they have not started."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> asyncio.AbstractEventLoop:
        if self._shut_down:
            raise QueueClosedError("shutdown() was called")
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="batchtools-priority-queue", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            asyncio.run_coroutine_threadsafe(self._queue.start(), loop).result()
        return self._loop

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        with self._lock:
            loop = self._start_locked()
            future = asyncio.run_coroutine_threadsafe(make(), loop)
        return future.result()

    def put(self, item: Any, priority: float = DEFAULT_PRIORITY) -> None:
        """Queue ``item``, waiting while ``maxsize`` items are waiting.

        Safe to call from any thread. Called from ``on_outcome`` (on the
        helper thread), it cannot wait, so it raises `asyncio.QueueFull`
        when the queue is full.

        Raises:
            QueueClosedError: The queue accepts no more items.
            ConfigurationError: ``priority`` is not a number, or is NaN.
        """
        if threading.current_thread() is self._thread:
            self._queue.put_nowait(item, priority)
            return
        self._run(lambda: self._queue.put(item, priority))

    def close(self) -> None:
        """Stop accepting items; the items put so far still run."""
        self._run(lambda: _call(self._queue.close))

    def cancel(self, reason: str = "the priority queue was cancelled") -> None:
        """Stop accepting items and cancel the queued and running ones."""
        self._run(lambda: _call(self._queue.cancel, reason))

    def join(self) -> Report:
        """Wait until every item put has its outcome; see `PriorityQueue.join`."""
        return self._run(self._queue.join)

    def shutdown(self, *, cancel: bool = False) -> Report:
        """Close the queue, wait for every outcome, and stop the helper thread.

        Args:
            cancel: Cancel the queued and running items instead of waiting.

        Raises:
            RunAbortedError: The run could not go on.
        """
        with self._lock:
            if self._shut_down:
                return self.report
            loop = self._start_locked()
            self._shut_down = True
            if cancel:
                loop.call_soon_threadsafe(self._queue.cancel)
            future = asyncio.run_coroutine_threadsafe(self._queue.aclose(), loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            loop.call_soon_threadsafe(
                self._queue.cancel, "interrupted by KeyboardInterrupt"
            )
            with contextlib.suppress(Exception):
                future.result()
            raise
        finally:
            self._stop_loop(loop)

    def _stop_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        # `loop.close` would not wait for the threads of `asyncio.to_thread`.
        asyncio.run_coroutine_threadsafe(
            loop.shutdown_default_executor(), loop
        ).result()
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join()
        loop.close()

    def __enter__(self) -> SyncPriorityQueue:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.shutdown()
            return
        with contextlib.suppress(Exception):
            self.shutdown(cancel=True)


async def _call(function: Callable[..., Any], *args: Any) -> None:
    function(*args)
