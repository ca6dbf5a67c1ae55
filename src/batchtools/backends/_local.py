"""Backends that execute Python tasks in this process: async and thread.

The thread backend is written here rather than on `ThreadPoolExecutor`
because the engine needs what the executor hides: a result path that wakes
the event loop once per burst of results instead of once per item, and a
way to give up on an attempt whose thread cannot be stopped while that
thread keeps its slot until it really returns.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Any

from batchtools.backends._base import Backend, BackendStatistics, Call, TaskSpec


class AsyncBackend(Backend):
    """Awaits coroutine tasks on the engine's own event loop."""

    name = "async"

    def __init__(self, task: TaskSpec, concurrency: int) -> None:
        super().__init__(concurrency)
        self._task = task

    async def execute(self, call: Call) -> Any:
        current = asyncio.current_task()
        call.handle = current
        function = self._task.function
        try:
            if self._task.wants_context:
                return await function(call.payload, context=call.context)
            return await function(call.payload)
        except asyncio.CancelledError:
            if call.cancel_error is None or current is None:
                raise
            current.uncancel()
            raise call.cancel_error from None
        finally:
            call.handle = None

    def cancel(self, call: Call, error: BaseException) -> None:
        call.cancel_error = error
        if call.context.cancelled is not None:
            call.context.cancelled.set()
        if isinstance(call.handle, asyncio.Task):
            call.handle.cancel()

    async def aclose(self, *, cancel: bool) -> None:
        return None


_STOP = object()


class ThreadBackend(Backend):
    """Runs sync tasks on a fixed set of threads fed from one queue."""

    name = "thread"

    def __init__(self, task: TaskSpec, concurrency: int) -> None:
        super().__init__(concurrency)
        self._task = task
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque()
        )
        self._wakeup_pending = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._abandoned: set[Call] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for number in range(self.concurrency):
            thread = threading.Thread(
                target=self._work, name=f"batchtools-thread-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    async def execute(self, call: Call) -> Any:
        assert self._loop is not None, "start() must be called before execute()"
        future: asyncio.Future[Any] = self._loop.create_future()
        call.handle = future
        call.context.cancelled = threading.Event()
        self._inbox.put((call, future))
        try:
            return await future
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if call.cancel_error is None or current is None:
                raise
            current.uncancel()
            raise call.cancel_error from None

    def cancel(self, call: Call, error: BaseException) -> None:
        call.cancel_error = error
        if call.context.cancelled is not None:
            call.context.cancelled.set()
        future = call.handle
        if isinstance(future, asyncio.Future) and not future.done():
            with self._lock:
                self._abandoned.add(call)
            future.set_exception(error)

    async def aclose(self, *, cancel: bool) -> None:
        for _ in self._threads:
            self._inbox.put(_STOP)
        if cancel:
            # Threads cannot be killed; daemon threads still running an
            # abandoned attempt are left to finish on their own.
            return
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    def statistics(self) -> BackendStatistics:
        with self._lock:
            abandoned = len(self._abandoned)
        return BackendStatistics(
            workers_started=len(self._threads), abandoned_threads=abandoned
        )

    def _work(self) -> None:
        function = self._task.function
        wants_context = self._task.wants_context
        while True:
            entry = self._inbox.get()
            if entry is _STOP:
                return
            call, future = entry
            if call.cancel_error is not None:
                continue
            try:
                if wants_context:
                    value = function(call.payload, context=call.context)
                else:
                    value = function(call.payload)
            except BaseException as error:  # noqa: BLE001 - handed to the engine
                self._deliver(call, future, False, error)
            else:
                self._deliver(call, future, True, value)

    def _deliver(
        self, call: Call, future: asyncio.Future[Any], ok: bool, value: Any
    ) -> None:
        with self._lock:
            self._abandoned.discard(call)
            self._done.append((future, ok, value))
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # The loop has closed; nobody waits for this result.

    def _settle(self) -> None:
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._wakeup_pending = False
        for future, ok, value in done:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
