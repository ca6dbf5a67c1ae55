"""Streaming pipelines: stages that each run on the engine, joined by bounded queues.

Each stage is one engine run (`batchtools.astream`) with its own task,
backend, concurrency and retry policy. The source of stage k+1 is a
bounded queue that a pump task fills with the values that stage k
produced for its successes, so an item moves on as soon as it leaves the
previous stage. Data flow::

    items --> engine 0 --> pump 0 --success--> queue 1 --> engine 1 --> pump 1
                             |                                            |
                             +-- failed, skipped, cancelled --+-----------+
                                                              v
                                             output (bounded) --> caller

Every buffer on the way is bounded: each engine's output backlog, the
queues between stages and the final output. A slow stage therefore
pauses admission in the stages before it, and memory stays flat however
many items flow through.

The queues are written here because each one is filled on the event
loop and read by the next engine's reader thread (see `_Queue`). The
standard library has no bounded queue with one async and one blocking
side that the reader can close. `asyncio.Queue` is not thread-safe, and
`queue.Queue.put` would block the event loop.

Stages after the first see intermediate values, not the original items.
A queue remembers which original item each value came from, by the
position at which the next engine read it. That position is the value's
`Outcome.seq` in the next stage, because an engine without a journal
numbers its items in the order it reads them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import statistics
import threading
import time
import uuid
from array import array
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, cast

from batchtools._exceptions import ConfigurationError, RunAbortedError
from batchtools.backends._command import CommandTemplate
from batchtools.engine._api import (
    STOP_SIGNALS,
    AsyncStream,
    Job,
    Stream,
    _is_command,
    _run_on_helper_thread,
    build_engine,
    prepare,
)
from batchtools.engine._engine import Engine, Observer
from batchtools.engine._outcome import (
    COUNT_KEYS,
    Attempt,
    Outcome,
    Report,
    State,
    _number_duplicates,
)
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.retry import Retry

log = logging.getLogger("batchtools.flow")

# Values waiting between two stages; about one block of the engine's reads.
QUEUE_LIMIT = 256
# Final outcomes the caller has not taken yet, like `AsyncStream`'s backlog.
OUTPUT_LIMIT = 1024
# Attempt durations kept per stage for the percentiles: 80 KB of doubles.
SAMPLE_SIZE = 10_000
_BATCH = 256


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a pipeline: a task and the policies it runs under.

    A Python stage receives the value that the previous stage returned
    (the original item in the first stage). A command stage receives it
    as ``{}`` and passes on its stdout as text, decoded as UTF-8 with one
    trailing newline removed. Bytes that are not valid UTF-8 become
    surrogate escapes, as `os.fsdecode` makes them, so the next command
    gets them back byte for byte. A command's stderr reaches the
    pipeline's observers and is then dropped.

    Attributes:
        task: A callable (sync or async) or a command template, as `run`
            takes it.
        name: The name used in outcomes and reports. The default is the
            function's name or the command's program, and the stage's
            position is added when two stages would share it.
        concurrency: Attempts of this stage executing at once.
        backend: ``async``, ``thread``, ``process`` or ``subprocess``.
        retry: Retries after the first attempt, or a `Retry` policy.
        timeout: Seconds (or ``"30s"``) one attempt may take.
        batch_size: Hand a Python task lists of up to this many values.
        policies: A `RateLimit`, `CircuitBreaker`, `Memory` or `Cache`.
        shell: Run a command template through ``/bin/sh``.
    """

    task: Any
    name: str | None = None
    concurrency: int | str | Concurrency | None = None
    backend: str | None = None
    retry: Retry | int | None = None
    timeout: float | str | None = None
    batch_size: int | None = None
    policies: Sequence[object] = ()
    shell: bool = False


