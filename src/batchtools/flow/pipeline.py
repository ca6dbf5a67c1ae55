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
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

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
    Outcome,
    State,
)
from batchtools.flow._pipeline_buffers import (
    _Origin,
    _Output,
    _Queue,
    _Tally,
)
from batchtools.flow._pipeline_report import (
    PipelineOutcome,
    PipelineReport,
    StageReport,
)
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.retry import Retry

__all__ = [
    "AsyncPipelineStream",
    "Pipeline",
    "PipelineOutcome",
    "PipelineReport",
    "PipelineStream",
    "Stage",
    "StageReport",
    "stdout_text",
]

log = logging.getLogger("batchtools.flow")

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
