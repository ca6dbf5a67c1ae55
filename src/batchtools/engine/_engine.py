"""The scheduler: reads items, admits them under the limits, runs attempts.

Data flow::

    Feed --blocks--> [journal register] --> ready jobs
        --> worker coroutines (``backend.capacity`` of them)
            --> Backend.execute --> success / failure
                --> retry? park with a backoff timer, outside the slot
                --> outcome --> journal update, observers, output

One event loop runs all of it; nothing here blocks. Each worker coroutine
takes the next job (a retry whose backoff has ended first, then new items)
and awaits one attempt at a time, so the number of worker coroutines is
the bound on work handed to the backend. Timeouts are enforced by one
sweeper over a heap of deadlines, not a timer per attempt.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from batchtools import _codec
from batchtools._exceptions import (
    AttemptTimeoutError,
    BatchtoolsError,
    CacheError,
    CircuitOpenError,
    CommandFailedError,
    JournalError,
    RemoteError,
    RunAbortedError,
    WorkerLostError,
)
from batchtools.backends._base import Backend, Call, Context, results_per_item
from batchtools.engine._feed import Feed
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import (
    Attempt,
    Outcome,
    Report,
    State,
    format_error,
)
from batchtools.journal import ItemRow, Journal
from batchtools.policy.cache import ResultCache
from batchtools.policy.circuit_breaker import Breakers, BreakerState
from batchtools.policy.concurrency import ConcurrencyLimiter
from batchtools.policy.fallback import FallbackValue
from batchtools.policy.memory import MemoryGate
from batchtools.policy.rate_limit import RateLimiter
from batchtools.policy.retry import NO_RETRY, Retry

if TYPE_CHECKING:
    from batchtools.secrets import Redactor, SecretStore

log = logging.getLogger("batchtools.engine")
retry_log = logging.getLogger("batchtools.retry")
# One INFO line at the start and at the end of every attempt; off by default.
attempt_log = logging.getLogger("batchtools.attempts")
# The CLI shows these by default, unlike the engine's routine messages.
memory_log = logging.getLogger("batchtools.memory")
cache_log = logging.getLogger("batchtools.cache")

_WAIT_RECHECK = 0.1
"""Maximum seconds between two checks of an attempt whose timeout expired while
it still waited for a worker."""

VALUE_LIMIT = 64 * 1024
# Enum members hash in Python code; their ids hash in C.
_COUNT_NAMES = {id(state): state.value for state in State}
_PARKED_LIMIT = 4096
_JOURNAL_LAG = 50_000


class Observer(Protocol):
    """Receives the engine's events; every method must return quickly."""

    def on_start(self, engine: Engine) -> None:
        """Receive the start of the run."""

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        """Receive a failed attempt whose item retries after ``delay`` seconds."""

    def on_outcome(self, outcome: Outcome) -> None:
        """Receive an item's final outcome."""

    def on_finish(self, report: Report) -> None:
        """Receive the report at the end of the run."""


class Interrupted(BatchtoolsError):
    """The attempt was stopped because the run was interrupted or halted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(slots=True)
class Settings:
    """Settings of how the engine schedules attempts.

    Attributes:
        retry: The retry policy.
        timeout: Seconds an attempt may run, or ``None``.
        batch_size: Items per task call; 1 hands over single items.
        halt: When to stop early because of failures.
        ordered: Emit outcomes in input order.
        collect: Keep every outcome in the report.
        key: A function from item to key text, instead of the content hash.
        rate_limiter: Limits how often attempts start; an attempt waits for
            it in its slot, so retries count too.
        breakers: Circuit breakers; an item whose circuit is open waits
            outside any slot, or fails at once with ``fail_fast``.
        deadline: Seconds after which the run stops: nothing new starts,
            and attempts in flight are cancelled.
        memory_gate: Pauses admission while available memory is low; an
            item waits for it in its slot, like for the rate limit.
        concurrency_limiter: An adaptive limit below the backend's
            concurrency; an item waits for a slot of it before it starts.
        lock_key: A function from item to a key; items with equal keys never
            run at once, and the others wait outside any slot.
        read_ahead: How many admitted items may wait for a worker; ``None``
            lets the engine choose (at least one block). Zero reads the next
            item only when a worker is free, so that a source which orders
            its items late (a priority queue) decides what runs next.
        cache: Values of earlier calls by item key; a hit succeeds without
            running, and items with the key of an item in flight wait for
            it outside any slot.
        store_value: Turns a value into the JSON text kept in the journal,
            or ``None`` to keep none.
        secrets: The run's secrets: contexts carry them, and their values
            are redacted from the journal, failure causes and messages.
        run_id: The run's id; new runs get a random one.
    """

    retry: Retry = NO_RETRY
    timeout: float | None = None
    batch_size: int = 1
    halt: Halt | None = None
    ordered: bool = False
    collect: bool = False
    key: Callable[[Any], str] | None = None
    store_value: Callable[[Any], str | None] | None = None
    rate_limiter: RateLimiter | None = None
    breakers: Breakers | None = None
    deadline: float | None = None
    memory_gate: MemoryGate | None = None
    concurrency_limiter: ConcurrencyLimiter | None = None
    cache: ResultCache | None = None
    read_ahead: int | None = None
    lock_key: Callable[[Any], Any] | None = None
    secrets: SecretStore | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


@dataclass(slots=True, eq=False)
class _Job:
    """One item (or one batch of items) on its way through the engine."""

    index: int
    seq: int
    key: str | None
    item: Any
    attempt: int = 0
    lost_workers: int = 0
    first_started: float | None = None
    attempts: list[Attempt] | None = None
    members: list[_Job] | None = None
    running_recorded: int = 0
    circuit_generation: int | None = None
    cache_key: str | None = None
    cache_leader: bool = False  # runs the task for items waiting on its key
    lock: Any = None  # the lock key, with Settings.lock_key
    holds_key: bool = False
    slot: int = 0  # the job slot of the last attempt
    worker: str | None = None  # the process of the last attempt, if known


@dataclass(frozen=True, slots=True)
class AttemptInFlight:
    """An attempt handed to the backend that has not returned yet.

    Attributes:
        key: The item's key (for a batch, the first item's key).
        attempt: The attempt number, from 1.
        started: When it began, in seconds since the epoch: when a thread
            took it on the thread backend, and when the engine handed it
            over on the others. With chunks queued ahead of workers (the
            process and Dask backends), an attempt may wait at a worker
            before it executes, and that wait counts, as it does for its
            timeout.
        slot: The job slot, from 1.
        worker: The executing process as ``pid N``, a Dask worker's address,
            or ``None``.
    """

    key: str
    attempt: int
    started: float
    slot: int
    worker: str | None


def store_json(value: Any) -> str | None:
    """Return ``value`` as JSON text if it is JSON data of at most 64 KiB."""
    if value is None:
        return "null"
    try:
        text = _storable(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError):
        return None
    return text if len(text) <= VALUE_LIMIT else None


def error_json(error: BaseException, redactor: Redactor | None = None) -> str:
    """Return the journal's JSON record of an error, with secrets redacted."""
    record: dict[str, Any] = {
        "type": (
            error.type_name
            if isinstance(error, RemoteError)
            else f"{type(error).__module__}.{type(error).__qualname__}"
        ),
        "message": str(error.message if isinstance(error, RemoteError) else error),
        "traceback": format_error(error)[-16000:],
    }
    if isinstance(error, CommandFailedError | WorkerLostError):
        record["exit_status"] = error.exit_status
    if isinstance(error, CommandFailedError) and error.stderr_tail:
        record["stderr_tail"] = error.stderr_tail.decode("utf-8", "replace")
    if isinstance(error, AttemptTimeoutError):
        record["timeout"] = error.timeout
    if redactor:
        record = redactor.redact_data(record)
    return _storable(json.dumps(record, ensure_ascii=False))