class PipelineOutcome(Outcome):
    """The final outcome of one item of a pipeline.

    ``seq``, ``key`` and ``item`` are those of the original input item.
    ``value``, ``error``, ``attempts``, ``reason`` and ``source`` come from
    the stage named by ``stage``.

    Attributes:
        stage: The stage that decided the outcome: the last stage for a
            succeeded item, otherwise the stage where the item failed,
            was skipped or was cancelled.
    """

    __slots__ = ("stage",)

    def __init__(
        self,
        seq: int,
        key: str | None,
        item: Any,
        state: State,
        *,
        stage: str,
        value: Any = None,
        error: BaseException | None = None,
        attempts: list[Attempt] | None = None,
        reason: str | None = None,
        source: str = "run",
        strategy: str | None = None,
    ) -> None:
        super().__init__(
            seq, key, item, state, value, error, attempts, reason, source, strategy
        )
        self.stage = stage

    def __repr__(self) -> str:
        detail = self.error if self.state is State.FAILED else self.value
        return (
            f"<PipelineOutcome #{self.seq} {self.state.value} in {self.stage!r} "
            f"item={self.item!r:.60} {detail!r:.60}>"
        )


@dataclass(slots=True)
class StageReport:
    """The report of one stage of a pipeline run.

    Attributes:
        name: The stage's name.
        counts: Items per final state in this stage. ``succeeded`` items
            went on to the next stage, or ended the pipeline. Items that a
            stop left between this stage and the one before count as
            ``cancelled`` here.
        attempts: Attempts that ended in this stage.
        median_seconds: The median attempt duration; ``None`` without
            attempts.
        p95_seconds: The 95th percentile of attempt durations (nearest
            rank); ``None`` without attempts.
        max_seconds: The maximum attempt duration; ``None`` without
            attempts.
        report: The report of the stage's own engine run.
    """

    name: str
    counts: dict[str, int]
    attempts: int
    median_seconds: float | None
    p95_seconds: float | None
    max_seconds: float | None
    report: Report


@dataclass(slots=True, repr=False)
class PipelineReport(Report):
    """The report of a pipeline run: end-to-end counts and a report per stage.

    The fields of `Report` describe the items end to end; the counters of
    workers and rate limits are summed over the stages.

    Attributes:
        stages: One report per stage, in pipeline order.
    """

    stages: list[StageReport] = field(default_factory=list)

    # The overrides narrow the type of the outcomes: `run` collects only
    # `PipelineOutcome` objects. A list is invariant, hence the ignore.
    @property
    def outcomes(self) -> list[PipelineOutcome]:  # type: ignore[override]
        """Every final outcome in input order, when the caller collected them."""
        if self.unnumbered:
            self.unnumbered = False
            _number_duplicates(self.collected)
        return cast(list[PipelineOutcome], self.collected)

    def failed(self) -> Iterator[PipelineOutcome]:
        """Yield the collected outcomes that failed."""
        return (o for o in self.outcomes if o.state is State.FAILED)


class _Origin(NamedTuple):
    """The original item behind a value on its way through the stages."""

    seq: int
    key: str | None
    item: Any


class _LatencySample:
    """Attempt durations of one stage: a bounded sample and the exact maximum.

    The sample is uniform over all durations (reservoir sampling,
    Algorithm R), so memory stays bounded. Up to `SAMPLE_SIZE` attempts
    the percentiles are exact; beyond that they are estimates.
    """

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self._size = size
        self._values = array("d")
        self._random = random.Random(seed)
        self.count = 0
        self.max: float | None = None

    def add(self, seconds: float) -> None:
        """Record one attempt's duration in seconds."""
        self.count += 1
        if self.max is None or seconds > self.max:
            self.max = seconds
        if len(self._values) < self._size:
            self._values.append(seconds)
            return
        slot = self._random.randrange(self.count)
        if slot < self._size:
            self._values[slot] = seconds

    def median(self) -> float | None:
        """Return the median of the sample, or ``None`` when it is empty."""
        return statistics.median(self._values) if self._values else None

    def percentile(self, share: float) -> float | None:
        """Return the nearest-rank percentile ``share`` (0 to 1) of the sample."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class _Tally:
    """Counts and attempt durations of one stage, kept as its outcomes pass."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.latency = _LatencySample()

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.state.value] += 1
        # NOTE: the items of a batch share their attempts' list, so a batch
        # stage counts each attempt once per item of the batch.
        for attempt in outcome.attempts:
            self.latency.add(attempt.duration)

    def finish(self, name: str, report: Report) -> StageReport:
        sample = self.latency
        return StageReport(
            name=name,
            counts=self.counts,
            attempts=sample.count,
            median_seconds=sample.median(),
            p95_seconds=sample.percentile(0.95),
            max_seconds=sample.max,
            report=report,
        )


