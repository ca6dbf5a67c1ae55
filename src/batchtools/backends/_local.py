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
import inspect
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from batchtools._exceptions import ConfigurationError
from batchtools.backends._base import Backend, BackendStatistics, Call, TaskSpec

log = logging.getLogger("batchtools.backends")


def setup_failed(
    task: TaskSpec, where: str, error: BaseException
) -> ConfigurationError:
    """Return the error for a worker whose setup function raised ``error``."""
    setup = task.setup
    name = getattr(setup, "__qualname__", repr(setup))
    failure = ConfigurationError(
        f"the setup function {name} of task {task.name} failed in {where} "
        f"({type(error).__name__}: {error}); no attempt ran there. Fix the setup "
        "function or what it connects to, then run again"
    )
    failure.__cause__ = error
    return failure


def run_teardown(task: TaskSpec, state: Any, where: str) -> None:
    """Call the task's teardown function with ``state``; log what it raises."""
    if task.teardown is None:
        return
    try:
        task.teardown(state)
    except Exception:
        log.exception("the teardown function of task %s failed in %s", task.name, where)


class AsyncBackend(Backend):
    """Awaits coroutine tasks on the engine's own event loop."""

    name = "async"

    def __init__(self, task: TaskSpec, concurrency: int) -> None:
        super().__init__(concurrency)
        self._task = task
        self._state: Any = None
        self._teardown: asyncio.Task[Any] | None = None
        self._given_up = False

    async def start(self) -> None:
        # One event loop is one worker: the setup runs once for the run, and
        # every coroutine shares its state (a pool of connections, say).
        setup = self._task.setup
        if setup is None:
            return
        try:
            state = setup()
            if inspect.isawaitable(state):
                state = await state
        except Exception as error:
            raise setup_failed(self._task, "the event loop", error) from error
        self._state = state

    def direct_function(self) -> Callable[[Any], Awaitable[Any]] | None:
        if self._task.wants_context or self._task.has_worker_state:
            return None
        return self._task.function

    async def execute(self, call: Call) -> Any:
        function = self._task.function
        try:
            if self._task.wants_context:
                context = call.context
                context.state = self._state
                return await function(call.payload, context=context)
            return await function(call.payload)
        except asyncio.CancelledError:
            owner = call.owner
            if call.cancel_error is None or owner is None:
                raise
            owner.uncancel()
            raise call.cancel_error from None

    def cancel(self, call: Call, error: BaseException) -> None:
        # The attempt runs inside the engine's worker task, so cancelling
        # that task interrupts the coroutine where it waits.
        call.cancel_error = error
        if call.owner is not None:
            call.owner.cancel()

    async def aclose(self, *, cancel: bool) -> None:
        teardown = self._task.teardown
        if teardown is None or self._given_up:
            return
        self._teardown = asyncio.ensure_future(_await_teardown(teardown, self._state))
        try:
            await self._teardown
        except asyncio.CancelledError:
            if not self._given_up:
                raise
            log.warning(
                "gave up waiting for the teardown function of task %s",
                self._task.name,
            )
        except Exception:
            log.exception("the teardown function of task %s failed", self._task.name)

    def terminate(self) -> None:
        self._given_up = True
        if self._teardown is not None:
            self._teardown.cancel()


_STOP = object()