def _storable(text: str) -> str:
    """Return JSON ``text`` in a form SQLite can store as UTF-8.

    Text from undecodable bytes (an item's invalid UTF-8, kept as lone
    surrogates) cannot be encoded; JSON's escapes carry it instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(json.loads(text), ensure_ascii=True, allow_nan=False)
    return text


def error_from_json(text: str | None) -> BaseException | None:
    """Rebuild an error recorded by `error_json`, as faithfully as it can."""
    if not text:
        return None
    record = json.loads(text)
    type_name = record.get("type", "")
    if type_name.endswith(".CommandFailedError"):
        tail = record.get("stderr_tail", "").encode()
        return CommandFailedError(record.get("exit_status", 1), tail)
    if type_name.endswith(".WorkerLostError"):
        return WorkerLostError(record.get("exit_status"))
    if type_name.endswith(".AttemptTimeoutError"):
        return AttemptTimeoutError(record.get("timeout", 0.0))
    short = type_name.rsplit(".", 1)[-1]
    if type_name.startswith("builtins."):
        type_name = short
    return RemoteError(
        type_name, record.get("message", ""), record.get("traceback", "")
    )


class Engine:
    """Runs one task over a source of items; see the module docstring."""

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        backend: Backend,
        settings: Settings,
        *,
        journal: Journal | None = None,
        observers: Sequence[Observer] = (),
        rerun_states: frozenset[str] = frozenset(
            {"pending", "running", "retrying", "cancelled"}
        ),
        journal_rows: Iterable[ItemRow] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.journal = journal
        self.observers = list(observers)
        # An observer with ``wants_attempts`` (latency metrics) gets every
        # attempt in its outcomes, even a first success, which costs a record.
        self._observers_need_attempts = any(
            getattr(observer, "wants_attempts", False) for observer in self.observers
        )
        self.report = Report(run_id=journal.run.run_id if journal else settings.run_id)
        if journal is not None:
            self.report.journal = str(journal.path)
        self.run_id = self.report.run_id
        secrets = settings.secrets
        self._redactor = secrets.redactor if secrets is not None else None
        if self._redactor is not None:
            self.report.failures.redact = self._redactor.redact
            if settings.cache is not None:
                redact = self._redactor.redact
                settings.cache.holds_secret = lambda text: redact(text) != text
        self._rerun_states = rerun_states
        self._journal_rows = journal_rows
        self._feed = Feed(journal_rows if journal_rows is not None else source)
        self._ready: collections.deque[_Job] = collections.deque()
        self._retry_ready: collections.deque[_Job] = collections.deque()
        self._parked = 0
        self._index = itertools.count()
        self._refill: asyncio.Future[None] | None = None
        self._fill_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._active: dict[Call, _Job] = {}
        self._stopping: str | None = None
        self._cancelling = False
        self._aborted: BaseException | None = None
        # Resolved by the first stop; waits that a stop must end watch it.
        self._stopped: asyncio.Future[None] | None = None
        # Set when the run starts, so that a run without -v pays one test
        # per attempt for the attempt log.
        self._log_attempts = False
        self._abort_message: str | None = None
        self._rng = random.Random()
        self._timeouts: list[tuple[float, int, Call]] = []
        self._timeout_counter = itertools.count()
        self._sweeper_wake: asyncio.Future[None] | None = None
        self._output: Callable[[Outcome], Any] | None = None
        self._keep: Callable[[Outcome], Any] | None = None
        self._backlog: Callable[[], int] | None = None
        self._backlog_limit = 0
        self._waiting_commit: collections.deque[tuple[int, Outcome]] = (
            collections.deque()
        )
        self._reorder: dict[int, Outcome | None] = {}
        self._next_index = 0
        self.read_count = 0
        self.input_total: int | None = None
        self.retrying = 0
        self._waiting_for_circuit = 0
        self._pauses_logged = 0
        # The keyed lock and shared store that contexts carry, made when the
        # first context is.
        self._resources: str | None = None
        self._key_waiters: dict[Any, collections.deque[_Job]] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = (
            collections.deque()
        )
        self._cache_error_logged = False
        self._resumes_logged = 0
        # Sources that must be awaited, and journal registration, are read a
        # block ahead; an in-memory source without a journal is read inline.
        self._prefetch = not (
            self._feed.never_blocks and journal is None and journal_rows is None
        )
        # A coroutine task without a context is awaited right here, which
        # saves a frame per attempt. The async backend's cancel still works
        # because it cancels this worker task.
        self._direct = backend.direct_function()
        self._low_water = (
            max(backend.capacity, _block_size(settings.batch_size) // 2)
            if settings.read_ahead is None
            else settings.read_ahead
        )

    # -- public control --------------------------------------------------

    def set_output(
        self,
        output: Callable[[Outcome], Any],
        backlog: Callable[[], int] | None = None,
        limit: int = 0,
        *,
        keep: Callable[[Outcome], Any] | None = None,
    ) -> None:
        """Send each outcome to ``output`` once it is final and committed.

        Args:
            output: Receives outcomes on the event loop.
            backlog: Returns how many outcomes the consumer has not taken.
            limit: Admission pauses while the backlog is at this size; the
                consumer calls `output_taken` to let it go on.
            keep: Receives each outcome as soon as it is final, before the
                journal commits it, to store what must not be lost when the
                process dies between the commit and ``output``. A resume
                runs an uncommitted item again, so ``keep`` must replace
                what an earlier call stored.
        """
        self._output = output
        self._keep = keep
        self._backlog = backlog
        self._backlog_limit = limit

    def output_taken(self) -> None:
        """Tell the engine that the consumer took outcomes from its backlog."""
        self._wake_all()

    def stop(self, reason: str = "interrupted", *, cancel: bool = False) -> None:
        """Stop admission; with ``cancel``, also stop attempts in flight.

        Items not yet read are left for a resume; items waiting out a
        backoff and (with ``cancel``) attempts in flight end ``cancelled``.
        """
        if self._stopping is None:
            self._stopping = reason
            log.info("run %s stopping: %s", self.run_id, reason)
            self.backend.stop_queued(Interrupted(reason))
            self._wake_all()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        if cancel and not self._cancelling:
            self._cancelling = True
            for call in list(self._active):
                self.backend.cancel(call, Interrupted(reason))

    def terminate(self, reason: str = "interrupted") -> None:
        """Stop at once: cancel what runs and give up on workers that hang.

        Worker processes are killed, even in their setup or teardown, and
        threads that do not end are left behind. For a second interrupt.
        """
        self.stop(reason, cancel=True)
        self.backend.terminate()

    def suspend(self) -> None:
        """Stop the run's processes and this one until SIGCONT (Ctrl-Z).

        The processes executing attempts are stopped first, then this
        process. When it is continued, they are continued, and every
        attempt's timeout is moved by the time spent stopped, so that a
        pause never counts against an attempt.
        """
        before = time.monotonic()
        self.backend.signal_workers(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)
        # Execution goes on here once SIGCONT arrives.
        paused = time.monotonic() - before
        self.backend.signal_workers(signal.SIGCONT)
        self.extend_timeouts(paused)
        log.info("run %s continued after %.1f s stopped", self.run_id, paused)

    def extend_timeouts(self, seconds: float) -> None:
        """Move the timeout of every attempt in flight ``seconds`` later.

        For a pause that must not count against attempts, such as a stop by
        Ctrl-Z or a debugger session. Call it on the event loop's thread.
        """
        self._timeouts[:] = [
            (deadline + seconds, order, call)
            for deadline, order, call in self._timeouts
        ]
        heapq.heapify(self._timeouts)

    @property
    def in_flight(self) -> int:
        """Attempts handed to the backend and not yet returned."""
        return len(self._active)

    def attempts_in_flight(
        self, started_before: float | None = None
    ) -> list[AttemptInFlight]:
        """Return the attempts in flight, optionally only those started before a time.

        A scan of the attempts in flight, for observers that check them now
        and then; it allocates only for the attempts it returns.

        Args:
            started_before: Seconds since the epoch; ``None`` returns all.
        """
        found = []
        for call, job in self._active.items():
            if started_before is not None and call.started >= started_before:
                continue
            key = job.key if job.key is not None else _lazy_key(job)
            found.append(
                AttemptInFlight(key, job.attempt, call.started, call.slot, call.worker)
            )
        return found

    # -- the run ---------------------------------------------------------

    async def run(self) -> Report:
        """Run until every item has its outcome or the run is stopped.

        Raises:
            RunAbortedError: The journal could not be written; what was
                committed is kept.
        """
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        if self._stopping is not None:
            self._stopped.set_result(None)
        report = self.report
        report.started = time.time()
        began = time.perf_counter()
        self._log_attempts = attempt_log.isEnabledFor(logging.INFO)
        if self.journal is not None:
            self.journal.start(loop, self._on_commit, self._on_journal_error)
        for observer in self.observers:
            observer.on_start(self)
        timed = self.settings.timeout or self.settings.retry.deadline_seconds
        sweeper = loop.create_task(self._sweep()) if timed else None
        run_deadline = None
        if self.settings.deadline is not None:
            run_deadline = loop.call_later(
                self.settings.deadline, self._deadline_passed
            )
        watchdog = loop.create_task(_watch_stalls())
        started = False
        try:
            # A stop while workers start (a setup that hangs) ends the start.
            starting = loop.create_task(self.backend.start())
            await asyncio.wait([starting, self._stopped], return_when=FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            started = not starting.cancelled()
            if started:
                starting.result()
                workers = [
                    loop.create_task(self._work(slot))
                    for slot in range(1, self.backend.capacity + 1)
                ]
                try:
                    await asyncio.gather(*workers)
                except BaseException:
                    self.stop("cancelled", cancel=True)
                    self._release_in_flight()
                    for task in workers:
                        task.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                    raise
        finally:
            watchdog.cancel()
            if run_deadline is not None:
                run_deadline.cancel()
            if sweeper is not None:
                sweeper.cancel()
            await self.backend.aclose(
                cancel=self._cancelling or self._aborted is not None or not started
            )
            await self._feed.aclose()
            await self._close_journal()
            stats = self.backend.statistics()
            report.abandoned_threads = stats.abandoned_threads
            report.workers_lost = stats.workers_lost
            report.workers_recycled = stats.workers_recycled
            report.memory_kills = stats.memory_kills
            gate = self.settings.memory_gate
            if gate is not None:
                report.memory_pauses = gate.pauses
                report.paused_seconds = gate.paused_time()
            if self.settings.cache is not None:
                cache = self.settings.cache
                if cache.policy.path is not None:
                    report.cache_unstorable = cache.unstorable
                cache.close()
            if self._resources is not None:
                _close_resources(self._resources)
            limiter = self.settings.concurrency_limiter
            if limiter is not None:
                start = limiter.history[0][0]
                report.concurrency_limits = [
                    (moment - start, limit) for moment, limit in limiter.history
                ]
            report.duration = time.perf_counter() - began
            report.interrupted = self._stopping is not None and report.halted is None
        self._drain_reorder(final=True)
        if self._aborted is not None:
            message = self._redact(self._abort_message or str(self._aborted))
            raise RunAbortedError(message) from self._aborted
        if self.settings.collect:
            report.collected.sort(key=lambda o: o.seq)
            report.unnumbered = self.journal is None
        for observer in self.observers:
            observer.on_finish(report)
        return report

    async def _close_journal(self) -> None:
        journal = self.journal
        if journal is None:
            return
        if journal.error is None:
            if self._feed.finished:
                journal.mark_input_complete()
            if self._stopping is not None and self.report.halted is None:
                journal.event("interrupted", {"reason": self._redact(self._stopping)})
                journal.set_state("interrupted")
            elif self.report.halted is not None and not self._feed.finished:
                # Items were never read: the run is not finished, and
                # `resume` runs them.
                journal.event("halted", {"reason": self._redact(self.report.halted)})
                journal.set_state("interrupted")
            else:
                journal.set_state("finished")
            await journal.aflush()
        await asyncio.to_thread(journal.close)
        if journal.error is not None and self._aborted is None:
            self._aborted = journal.error

    def _release_in_flight(self) -> None:
        """Put items in flight back to pending, for a run cancelled from outside."""
        if self.journal is None or self.journal.error is not None:
            return
        for job in self._active.values():
            for member in job.members or (job,):
                self.journal.update(member.seq, "pending", reason="interrupted")

    def _on_journal_error(self, error: JournalError) -> None:
        if self._aborted is None:
            self._aborted = error
        self.stop(f"the journal failed: {error}", cancel=True)

    # -- taking jobs -----------------------------------------------------

    async def _work(self, slot: int) -> None:
        owner = asyncio.current_task()
        ready = self._ready
        # Without retries waiting, prefetching, ordering or a consumer to
        # wait for, the next job is simply the next ready one, so take it
        # without the general path's checks.
        simple = not (self._prefetch or self.settings.ordered or self._backlog)
        attempt = (
            self._attempt if self.settings.lock_key is None else self._attempt_locked
        )
        while True:
            if simple and ready and not self._retry_ready and self._stopping is None:
                await attempt(ready.popleft(), owner, slot)
                continue
            job = await self._next_job()
            if job is None:
                return
            await attempt(job, owner, slot)

    async def _next_job(self) -> _Job | None:
        while True:
            if self._retry_ready:
                return self._retry_ready.popleft()
            if self._stopping is not None:
                return None
            if self._ready and not self._window_full():
                if (
                    self._prefetch
                    and len(self._ready) < self._low_water
                    and self._refill is None
                    and not self._feed.exhausted
                ):
                    # Read and register the next block while this one runs,
                    # so the journal's round trip is hidden.
                    self._start_fill()
                return self._ready.popleft()
            if self._ready:
                await self._wait()
                continue
            if self._feed.exhausted and not self._ready and self._refill is None:
                if self._parked == 0:
                    self._wake_all()
                    return None
                await self._wait()
            elif self._parked >= _PARKED_LIMIT or self._window_full():
                await self._wait()
            elif self._fill_now():
                continue
            else:
                if self._refill is None:
                    self._start_fill()
                assert self._refill is not None
                # A retry whose backoff ends while a slow source is read must
                # not wait for the next item: wake on either.
                if self._wakeup is None or self._wakeup.done():
                    self._wakeup = asyncio.get_running_loop().create_future()
                await asyncio.wait(
                    [self._refill, self._wakeup], return_when=FIRST_COMPLETED
                )

    def _window_full(self) -> bool:
        if self._backlog is not None and self._backlog() >= self._backlog_limit:
            return True
        journal = self.journal
        if journal is not None and journal.submitted - journal.committed > _JOURNAL_LAG:
            # The writer is behind: let it catch up before more items start,
            # so its queue stays bounded.
            return True
        if not self.settings.ordered or not self._ready:
            return False
        window = max(4 * self.backend.capacity, 1024)
        return self._ready[0].index >= self._next_index + window

    async def _wait(self) -> None:
        if self._wakeup is None or self._wakeup.done():
            self._wakeup = asyncio.get_running_loop().create_future()
        await self._wakeup

    def _wake_all(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        if self._stopping is not None:
            while self._slot_waiters:
                _set_result(self._slot_waiters.popleft())

    def _fill_now(self) -> bool:
        """Read the next block at once, where no await is needed."""
        if self._prefetch or self._refill is not None:
            return False
        try:
            block = self._feed.read_now(_block_size(self.settings.batch_size))
            self._queue_jobs([self._job(item) for item in block])
        except Exception as error:
            self._input_failed(error)
            return True
        self.read_count += len(block)
        return True

    def _input_failed(self, error: BaseException) -> None:
        """Stop the run because the input or the journal could not be read."""
        if isinstance(error, JournalError):
            log.error("%s", error)
            reason = f"the journal failed: {error}"
        else:
            log.error("reading item %d of the input failed: %r", self.read_count, error)
            reason = f"reading item {self.read_count} of the input failed: {error!r}"
        if self._aborted is None:
            self._aborted = error
            self._abort_message = reason
        self.stop(reason, cancel=True)

    def _start_fill(self) -> None:
        loop = asyncio.get_running_loop()
        self._refill = refill = loop.create_future()
        self._fill_task = loop.create_task(self._fill(refill))

    async def _fill(self, refill: asyncio.Future[None]) -> None:
        try:
            size = _block_size(self.settings.batch_size)
            if self.settings.read_ahead is not None:
                size = max(1, self.settings.read_ahead, self.settings.batch_size)
            elif self.journal is not None and not self.journal.fresh:
                # Each block of a resumed run costs a round trip to the
                # journal's thread; larger blocks make fewer of them.
                size *= 8
            block = await self._feed.read(size)
            if self._journal_rows is not None:
                rows: list[ItemRow] = block
                jobs = [self._job_from_row(row) for row in rows]
            elif self.journal is not None:
                jobs = await self._register(block)
            else:
                jobs = [self._job(item) for item in block]
            self.read_count += len(block)
            self._queue_jobs(jobs)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._input_failed(error)
        finally:
            self._refill = None
            refill.set_result(None)
            self._wake_all()

    def _queue_jobs(self, jobs: list[_Job]) -> None:
        size = self.settings.batch_size
        if size <= 1:
            self._ready.extend(jobs)
            return
        for start in range(0, len(jobs), size):
            members = jobs[start : start + size]
            first = members[0]
            batch = _Job(first.index, first.seq, first.key, [m.item for m in members])
            batch.members = members
            self._ready.append(batch)

    def _job(self, item: Any) -> _Job:
        index = next(self._index)
        key = self.settings.key(item) if self.settings.key is not None else None
        return _Job(index, index, key, item)

    def _job_from_row(self, row: ItemRow) -> _Job:
        job = _Job(next(self._index), row.seq, row.key, row.item)
        job.attempt = row.attempts
        return job

    async def _register(self, block: list[Any]) -> list[_Job]:
        journal = self.journal
        assert journal is not None
        rows = []
        jobs = []
        key_function = self.settings.key
        for item in block:
            index = next(self._index)
            text = _codec.encode(item)
            digest = str(key_function(item)) if key_function else _codec.digest(text)
            rows.append((index, text, digest))
            jobs.append(_Job(index, index, digest, item))
        keys = journal.register_new(rows)
        slow = [i for i, key in enumerate(keys) if key is None]
        if not slow:
            return jobs
        answer: asyncio.Future[list[ItemRow] | BaseException] = (
            asyncio.get_running_loop().create_future()
        )
        journal.register(
            [rows[i] for i in slow],
            lambda result: _set_result(answer, result),
        )
        registered = await answer
        if isinstance(registered, BaseException):
            raise registered
        done: set[int] = set()
        for i, row in zip(slow, registered, strict=True):
            job = jobs[i]
            job.seq = row.seq
            job.key = row.key
            job.attempt = row.attempts
            job.lost_workers = row.lost_workers
            if row.state not in self._rerun_states:
                done.add(i)
                self._finish_from_journal(job, row)
        return [job for i, job in enumerate(jobs) if i not in done]

    def _finish_from_journal(self, job: _Job, row: ItemRow) -> None:
        state = State(row.state)
        outcome = Outcome(job.seq, row.key, job.item, state, source="journal")
        self.report.carried += 1
        if state is State.SUCCEEDED:
            text = row.value
            outcome.value = None if text is None or text == "null" else json.loads(text)
            self.report.from_journal += 1
        else:
            outcome.error = error_from_json(row.error)
            outcome.reason = row.reason
        self._emit(job.index, outcome, None)

    # -- attempts --------------------------------------------------------

    def _context(self, job: _Job) -> Context:
        key = job.key if job.key is not None else _lazy_key(job)
        resources = self._resources
        if resources is None:
            resources = self._resources = _open_resources()
        secrets = self.settings.secrets
        return Context(
            self.run_id,
            key,
            job.attempt,
            job.seq,
            f"{self.run_id}:{key}",
            resources=resources,
            secrets=(
                secrets.for_attempt(self.run_id, key, job.attempt)
                if secrets is not None
                else None
            ),
        )

    async def _attempt_locked(
        self, job: _Job, owner: asyncio.Task[Any] | None, slot: int
    ) -> None:
        """Run an attempt of ``job`` while holding its lock key (``lock_key``)."""
        if not self._take_key(job):
            return
        try:
            await self._attempt(job, owner, slot)
        finally:
            self._release_key(job)

    def _take_key(self, job: _Job) -> bool:
        """Hold the lock key of ``job``, or park it until the holder is done."""
        if self._stopping is not None:
            self._cancelled(job, self._stopping)
            self._release_key(job)
            return False
        if job.holds_key:
            return True  # handed over by the previous holder
        lock_key = self.settings.lock_key
        assert lock_key is not None
        try:
            key = job.lock = lock_key(_first_item(job))
            waiting = self._key_waiters.get(key)
        except Exception as error:
            self._fail_for_good(job, error, time.time(), 0.0)
            return False
        if waiting is None:
            self._key_waiters[key] = collections.deque()
            job.holds_key = True
            return True
        waiting.append(job)
        self._parked += 1
        return False

    def _release_key(self, job: _Job) -> None:
        """Hand the lock key of ``job`` to the next item waiting for it."""
        if not job.holds_key:
            return
        job.holds_key = False
        waiting = self._key_waiters[job.lock]
        if self._stopping is not None:
            while waiting:
                self._parked -= 1
                self._cancelled(waiting.popleft(), self._stopping)
        if not waiting:
            del self._key_waiters[job.lock]
            return
        following = waiting.popleft()
        following.holds_key = True
        self._parked -= 1
        self._retry_ready.append(following)
        self._wake_all()

    async def _attempt(
        self, job: _Job, owner: asyncio.Task[Any] | None, slot: int
    ) -> None:
        cache = self.settings.cache
        if cache is not None and not job.cache_leader and not self._cache_misses(job):
            return
        gate = self.settings.memory_gate
        if gate is not None and gate.admit() > 0 and not await self._memory_allows(job):
            return
        breakers = self.settings.breakers
        if breakers is not None and not self._circuit_allows(job, breakers):
            return
        limiter = self.settings.concurrency_limiter
        if (
            limiter is not None
            and not limiter.try_acquire()
            and not await self._slot_taken(job, limiter)
        ):
            return
        if self.settings.rate_limiter is not None:
            if not await self._rate_allows(job):
                if limiter is not None:
                    limiter.release(None)
                    self._free_slots(limiter)
                return
            # The circuit may have changed while this item waited its turn.
            if (
                breakers is not None
                and self._circuit_changed(job, breakers)
                and not self._circuit_allows(job, breakers)
            ):
                if limiter is not None:
                    limiter.release(None)
                    self._free_slots(limiter)
                return
        job.attempt += 1
        # The adaptive limit measures latency on its own clock (a fake one in
        # tests), so that its rounds and its dates of starts agree.
        slot_began = limiter.policy.clock() if limiter is not None else 0.0
        started = time.time()
        if job.first_started is None:
            job.first_started = started
        call = Call(job.item, lambda: self._context(job), self._attempt_timeout(job))
        call.owner = owner
        call.started = started
        call.slot = slot
        self._active[call] = job
        if call.timeout is not None:
            self._add_deadline(call)
        if self._log_attempts:
            self._log_attempt(job)
        began = time.perf_counter()
        try:
            if self._direct is not None:
                value = await self._direct(job.item)
            else:
                value = await self.backend.execute(call)
        except asyncio.CancelledError as error:
            del self._active[call]
            duration = time.perf_counter() - began
            job.slot, job.worker = call.slot, call.worker
            if call.started != started or call.duration is not None:
                started, duration = _from_execution(call, started, duration)
            if call.cancel_error is not None and self._direct is not None:
                # A timeout or cancel of a coroutine called directly: the
                # backend cancelled this worker task to interrupt it.
                if owner is not None:
                    owner.uncancel()
                if limiter is not None:
                    self._release_slot(limiter, slot_began, call.cancel_error)
                self._failed(job, call.cancel_error, started, duration)
                return
            current = asyncio.current_task()
            if current is None or current.cancelling():
                if limiter is not None:
                    limiter.release(None)
                    self._free_slots(limiter)
                raise
            # The worker was not cancelled, so the task itself raised
            # CancelledError. That fails the attempt, which is never retried.
            if limiter is not None:
                self._release_slot(limiter, slot_began, error)
            self._failed(job, error, started, duration)
            return
        except BaseException as error:
            del self._active[call]
            duration = time.perf_counter() - began
            job.slot, job.worker = call.slot, call.worker
            if call.started != started or call.duration is not None:
                started, duration = _from_execution(call, started, duration)
            if limiter is not None:
                self._release_slot(limiter, slot_began, error)
            self._failed(job, error, started, duration)
            return
        del self._active[call]
        duration = time.perf_counter() - began
        job.slot, job.worker = call.slot, call.worker
        if call.started != started or call.duration is not None:
            started, duration = _from_execution(call, started, duration)
        if limiter is not None:
            limiter.release(max(0.0, limiter.policy.clock() - slot_began))
            self._free_slots(limiter)
        if breakers is not None:
            single = breakers.single
            if (
                single is None
                or not single.healthy
                or single.generation != job.circuit_generation
            ):
                self._record_circuit(job, None)
        if self._log_attempts:
            self._log_attempt(job, duration)
        if job.members is None:
            self._succeeded(job, value, started, duration)
        else:
            self._batch_succeeded(job, value, started, duration)

    def _attempt_timeout(self, job: _Job) -> float | None:
        """Return the attempt's timeout, cut short by the item's deadline."""
        timeout = self.settings.timeout
        deadline = self.settings.retry.deadline_seconds
        if deadline is None or job.first_started is None:
            return timeout
        remaining = max(job.first_started + deadline - time.time(), 1e-3)
        return remaining if timeout is None else min(timeout, remaining)

    def _deadline_passed(self) -> None:
        """Stop the run when its deadline passes; what runs is cancelled."""
        assert self.settings.deadline is not None
        if self._stopping is None and self.report.halted is None:
            self.report.halted = (
                f"the run's deadline of {self.settings.deadline:g} s passed"
            )
            log.warning("halting run %s: %s", self.run_id, self.report.halted)
            self.stop(f"halted: {self.report.halted}", cancel=True)

    def _circuit_allows(self, job: _Job, breakers: Breakers) -> bool:
        """Let ``job`` start if its circuit allows; else park or fail it."""
        single = breakers.single
        if single is not None and single.state is BreakerState.CLOSED:
            job.circuit_generation = single.generation
            return True
        try:
            key = breakers.key_of(_first_item(job))
        except Exception as error:
            self._fail_for_good(job, error, time.time(), 0.0)
            return False
        seen = len(breakers.transitions)
        delay, job.circuit_generation = breakers.admit(key)
        if len(breakers.transitions) != seen:
            self._note_transitions(breakers, seen)
        if delay == 0.0:
            return True
        if breakers.policy.fail_fast:
            now = time.time()
            self._fail_for_good(job, CircuitOpenError(key, delay), now, 0.0)
            return False
        # Wait outside the slot: the job comes back like a retry.
        self._parked += 1
        self._waiting_for_circuit += 1
        asyncio.get_running_loop().call_later(delay, self._unpark, job, False)
        return False

    def _circuit_changed(self, job: _Job, breakers: Breakers) -> bool:
        """Return whether the circuit of ``job`` changed state since admitting it."""
        circuit = breakers.circuit(breakers.key_of(_first_item(job)))
        return circuit.generation != job.circuit_generation

    async def _slot_taken(self, job: _Job, limiter: ConcurrencyLimiter) -> bool:
        """Wait for a slot of the adaptive limit; false if the run stopped first.

        Waiters are woken in order as slots free up (`_free_slots`), and all
        of them by a stop.
        """
        loop = asyncio.get_running_loop()
        first = True
        while True:
            if self._stopping is not None:
                self._cancelled(job, self._stopping)
                return False
            if limiter.try_acquire():
                return True
            waiter = loop.create_future()
            # A waiter that lost its slot to a newcomer keeps its place.
            if first:
                self._slot_waiters.append(waiter)
            else:
                self._slot_waiters.appendleft(waiter)
            first = False
            await waiter

    def _release_slot(
        self, limiter: ConcurrencyLimiter, began: float, error: BaseException
    ) -> None:
        """Free the slot of a failed attempt; an interrupt measures nothing."""
        if isinstance(error, Interrupted):
            limiter.release(None)
        else:
            limiter.release(max(0.0, limiter.policy.clock() - began), failed=True)
        self._free_slots(limiter)

    def _free_slots(self, limiter: ConcurrencyLimiter) -> None:
        """Wake as many waiters as the adaptive limit has free slots."""
        waiters = self._slot_waiters
        free = limiter.limit - limiter.in_flight
        while free > 0 and waiters:
            _set_result(waiters.popleft())
            free -= 1

    def _record_circuit(self, job: _Job, error: BaseException | None) -> None:
        breakers = self.settings.breakers
        if breakers is None or isinstance(error, Interrupted):
            # An interrupted attempt shows nothing about the service's health.
            return
        key = breakers.key_of(_first_item(job))
        seen = len(breakers.transitions)
        breakers.record(key, error, job.circuit_generation)
        if len(breakers.transitions) != seen:
            self._note_transitions(breakers, seen)

    def _note_transitions(self, breakers: Breakers, seen: int) -> None:
        """Log, journal and report the circuit changes after the first ``seen``."""
        for transition in breakers.transitions[seen:]:
            level = logging.WARNING if transition.new.value == "open" else logging.INFO
            log.log(
                level,
                "circuit %r is %s: %s",
                transition.key,
                transition.new.value,
                transition.reason,
            )
            self.report.circuit_transitions.append(transition)
            if self.journal is not None:
                self.journal.event(
                    "circuit",
                    {
                        "key": repr(transition.key),
                        "from": transition.old.value,
                        "to": transition.new.value,
                        "reason": transition.reason,
                    },
                )

    def _cache_misses(self, job: _Job) -> bool:
        """Return true if ``job`` must run; else finish it from the cache or park it.

        A hit succeeds at once. On a miss the first item with the key runs
        and the others wait, outside any slot, for its value.
        """
        cache = self.settings.cache
        assert cache is not None
        key = job.cache_key
        try:
            if key is None:
                item = job.item
                key = job.cache_key = (
                    str(self.settings.key(item))
                    if self.settings.key is not None
                    else _codec.digest(_codec.encode(item))
                )
        except Exception as error:
            self._fail_for_good(job, error, time.time(), 0.0)
            return False
        try:
            hit, value = cache.lookup(key)
        except CacheError as error:
            # A cache only saves work: an unreadable entry means running.
            self._cache_failed(error)
            hit, value = False, None
        if hit:
            self._cache_hit(job, value)
            return False
        waiter = cache.claim(key)
        if waiter is None:
            job.cache_leader = True
            return True
        self._parked += 1
        waiter.add_done_callback(lambda done: self._cache_waited(job, done))
        return False

    def _cache_waited(self, job: _Job, done: asyncio.Future[tuple[bool, Any]]) -> None:
        """Take back an item that waited for the item in flight with its key."""
        self._parked -= 1
        self._wake_all()
        if self._stopping is not None:
            self._cancelled(job, self._stopping)
            return
        hit, value = done.result()
        if hit:
            self._cache_hit(job, value)
            return
        # The item in flight failed: this one runs, or waits for another.
        self._retry_ready.append(job)

    def _cache_hit(self, job: _Job, value: Any) -> None:
        self.report.cache_hits += 1
        outcome = Outcome(
            job.seq, job.key, job.item, State.SUCCEEDED, value, source="cache"
        )
        if self._keep is not None and not self._kept(job.index, outcome):
            return
        op = None
        if self.journal is not None:
            store = self.settings.store_value or store_json
            op = self.journal.update(
                job.seq,
                "succeeded",
                value=store(self._redacted_value(value)),
                ended=time.time(),
            )
        self._emit(job.index, outcome, op)

    def _cache_settle(self, job: _Job, value: Any = None, *, ok: bool) -> None:
        """Store a leader's value, or end its flight after a failure."""
        job.cache_leader = False
        cache = self.settings.cache
        assert cache is not None and job.cache_key is not None
        if not ok:
            cache.abandon(job.cache_key)
            return
        try:
            cache.resolve(job.cache_key, value)
        except CacheError as error:
            # The value is in memory and the item succeeded; only the disk
            # copy is missing.
            self._cache_failed(error)

    def _cache_failed(self, error: CacheError) -> None:
        """Log the first failure of the cache's file; later ones are counted."""
        self.report.cache_errors += 1
        if self.report.cache_errors == 1:
            cache_log.warning(
                "%s; the run goes on, and items run when their value cannot be read",
                error,
            )

    async def _memory_allows(self, job: _Job) -> bool:
        """Wait until there is memory to start ``job``; false if it may not."""
        gate = self.settings.memory_gate
        assert gate is not None and self._stopped is not None
        if gate.pauses > self._pauses_logged:
            self._pauses_logged = gate.pauses
            memory_log.warning("run %s admission %s", self.run_id, gate.reason())
        while (delay := gate.admit()) > 0:
            await asyncio.wait([self._stopped], timeout=delay)
            if self._stopping is not None:
                self._cancelled(job, self._stopping)
                return False
        if self._resumes_logged < gate.pauses:
            self._resumes_logged = gate.pauses
            memory_log.warning(
                "run %s admission resumed: memory is available again", self.run_id
            )
        return True

    async def _rate_allows(self, job: _Job) -> bool:
        """Wait until the rate limit lets ``job`` start; false if it may not."""
        limiter = self.settings.rate_limiter
        assert limiter is not None
        try:
            key = limiter.key_of(_first_item(job))
        except Exception as error:
            self._fail_for_good(job, error, time.time(), 0.0)
            return False
        waited = False
        while (delay := limiter.try_start(key)) > 0:
            if not waited:
                waited = True
                self.report.rate_limited += 1
            # A stop wakes the wait at once, however long the delay.
            assert self._stopped is not None
            await asyncio.wait([self._stopped], timeout=delay)
            if self._stopping is not None:
                self._cancelled(job, self._stopping)
                return False
        return True

    def _journal_running(self) -> None:
        """Record as running the attempts in flight that are not recorded yet.

        Called after each commit rather than at every start: an attempt that
        ends within one commit interval goes straight from pending to its
        outcome in the journal, and costs one row write instead of two.
        """
        journal = self.journal
        assert journal is not None
        for job in self._active.values():
            if job.running_recorded == job.attempt:
                continue
            for member in job.members or (job,):
                journal.update(
                    member.seq,
                    "running",
                    attempts=job.attempt,
                    started=job.first_started,
                )
            job.running_recorded = job.attempt

    def _succeeded(
        self, job: _Job, value: Any, started: float, duration: float
    ) -> None:
        strategy = None
        if type(value) is FallbackValue:
            strategy = value.strategy
            value = value.value
            self.report.strategies[strategy] += 1
        attempts = job.attempts
        if (
            attempts is not None
            or self.settings.collect
            or self._observers_need_attempts
        ):
            attempts = attempts or []
            attempts.append(Attempt(job.attempt, started, duration))
        outcome = Outcome(
            job.seq,
            job.key,
            job.item,
            State.SUCCEEDED,
            value,
            attempts=attempts or [],
            strategy=strategy,
        )
        if self._keep is not None and not self._kept(job.index, outcome):
            return
        op = None
        if self.journal is not None:
            store = self.settings.store_value or store_json
            op = self.journal.update(
                job.seq,
                "succeeded",
                attempts=job.attempt,
                value=store(self._redacted_value(value)),
                # The item began with its first attempt, as its worker saw it.
                started=started if job.attempt == 1 else None,
                ended=started + duration,
                duration=duration,
                slot=job.slot or None,
                worker=job.worker,
            )
        if job.cache_leader:
            self._cache_settle(job, value, ok=True)
        self._emit(job.index, outcome, op)

    def _batch_succeeded(
        self, job: _Job, value: Any, started: float, duration: float
    ) -> None:
        assert job.members is not None
        if self.backend.runs_commands:
            # One command ran for the whole batch: its output belongs to the
            # batch's first item, so it is printed and kept once.
            values = [value] + [None] * (len(job.members) - 1)
            for member, member_value in zip(job.members, values, strict=True):
                member.attempt = job.attempt
                member.attempts = job.attempts
                member.slot, member.worker = job.slot, job.worker
                self._succeeded(member, member_value, started, duration)
            return
        try:
            values = results_per_item(value, job.members)
        except TypeError as error:
            self._fail_for_good(job, error, started, duration)
            return
        for member, member_value in zip(job.members, values, strict=True):
            member.attempt = job.attempt
            member.attempts = job.attempts
            member.slot, member.worker = job.slot, job.worker
            if isinstance(member_value, BaseException):
                self._fail_for_good(member, member_value, started, duration)
            else:
                self._succeeded(member, member_value, started, duration)

    def _failed(
        self, job: _Job, error: BaseException, started: float, duration: float
    ) -> None:
        if self._log_attempts:
            self._log_attempt(job, duration, error)
        if self.settings.breakers is not None:
            self._record_circuit(job, error)
        if job.attempts is None:
            job.attempts = []
        job.attempts.append(Attempt(job.attempt, started, duration, error))
        if isinstance(error, WorkerLostError):
            job.lost_workers += 1
        if isinstance(error, Interrupted):
            self._cancelled(job, error.reason)
            return
        if isinstance(error, RunAbortedError):
            # The backend cannot go on (its workers cannot start): the run
            # stops, and the item waits for a resume rather than failing.
            if self._aborted is None:
                log.error("%s", error)
                self._aborted = error
                self._abort_message = str(error)
            self.stop(str(error), cancel=True)
            self._cancelled(job, str(error))
            return
        delay = self._retry_delay(job, error)
        if delay is None:
            self._fail_for_good(job, error, started, duration, recorded=True)
            return
        self._park(job, error, started, duration, delay)

    def _log_attempt(
        self,
        job: _Job,
        duration: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Log the start of an attempt, or with ``duration`` its end."""
        first = job if job.members is None else job.members[0]
        key = first.key or _lazy_key(first)
        if job.members is not None:
            key = f"{key} (a batch of {len(job.members)} items)"
        if duration is None:
            attempt_log.info("item %s attempt %d started", key, job.attempt)
        elif error is None:
            attempt_log.info(
                "item %s attempt %d succeeded in %.3f s", key, job.attempt, duration
            )
        else:
            ending = "was cancelled" if isinstance(error, Interrupted) else "failed"
            attempt_log.info(
                "item %s attempt %d %s after %.3f s: %s",
                key,
                job.attempt,
                ending,
                duration,
                self._redact(_describe(error)),
            )

    def _retry_delay(self, job: _Job, error: BaseException) -> float | None:
        policy = self.settings.retry
        if self._stopping is not None:
            return None
        if not policy.allows(error, job.attempt, job.lost_workers):
            return None
        if isinstance(error, WorkerLostError):
            return 0.0
        delay = policy.backoff.delay(job.attempt, self._rng)
        deadline = policy.deadline_seconds
        started = job.first_started
        # No backoff may end after the item's deadline.
        if (
            deadline is not None
            and started is not None
            and time.time() + delay >= started + deadline
        ):
            return None
        return delay

    def _park(
        self,
        job: _Job,
        error: BaseException,
        started: float,
        duration: float,
        delay: float,
    ) -> None:
        key = job.key or _lazy_key(job)
        retry_log.warning(
            "item %s attempt %d failed (%s); retrying in %.2f s",
            key,
            job.attempt,
            self._redact(str(error)),
            delay,
        )
        for observer in self.observers:
            observer.on_retry(key, job.attempt, delay, error)
        if self.journal is not None:
            text = error_json(error, self._redactor)
            slot = job.slot or None
            for member in job.members or (job,):
                self.journal.add_attempt(
                    member.seq,
                    job.attempt,
                    started,
                    duration,
                    text,
                    slot=slot,
                    worker=job.worker,
                )
                self.journal.update(
                    member.seq,
                    "retrying",
                    attempts=job.attempt,
                    lost_workers=job.lost_workers,
                    error=text,
                )
        self._parked += 1
        self.retrying += 1
        asyncio.get_running_loop().call_later(delay, self._unpark, job)

    def _unpark(self, job: _Job, retrying: bool = True) -> None:
        self._parked -= 1
        if retrying:
            self.retrying -= 1
        else:
            self._waiting_for_circuit -= 1
        if self._stopping is not None:
            self._cancelled(job, self._stopping)
            self._wake_all()
            return
        self._retry_ready.append(job)
        self._wake_all()

    def _fail_for_good(
        self,
        job: _Job,
        error: BaseException,
        started: float,
        duration: float,
        *,
        recorded: bool = False,
    ) -> None:
        if job.members is not None:
            for member in job.members:
                member.attempt = job.attempt
                member.attempts = job.attempts
                member.lost_workers = job.lost_workers
                member.slot, member.worker = job.slot, job.worker
                self._fail_for_good(member, error, started, duration, recorded=recorded)
            return
        if not recorded:
            job.attempts = (job.attempts or []) + [
                Attempt(job.attempt, started, duration, error)
            ]
        if job.cache_leader:
            self._cache_settle(job, ok=False)
        outcome = Outcome(
            job.seq,
            job.key,
            job.item,
            State.FAILED,
            error=error,
            attempts=job.attempts or [],
        )
        if self._keep is not None and not self._kept(job.index, outcome):
            return
        op = None
        if self.journal is not None:
            text = error_json(error, self._redactor)
            slot = job.slot or None
            self.journal.add_attempt(
                job.seq,
                job.attempt,
                started,
                duration,
                text,
                slot=slot,
                worker=job.worker,
            )
            op = self.journal.update(
                job.seq,
                "failed",
                attempts=job.attempt,
                lost_workers=job.lost_workers,
                error=text,
                started=started if job.attempt == 1 else None,
                ended=started + duration,
                duration=duration,
                slot=slot,
                worker=job.worker,
            )
        self._emit(job.index, outcome, op)

    def _cancelled(self, job: _Job, reason: str) -> None:
        if job.cache_leader:
            self._cache_settle(job, ok=False)
        for member in job.members or (job,):
            outcome = Outcome(
                member.seq,
                member.key,
                member.item,
                State.CANCELLED,
                attempts=job.attempts or [],
                reason=reason,
            )
            if self._keep is not None and not self._kept(member.index, outcome):
                continue
            op = None
            if self.journal is not None:
                # An interrupted item goes back to pending, so resume runs it;
                # only a halt's cancellation is final.
                state = "cancelled" if self.report.halted else "pending"
                op = self.journal.update(member.seq, state, reason=self._redact(reason))
            self._emit(member.index, outcome, op)

    def _redact(self, text: str) -> str:
        """Return ``text`` with the run's secret values replaced by ``***``."""
        return text if self._redactor is None else self._redactor.redact(text)

    def _redacted_value(self, value: Any) -> Any:
        """Return ``value`` with secrets redacted, for the journal."""
        if not self._redactor:
            return value
        return self._redactor.redact_data(value)

    # -- outcomes --------------------------------------------------------

    def _emit(self, index: int, outcome: Outcome, op: int | None) -> None:
        report = self.report
        state = outcome.state
        report.counts[_COUNT_NAMES[id(state)]] += 1
        if state is State.FAILED:
            report.failures.add(outcome.key, outcome.error, outcome.item)
            if outcome.source == "run":
                # Failures carried over from an earlier session already
                # counted towards the halt condition there.
                self._check_halt()
        if self.settings.collect:
            report.collected.append(outcome)
        for observer in self.observers:
            observer.on_outcome(outcome)
        if self._output is None:
            return
        if self.settings.ordered:
            self._reorder[index] = outcome
            if (
                op is not None
                and self.journal is not None
                and op > self.journal.committed
            ):
                self._waiting_commit.append((op, outcome))
            self._drain_reorder()
        elif (
            op is not None and self.journal is not None and op > self.journal.committed
        ):
            self._waiting_commit.append((op, outcome))
        else:
            self._deliver(outcome)

    def _kept(self, index: int, outcome: Outcome) -> bool:
        """Store ``outcome`` through the keep hook; return whether that worked.

        Called before the outcome goes to the journal. If storing fails, the
        outcome is dropped and the run stops. The journal still records the
        item as running, so a resume runs it again.
        """
        assert self._keep is not None
        try:
            self._keep(outcome)
        except Exception as error:
            self._output_failed(outcome, error)
            if self.settings.ordered and self._output is not None:
                self._reorder[index] = None  # let the later outcomes through
                self._drain_reorder()
            return False
        return True

    def _deliver(self, outcome: Outcome) -> None:
        """Hand an outcome to the consumer; a consumer that fails ends the run."""
        assert self._output is not None
        try:
            self._output(outcome)
        except Exception as error:
            self._output_failed(outcome, error)

    def _output_failed(self, outcome: Outcome, error: Exception) -> None:
        # The run's caller reports the failure, as RunAbortedError.
        reason = f"writing the output of item {outcome.key} failed: {error}"
        if self._aborted is None:
            self._aborted = error
            self._abort_message = reason
        self.stop(reason, cancel=True)

    def _drain_reorder(self, *, final: bool = False) -> None:
        if not self.settings.ordered or self._output is None:
            return
        pending_commit = {id(o) for _, o in self._waiting_commit}
        while self._next_index in self._reorder:
            outcome = self._reorder[self._next_index]
            if outcome is not None and id(outcome) in pending_commit and not final:
                return
            del self._reorder[self._next_index]
            self._next_index += 1
            if outcome is not None:
                self._deliver(outcome)
        if final:
            for index in sorted(self._reorder):
                outcome = self._reorder.pop(index)
                if outcome is not None:
                    self._deliver(outcome)
        self._wake_all()

    def _on_commit(self, committed: int) -> None:
        if self._active and self.journal is not None:
            self._journal_running()
        waiting = self._waiting_commit
        while waiting and waiting[0][0] <= committed:
            _, outcome = waiting.popleft()
            if not self.settings.ordered and self._output is not None:
                self._deliver(outcome)
        if self.settings.ordered:
            self._drain_reorder()
        else:
            self._wake_all()

    def _check_halt(self) -> None:
        halt = self.settings.halt
        if halt is None or self.report.halted is not None:
            return
        counts = self.report.counts
        reason = halt.reached(counts["failed"], sum(counts.values()))
        if reason is not None:
            self.report.halted = reason
            log.warning("halting run %s: %s", self.run_id, reason)
            self.stop(f"halted: {reason}", cancel=halt.cancel)

    # -- timeouts --------------------------------------------------------

    def _add_deadline(self, call: Call) -> None:
        assert call.timeout is not None
        deadline = time.monotonic() + call.timeout
        heap = self._timeouts
        if len(heap) > 2 * len(self._active) + 1024:
            heap[:] = [entry for entry in heap if entry[2] in self._active]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, next(self._timeout_counter), call))
        if heap[0][2] is call and self._sweeper_wake is not None:
            _set_result(self._sweeper_wake)

    def _later_deadline(self, call: Call, deadline: float, now: float) -> float | None:
        """Return a new deadline if ``call`` began after its hand-over, else None.

        A backend with workers of its own may hold an attempt until a worker
        can take it, and the timeout counts from then. An attempt that still
        waits is checked again within `_WAIT_RECHECK` seconds.
        """
        assert call.timeout is not None
        began = self.backend.began(call)
        if began is None:
            return now + min(call.timeout, _WAIT_RECHECK)
        later = max(began, deadline - call.timeout) + call.timeout
        return later if later > now else None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._timeouts
        while True:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                deadline, _, call = heapq.heappop(heap)
                if call in self._active and call.cancel_error is None:
                    assert call.timeout is not None
                    later = self._later_deadline(call, deadline, now)
                    if later is not None:
                        heapq.heappush(heap, (later, next(self._timeout_counter), call))
                        continue
                    self.backend.cancel(call, AttemptTimeoutError(call.timeout))
            self._sweeper_wake = loop.create_future()
            delay = heap[0][0] - now if heap else None
            handle = (
                loop.call_later(delay, _set_result, self._sweeper_wake)
                if delay is not None
                else None
            )
            await self._sweeper_wake
            if handle is not None:
                handle.cancel()