class _Queue:
    """The bounded queue between two stages; the later stage's engine reads it.

    The pump of the earlier stage puts values in on the event loop. The
    later engine reads the queue as a blocking iterator, which it pulls on
    its reader thread and takes in blocks. An async source would instead
    be read one item per refill, and each refill wakes every idle worker
    of the engine.
    ``origins`` maps the later engine's ``seq`` of each value it read to
    the original item, until the pump of the later stage takes it out.
    """

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._values: collections.deque[tuple[Any, _Origin]] = collections.deque()
        self._limit = limit
        self._condition = threading.Condition()
        self._ended = False
        self._closed = False
        self._room: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.origins: dict[int, _Origin] = {}
        self._read = 0

    async def put(self, value: Any, origin: _Origin) -> bool:
        """Queue ``value``, waiting for room; false if the reader has closed."""
        while True:
            with self._condition:
                if self._closed:
                    return False
                if len(self._values) < self._limit:
                    self._values.append((value, origin))
                    self._condition.notify()
                    return True
                self._loop = asyncio.get_running_loop()
                room = self._room = self._loop.create_future()
            await room

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._condition:
            while not self._values and not (self._ended or self._closed):
                self._condition.wait()
            if self._closed or not self._values:
                raise StopIteration
            value, origin = self._values.popleft()
            self.origins[self._read] = origin
            self._read += 1
            room, self._room = self._room, None
        if room is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, room)
        return value

    def origin_of(self, seq: int) -> _Origin:
        """Return and forget the original item of the value read at ``seq``."""
        with self._condition:
            return self.origins.pop(seq)

    def end(self) -> None:
        """Mark that no more values come: the reader stops once it has read all."""
        with self._condition:
            self._ended = True
            self._condition.notify_all()

    def close_and_drain(self) -> list[_Origin]:
        """Stop the reader and return, oldest first, the items without an outcome.

        Those are the values still queued and the values the engine read
        but never gave an outcome. Later puts return false.
        """
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            leftovers = sorted(self.origins.values())
            leftovers.extend(origin for _, origin in self._values)
            self.origins.clear()
            self._values.clear()
            room, self._room = self._room, None
        if room is not None:
            _resolve(room)
        return leftovers


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Output:
    """Final outcomes on their way to the caller, bounded.

    Unordered, a producer waits while `OUTPUT_LIMIT` outcomes are queued.
    Ordered, an outcome is held until every earlier item's outcome has
    arrived, and a producer waits while that many are held. The outcome
    next in order is always taken at once, because taking it releases the
    ones held behind it. After a stop, items that a stage read but never
    ran leave gaps in the order, so ordered producers no longer wait, and
    the end releases what is held in input order.
    """

    def __init__(self, ordered: bool, limit: int = OUTPUT_LIMIT) -> None:
        self._ordered = ordered
        self._limit = limit
        self._ready: collections.deque[PipelineOutcome] = collections.deque()
        self._held: dict[int, PipelineOutcome] = {}
        self._next = 0
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._discarding = False
        self.relaxed = False
        self.ended = False

    def _must_wait(self, outcome: PipelineOutcome) -> bool:
        if self._discarding:
            return False
        if not self._ordered:
            return len(self._ready) >= self._limit
        if self.relaxed or outcome.seq == self._next:
            return False
        return len(self._ready) + len(self._held) >= self._limit

    async def put(self, outcome: PipelineOutcome) -> None:
        """Queue ``outcome`` for the caller, waiting for room."""
        while self._must_wait(outcome):
            self._space.clear()
            await self._space.wait()
        if self._discarding:
            return
        if not self._ordered:
            self._ready.append(outcome)
        else:
            self._held[outcome.seq] = outcome
            while self._next in self._held:
                self._ready.append(self._held.pop(self._next))
                self._next += 1
            self._space.set()
        self._arrived.set()

    def end(self) -> None:
        """Release what is held, in input order, and mark the end."""
        for seq in sorted(self._held):
            self._ready.append(self._held.pop(seq))
        self.ended = True
        self._arrived.set()

    def discard(self) -> None:
        """Drop every outcome from now on: the caller has gone."""
        self._discarding = True
        self._ready.clear()
        self._held.clear()
        self._space.set()

    async def take(self, limit: int) -> list[PipelineOutcome]:
        """Return up to ``limit`` outcomes, waiting for one; empty at the end."""
        while not self._ready:
            if self.ended:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        count = min(limit, len(self._ready))
        batch = [self._ready.popleft() for _ in range(count)]
        self._space.set()
        return batch