class ThreadBackend(Backend):
    """Runs sync tasks on a fixed set of threads fed from one queue."""

    name = "thread"

    def __init__(
        self, task: TaskSpec, concurrency: int, *, queue_ahead: bool = True
    ) -> None:
        super().__init__(concurrency)
        self._task = task
        self.queue_ahead = queue_ahead
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque()
        )
        self._wakeup_pending = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._abandoned: set[Call] = set()
        # The call each thread is executing, so that `aclose` can tell the
        # threads stuck in an abandoned attempt from those about to exit.
        self._executing: dict[threading.Thread, Call] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_error: BaseException | None = None
        self._setup_errors: list[ConfigurationError] = []
        self._setups_pending = 0
        # Threads inside their setup function, which a closing run leaves.
        self._in_setup: set[threading.Thread] = set()
        # Resolved once every thread's setup function has returned.
        self._set_up: asyncio.Future[None] | None = None
        # Resolved when a thread ends, so that closing waits on the loop
        # rather than on a blocking join.
        self._ended: dict[threading.Thread, asyncio.Future[None]] = {}
        # Resolved by `terminate`: stop waiting for threads.
        self._given_up: asyncio.Future[None] | None = None

    @property
    def capacity(self) -> int:
        # Attempts queued ahead keep the threads busy between wakeups of the
        # event loop; the threads themselves still bound what executes.
        return self.concurrency * (4 if self.queue_ahead else 1)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._given_up = loop.create_future()
        self._set_up = loop.create_future()
        self._setups_pending = self.concurrency if self._task.setup else 0
        for number in range(self.concurrency):
            thread = threading.Thread(
                target=self._work,
                args=(number + 1,),
                name=f"batchtools-thread-{number}",
                daemon=True,
            )
            self._ended[thread] = loop.create_future()
            thread.start()
            self._threads.append(thread)
        if self._task.setup is None:
            return
        # Each thread sets up its own state (a connection made in a thread
        # may belong to it), and the run starts once every one succeeded.
        await self._set_up
        if self._setup_errors:
            await self.aclose(cancel=True)
            raise self._setup_errors[0]

    def terminate(self) -> None:
        # Threads cannot be killed: stop waiting for them. They are daemon
        # threads, so they end with the process.
        if self._given_up is not None and not self._given_up.done():
            self._given_up.set_result(None)

    async def execute(self, call: Call) -> Any:
        assert self._loop is not None, "start() must be called before execute()"
        future: asyncio.Future[Any] = self._loop.create_future()
        call.handle = future
        if self._task.wants_context:
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
        future = call.handle
        with self._lock:
            call.cancel_error = error
            if isinstance(future, asyncio.Future) and not future.done():
                self._abandoned.add(call)
        if self._task.wants_context and call.context.cancelled is not None:
            call.context.cancelled.set()
        if isinstance(future, asyncio.Future) and not future.done():
            future.set_exception(error)

    def stop_queued(self, error: BaseException) -> None:
        self._stop_error = error

    async def aclose(self, *, cancel: bool) -> None:
        for _ in self._threads:
            self._inbox.put(_STOP)
        with self._lock:
            stuck = {
                thread
                for thread, call in self._executing.items()
                if call in self._abandoned
            }
            # A run stopped while its workers set up does not wait for them.
            stuck |= self._in_setup
        # Threads cannot be killed. A thread that runs an abandoned attempt
        # (timed out or cancelled) may never return, so the run ends without
        # it and the report counts it. The other threads are waited for,
        # until `terminate` gives up on them too.
        waits = [self._ended[thread] for thread in self._threads if thread not in stuck]
        if waits and self._given_up is not None:
            ending: asyncio.Future[Any] = asyncio.gather(*waits)
            given_up: asyncio.Future[Any] = self._given_up
            await asyncio.wait([ending, given_up], return_when=asyncio.FIRST_COMPLETED)
            if not ending.done():
                ending.cancel()
                log.warning(
                    "gave up waiting for %d threads of task %s that did not end "
                    "(in a setup, teardown or attempt that does not return)",
                    sum(1 for wait in waits if not wait.done()),
                    self._task.name,
                )

    def statistics(self) -> BackendStatistics:
        with self._lock:
            abandoned = len(self._abandoned)
        return BackendStatistics(
            workers_started=len(self._threads), abandoned_threads=abandoned
        )

    def _work(self, slot: int) -> None:
        me = threading.current_thread()
        try:
            self._serve(me, slot)
        finally:
            self._call_on_loop(_resolve, self._ended[me])

    def _serve(self, me: threading.Thread, slot: int) -> None:
        function = self._task.function
        wants_context = self._task.wants_context
        state = None
        if self._task.setup is not None:
            with self._lock:
                self._in_setup.add(me)
            try:
                state = self._task.setup()
            except BaseException as error:
                # Even SystemExit: the run must learn that this thread is done.
                with self._lock:
                    self._setup_errors.append(
                        setup_failed(self._task, f"thread {me.name}", error)
                    )
                self._call_on_loop(self._one_set_up)
                return
            finally:
                with self._lock:
                    self._in_setup.discard(me)
            self._call_on_loop(self._one_set_up)
        while True:
            entry = self._inbox.get()
            if entry is _STOP:
                run_teardown(self._task, state, f"thread {me.name}")
                return
            call, future = entry
            if self._stop_error is not None and call.cancel_error is None:
                self._deliver(call, future, False, self._stop_error)
                continue
            with self._lock:
                # Checked under the lock that `cancel` takes. A call cancelled
                # before it started is skipped and not counted as abandoned,
                # and `aclose` treats a call cancelled later as still executing.
                if call.cancel_error is not None:
                    self._abandoned.discard(call)
                    continue
                self._executing[me] = call
            call.slot = slot
            call.started = time.time()
            try:
                if wants_context:
                    context = call.context
                    context.state = state
                    value = function(call.payload, context=context)
                else:
                    value = function(call.payload)
            except BaseException as error:
                self._deliver(call, future, False, error)
            else:
                self._deliver(call, future, True, value)

    def _one_set_up(self) -> None:
        self._setups_pending -= 1
        if self._setups_pending == 0 and self._set_up is not None:
            _resolve(self._set_up)

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # The loop has closed, so no caller waits any more.

    def _deliver(
        self, call: Call, future: asyncio.Future[Any], ok: bool, value: Any
    ) -> None:
        with self._lock:
            self._executing.pop(threading.current_thread(), None)
            self._abandoned.discard(call)
            self._done.append((future, ok, value))
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # The loop has closed, so no caller waits for this result.

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _await_teardown(teardown: Callable[[Any], Any], state: Any) -> None:
    done = teardown(state)
    if inspect.isawaitable(done):
        await done