def _open_resources() -> str:
    """Make the keyed lock and shared store of one run; return their folder."""
    # Imported here: flow is built on the engine, so the engine cannot
    # import it while the package loads.
    from batchtools.flow.locks import resources_at

    folder = tempfile.mkdtemp(prefix="batchtools-run-")
    resources_at(folder)
    return folder


def _close_resources(folder: str) -> None:
    from batchtools.flow.locks import forget_resources

    forget_resources(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _set_result(future: asyncio.Future[Any], value: Any = None) -> None:
    if not future.done():
        future.set_result(value)


async def _watch_stalls(period: float = 0.25, limit: float = 1.0) -> None:
    """Log when the event loop was blocked for longer than ``limit`` seconds."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(period)
        lag = time.monotonic() - before - period
        if lag > limit:
            log.warning(
                "the event loop was blocked for %.1f s; a task or an input "
                "iterator is blocking it (sync code belongs on the thread or "
                "process backend)",
                lag,
            )


def _block_size(batch_size: int) -> int:
    return max(256, batch_size * 16)


def _describe(error: BaseException) -> str:
    """Return an error as a log line shows it: its type, unless the text names it."""
    if isinstance(error, RemoteError):
        return f"{error.type_name}: {error.message}"
    if isinstance(error, BatchtoolsError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _from_execution(
    call: Call, handed_over: float, duration: float
) -> tuple[float, float]:
    """Return an attempt's start and duration from when a worker executed it.

    A backend that queues attempts ahead of its workers sets `Call.started`
    when a worker takes one, so the wait in its queue does not count, and
    may set `Call.duration` as its worker measured it, so the wait for the
    result to come back does not count either. A worker on another host has
    a clock of its own, so its times are kept within the ``duration``
    seconds the engine waited from ``handed_over``.
    """
    measured = call.duration
    if measured is None:
        return call.started, max(0.0, duration - (call.started - handed_over))
    measured = min(max(measured, 0.0), duration)
    latest = handed_over + duration - measured
    return min(max(call.started, handed_over), latest), measured


def _first_item(job: _Job) -> Any:
    """Return the item of ``job``, or the first item of a batch."""
    return job.item if job.members is None else job.members[0].item


def _lazy_key(job: _Job) -> str:
    job.key = _codec.digest(_codec.encode(job.item))
    return job.key