class AsyncPipelineStream:
    """Final outcomes of a pipeline as they finish; an async iterator and context.

    Leaving the ``async with`` block, or breaking out of the loop inside
    it, cancels every stage and reaps its workers at once. Build one with
    `Pipeline.astream`.

    Attributes:
        report: The run's report; complete once the stream has ended.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool,
        key: Callable[[Any], str] | None,
        observers: Sequence[Observer],
        collect: bool,
    ) -> None:
        self._names = [stage.name or "" for stage in stages]
        jobs = _prepare_all(stages, ordered=ordered, key=key)
        self._is_command = [job.backend.name == "subprocess" for job in jobs]
        self._queues: list[_Queue | None] = [None] + [_Queue() for _ in stages[1:]]
        self._engines: list[Engine] = []
        for job, queue in zip(jobs, self._queues, strict=True):
            source = items if queue is None else queue
            self._engines.append(build_engine(source, job, None, observers))
        self._streams = [AsyncStream(engine) for engine in self._engines]
        self._tallies = [_Tally() for _ in stages]
        self._output = _Output(ordered)
        self._key_given = key is not None
        self._collect = collect
        self._pumps: list[asyncio.Task[None]] = []
        self._running = len(stages)
        self._stage_done = [False] * len(stages)
        self._stopping: str | None = None
        self._aborted: BaseException | None = None
        self._began = 0.0
        self.report = PipelineReport(run_id=uuid.uuid4().hex[:16])

    # -- the caller's side -------------------------------------------------

    async def start(self) -> None:
        """Start every stage, if the pipeline has not started yet."""
        if self._pumps:
            return
        self.report.started = time.time()
        self._began = time.perf_counter()
        for stream in self._streams:
            await stream.start()
        loop = asyncio.get_running_loop()
        self._pumps = [
            loop.create_task(self._pump(index)) for index in range(len(self._streams))
        ]

    async def __aenter__(self) -> AsyncPipelineStream:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[PipelineOutcome]:
        return self

    async def __anext__(self) -> PipelineOutcome:
        batch = await self.next_batch(1)
        if not batch:
            raise StopAsyncIteration
        return batch[0]

    async def next_batch(self, limit: int = _BATCH) -> list[PipelineOutcome]:
        """Return up to ``limit`` final outcomes, waiting for one; empty at the end.

        Raises:
            RunAbortedError: A stage could not go on; the outcomes that
                arrived before are returned first.
        """
        await self.start()
        batch = await self._output.take(limit)
        if batch or self._aborted is None:
            return batch
        if isinstance(self._aborted, RunAbortedError):
            raise self._aborted
        raise RunAbortedError(
            f"the pipeline could not go on: {self._aborted!r}"
        ) from self._aborted

    def stop(self, reason: str = "interrupted", *, cancel: bool = False) -> None:
        """Stop admission in every stage; with ``cancel``, stop attempts in flight.

        Values that finished one stage but have not started the next end
        ``cancelled`` in that next stage. Items of the input that the first
        stage read but never started get no outcome, as in `stream`.
        """
        if self._stopping is None:
            self._stopping = reason
            log.info("pipeline %s stopping: %s", self.report.run_id, reason)
        self._output.relaxed = True
        for engine, done in zip(self._engines, self._stage_done, strict=True):
            if not done:
                engine.stop(reason, cancel=cancel)

    @contextlib.contextmanager
    def stop_on_signals(self, received: list[int] | None = None) -> Iterator[None]:
        """Stop the pipeline on SIGINT, SIGTERM and SIGHUP while the block runs.

        The first signal stops admission; the second cancels attempts in
        flight. Handlers are installed only on the main thread, where the
        event loop can receive signals; each signal is appended to
        ``received``.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        seen = received if received is not None else []

        def handle(number: int) -> None:
            seen.append(number)
            name = signal.Signals(number).name
            self.stop(f"received {name}", cancel=len(seen) > 1)

        for number in STOP_SIGNALS:
            loop.add_signal_handler(number, handle, number)
        try:
            yield
        finally:
            for number in STOP_SIGNALS:
                loop.remove_signal_handler(number)

    async def aclose(self) -> None:
        """Cancel what is still running and wait until every worker is reaped."""
        if not self._pumps:
            for engine in self._engines:
                if engine.settings.cache is not None:
                    engine.settings.cache.close()
            return
        if not self._output.ended:
            self.stop("the stream was closed", cancel=True)
        self._output.discard()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()

    # -- the stages' side --------------------------------------------------

    async def _pump(self, index: int) -> None:
        """Take stage ``index``'s outcomes and send each on or out."""
        stream = self._streams[index]
        collected = self._engines[index].report.collected
        try:
            while batch := await stream.next_batch(_BATCH):
                # The stage's engine collects outcomes only so that they keep
                # their attempts, which the latencies need; drop them here.
                collected.clear()
                for outcome in batch:
                    await self._forward(index, outcome)
        except Exception as error:
            self._abort(index, error)
        finally:
            collected.clear()
            await self._end_stage(index)

    async def _forward(self, index: int, outcome: Outcome) -> None:
        queue = self._queues[index]
        if queue is None:
            key = outcome.key if self._key_given else None
            origin = _Origin(outcome.seq, key, outcome.item)
        else:
            origin = queue.origin_of(outcome.seq)
        self._tallies[index].add(outcome)
        value = outcome.value
        if outcome.ok and self._is_command[index]:
            value = stdout_text(value)
        if outcome.ok and index + 1 < len(self._queues):
            following = self._queues[index + 1]
            assert following is not None
            if not await following.put(value, origin):
                await self._cancelled(index + 1, origin)
            return
        final = PipelineOutcome(
            origin.seq,
            origin.key,
            origin.item,
            outcome.state,
            stage=self._names[index],
            value=value if outcome.ok else None,
            error=outcome.error,
            attempts=outcome.attempts,
            reason=outcome.reason,
            source=outcome.source,
            strategy=outcome.strategy,
        )
        await self._emit(final)

    async def _cancelled(self, index: int, origin: _Origin) -> None:
        """End an item that a stop kept from running in stage ``index``."""
        self._tallies[index].counts["cancelled"] += 1
        reason = self._stopping or f"stage {self._names[index]!r} ended before the item"
        final = PipelineOutcome(
            origin.seq,
            origin.key,
            origin.item,
            State.CANCELLED,
            stage=self._names[index],
            reason=reason,
        )
        await self._emit(final)

    async def _emit(self, final: PipelineOutcome) -> None:
        report = self.report
        report.counts[final.state.value] += 1
        if final.state is State.FAILED:
            report.failures.add(final.key, final.error, final.item)
        if self._collect:
            report.collected.append(final)
        await self._output.put(final)

    def _abort(self, index: int, error: BaseException) -> None:
        if self._aborted is None:
            self._aborted = error
            # The caller gets the error from the stream, so it is no ERROR here.
            log.info(
                "pipeline %s: stage %r could not go on: %s",
                self.report.run_id,
                self._names[index],
                error,
            )
        self.stop(f"stage {self._names[index]!r} could not go on", cancel=True)

    async def _end_stage(self, index: int) -> None:
        """Settle what stage ``index`` left behind once its engine has ended."""
        self._stage_done[index] = True
        queue = self._queues[index]
        if queue is not None:
            for origin in queue.close_and_drain():
                await self._cancelled(index, origin)
        if index + 1 < len(self._queues):
            following = self._queues[index + 1]
            assert following is not None
            following.end()
        self._running -= 1
        if self._running == 0:
            self._finish_report()
            self._output.end()

    def _finish_report(self) -> None:
        report = self.report
        report.duration = time.perf_counter() - self._began
        report.interrupted = self._stopping is not None
        for name, tally, engine in zip(
            self._names, self._tallies, self._engines, strict=True
        ):
            stage = engine.report
            report.stages.append(tally.finish(name, stage))
            report.abandoned_threads += stage.abandoned_threads
            report.workers_lost += stage.workers_lost
            report.workers_recycled += stage.workers_recycled
            report.memory_kills += stage.memory_kills
            report.rate_limited += stage.rate_limited
            report.cache_hits += stage.cache_hits
        if self._collect:
            report.collected.sort(key=lambda outcome: outcome.seq)
            report.unnumbered = not self._key_given


def stdout_text(result: Any) -> str:
    """Return a command's stdout as a command stage passes it on; see `Stage`.

    Removes the result's spill files, if it had any.
    """
    try:
        data: bytes = result.read_stdout()
    finally:
        result.close()
    text = data.decode("utf-8", "surrogateescape")
    return text[:-1] if text.endswith("\n") else text


def _prepare_all(
    stages: Sequence[Stage], *, ordered: bool, key: Callable[[Any], str] | None
) -> list[Job]:
    """Check every stage and build its backend, before any stage runs.

    Raises:
        ConfigurationError: A stage's task or option is invalid; the
            message names the stage.
    """
    jobs: list[Job] = []
    try:
        for index, stage in enumerate(stages):
            try:
                job = prepare(
                    stage.task,
                    concurrency=stage.concurrency,
                    retry=stage.retry,
                    timeout=stage.timeout,
                    backend=stage.backend,
                    # NOTE: later stages key the values they receive, so
                    # their retry logs and `Context.key` name a value's hash,
                    # not the input item's key.
                    key=key if index == 0 else None,
                    batch_size=stage.batch_size,
                    policies=stage.policies,
                    ordered=ordered,
                    collect=True,
                    shell=stage.shell,
                )
            except ConfigurationError as error:
                raise ConfigurationError(f"stage {stage.name!r}: {error}") from None
            jobs.append(job)
    except BaseException:
        for job in jobs:
            if job.settings.cache is not None:
                job.settings.cache.close()
        raise
    return jobs


class PipelineStream(Stream):
    """Final outcomes of a pipeline as they finish; an iterator and context manager.

    The pipeline runs on a helper thread with its own event loop. Leaving
    the ``with`` block, or breaking out of a ``for`` loop over it, cancels
    every stage and reaps its workers at once. Build one with
    `Pipeline.stream`.
    """

    def __init__(self, inner: AsyncPipelineStream) -> None:
        super().__init__(inner, thread_name="batchtools-pipeline")

    @property
    def report(self) -> PipelineReport:
        """The run's report; complete once the stream has ended."""
        report: PipelineReport = self._inner.report
        return report

    def __enter__(self) -> PipelineStream:
        super().__enter__()
        return self

    def __iter__(self) -> Iterator[PipelineOutcome]:
        return cast(Iterator[PipelineOutcome], super().__iter__())


class Pipeline:
    """Stages applied one after another to a stream of items.

    Each stage is an engine run with its own task, backend, concurrency
    and retry policy. An item enters the next stage as soon as it leaves
    the previous one, and an item that fails in a stage goes no further:
    its outcome names that stage. Example::

        pipeline = Pipeline([
            Stage(fetch, concurrency=20, retry=3, timeout="30s"),
            Stage(parse, backend="process"),
            Stage(["gzip", "-c", "{}"], name="compress"),
        ])
        for outcome in pipeline.stream(urls):
            print(outcome.key, outcome.stage, outcome.state, outcome.value)

    Args:
        stages: `Stage` objects; a bare callable is taken as ``Stage(task)``.

    Raises:
        ConfigurationError: There is no stage, a stage is neither a `Stage`
            nor a callable, two stages have the same name, or a command
            stage has a ``batch_size``.
    """

    def __init__(self, stages: Iterable[Stage | Any]) -> None:
        listed = [
            _as_stage(entry, position) for position, entry in enumerate(stages, 1)
        ]
        if not listed:
            raise ConfigurationError("a pipeline needs at least one stage")
        for position, stage in enumerate(listed, start=1):
            if stage.name is not None and (
                not isinstance(stage.name, str) or not stage.name
            ):
                raise ConfigurationError(
                    f"stage {position} has name={stage.name!r}; give a non-empty "
                    "string or leave it out"
                )
            if _is_command(stage.task) and (stage.batch_size or 1) > 1:
                raise ConfigurationError(
                    f"stage {position} is a command with batch_size="
                    f"{stage.batch_size}; a batched command's output cannot be "
                    "split into one value per item, so leave batch_size out"
                )
        self.stages: tuple[Stage, ...] = tuple(_named(listed))

    def astream(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = False,
        key: Callable[[Any], str] | None = None,
        observers: Sequence[Observer] = (),
    ) -> AsyncPipelineStream:
        """Yield final outcomes as they finish; the async twin of `stream`.

        Raises:
            ConfigurationError: A stage's task or option is invalid; nothing ran.
        """
        return AsyncPipelineStream(
            self.stages,
            items,
            ordered=ordered,
            key=key,
            observers=observers,
            collect=False,
        )

    def stream(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = False,
        key: Callable[[Any], str] | None = None,
        observers: Sequence[Observer] = (),
    ) -> PipelineStream:
        """Yield the final outcome of each item as it finishes, without keeping it.

        Args:
            items: Any iterable, read lazily; an async iterable works too.
            ordered: Yield outcomes in input order. Every stage then keeps
                its own outcomes in order, through bounded reorder buffers.
            key: A function giving each input item's key, instead of a
                content hash.
            observers: Receivers of every stage's engine events. They see
                each stage's own outcomes, whose items are the values the
                stage received; a command's result is still readable there.

        Raises:
            ConfigurationError: A stage's task or option is invalid; nothing ran.
        """
        return PipelineStream(
            self.astream(items, ordered=ordered, key=key, observers=observers)
        )

    async def arun(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        key: Callable[[Any], str] | None = None,
        observers: Sequence[Observer] = (),
        handle_signals: bool = False,
    ) -> PipelineReport:
        """Run every item through the stages and return the report; see `run`."""
        stream = AsyncPipelineStream(
            self.stages,
            items,
            ordered=False,
            key=key,
            observers=observers,
            collect=True,
        )
        async with stream:
            signals = stream.stop_on_signals() if handle_signals else None
            with signals or contextlib.nullcontext():
                while await stream.next_batch():
                    pass
        return stream.report

    def run(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        key: Callable[[Any], str] | None = None,
        observers: Sequence[Observer] = (),
        handle_signals: bool = False,
    ) -> PipelineReport:
        """Run every item through the stages and return the report.

        Failures never raise: each is an outcome in the report. Where an
        event loop already runs in this thread (a notebook), the pipeline
        runs on a helper thread, and a `KeyboardInterrupt` here cancels it.

        Args:
            items: Any iterable, read lazily; an async iterable works too.
            key: A function giving each input item's key, instead of a
                content hash.
            observers: Receivers of every stage's engine events.
            handle_signals: Stop on SIGINT, SIGTERM and SIGHUP (main thread
                only).

        Returns:
            The report, with every final outcome in input order.

        Raises:
            ConfigurationError: A stage's task or option is invalid; nothing ran.
            RunAbortedError: A stage could not go on.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(
                self.arun(
                    items, key=key, observers=observers, handle_signals=handle_signals
                )
            )
        report = _run_on_helper_thread(
            lambda: self.arun(items, key=key, observers=observers)
        )
        assert isinstance(report, PipelineReport)
        return report


def _as_stage(entry: Any, position: int) -> Stage:
    if isinstance(entry, Stage):
        return entry
    if callable(entry) and not _is_command(entry):
        return Stage(entry)
    raise ConfigurationError(
        f"stage {position} is {entry!r}, which is neither a Stage nor a callable; "
        f"wrap it in Stage(), such as Stage({entry!r})"
    )


def _named(stages: list[Stage]) -> Iterator[Stage]:
    """Give each stage its name, making default names unique by position.

    Raises:
        ConfigurationError: Two stages were given the same name.
    """
    defaults = [_default_name(stage) for stage in stages]
    seen: set[str] = set()
    for position, (stage, default) in enumerate(
        zip(stages, defaults, strict=True), start=1
    ):
        name = stage.name
        if name is None:
            name = default if defaults.count(default) == 1 else f"{default}-{position}"
        if name in seen:
            raise ConfigurationError(
                f"two stages are named {name!r}; give each stage its own name"
            )
        seen.add(name)
        yield dataclasses.replace(stage, name=name)


def _default_name(stage: Stage) -> str:
    task = stage.task
    if isinstance(task, CommandTemplate):
        words = task.source.split()
        return "sh" if task.shell or not words else os.path.basename(words[0])
    if isinstance(task, str):
        words = task.split()
        return "sh" if stage.shell or not words else os.path.basename(words[0])
    if isinstance(task, list | tuple) and task:
        return os.path.basename(os.fsdecode(task[0]))
    # An adapter may carry the qualified name of the function it wraps.
    name = getattr(task, "__name__", None) or getattr(task, "__qualname__", None)
    return str(name or type(task).__name__).rsplit(".", 1)[-1]
