"""Dependency graphs: named tasks that start as soon as what they need succeeded.

`graphlib.TopologicalSorter` decides which tasks are ready, and the engine
runs them. The glue is written here because neither does the other's job:
graphlib runs nothing, and the engine has no notion of dependencies. Data flow::

    TopologicalSorter --keys of ready tasks--> _ReadyTasks (item source)
        --> graph engine (async backend, one item per task)
            --> _GraphRun.dispatch
                  plain callable: awaited, or run on a thread
                  task over items, command, task with options:
                      an engine of its own, run from inside dispatch
        --> outcome --> _GraphRun.on_outcome (an engine observer)
              succeeded: sorter.done(), newly ready tasks go to the source
              failed: every dependent, transitively, is skipped

Every single-operation task is an item of one engine, so a graph of
100,000 small tasks costs one engine, not 100,000. The source offers a
task only once all it needs has succeeded, so each task starts as soon as
its own dependencies are done, not when a whole level is.

With a journal, the graph's journal contains one item per task, keyed by
the task's name, so ``batchtools status`` reads it. Each task over items has a
journal of its own (see `task_journal_path`). A second run of the same
graph skips the tasks that succeeded, resumes tasks over items item by
item, and runs again what failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import graphlib
import logging
import os
import signal
import threading
import time
from collections.abc import (
    AsyncIterable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import MappingProxyType
from typing import Any, cast

from batchtools._exceptions import (
    ConfigurationError,
    GraphCycleError,
    ItemsFailedError,
    JournalError,
    RunAbortedError,
)
from batchtools.backends._base import Context, TaskSpec
from batchtools.engine._api import (
    STOP_SIGNALS,
    _run_on_helper_thread,
    build_engine,
    cpu_count,
    open_journal,
    prepare,
)
from batchtools.engine._engine import Engine, Interrupted, Observer
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.flow._graph_plan import (
    Allowance,
    CriticalPath,
    GraphReport,
    Task,
    TaskResult,
    check_needs,
    critical_path,
    discard_job,
    is_command,
    levels,
    parse_estimate,
    prepare_task,
    prepared_sorter,
    signature,
    summary_lines,
    task_journal_path,
    task_key,
)
from batchtools.policy._units import parse_duration
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.retry import Retry

__all__ = [
    "CriticalPath",
    "Graph",
    "GraphCycleError",
    "GraphReport",
    "ItemsFailedError",
    "Task",
    "TaskResult",
    "summary_lines",
]

log = logging.getLogger("batchtools.flow")

# A second run of a graph runs every task and item that has not succeeded.
_RERUN = ("pending", "running", "retrying", "cancelled", "failed", "skipped")
_INLINE_ASYNC, _INLINE_THREAD, _OWN_ENGINE = "async", "thread", "engine"

TaskObservers = Callable[[Task], Sequence[Observer]]


class Graph:
    """Named tasks and the tasks each one needs.

    Example::

        graph = Graph()
        graph.add("thumbs", ["convert", "{}", "thumbs/{/.}.png"], items=photos)
        graph.add("index", build_index, needs=["thumbs"])
        report = graph.run(journal="runs/site.db")
    """

    def __init__(self) -> None:
        self._tasks: dict[Hashable, Task] = {}
        self._keys: set[str] = set()
        # One TaskSpec per distinct callable: inspecting a signature costs
        # more than scheduling a small task, and many tasks share a function.
        self._specs: dict[int, tuple[TaskSpec, bool]] = {}

    def __repr__(self) -> str:
        return f"<Graph of {len(self._tasks)} tasks>"

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    @property
    def tasks(self) -> Mapping[Hashable, Task]:
        """The tasks by name, in the order they were added."""
        return MappingProxyType(self._tasks)

    def add(
        self,
        name: Hashable,
        operation: Any,
        *,
        needs: Iterable[Hashable] | str = (),
        items: Iterable[Any] | AsyncIterable[Any] | Callable[[], Any] | None = None,
        concurrency: int | str | Concurrency | None = None,
        retry: Retry | int | None = None,
        timeout: float | str | None = None,
        backend: str | None = None,
        batch_size: int | None = None,
        policies: Sequence[object] = (),
        shell: bool = False,
        env: Mapping[str, str] | None = None,
        allow_failures: bool | int | str | None = None,
        estimate: float | str | None = None,
    ) -> Task:
        """Add a task; it starts once every task it ``needs`` has succeeded.

        Names may be added in any order: ``needs`` is checked by `check`,
        which every run calls first.

        Args:
            name: A unique, hashable name, such as ``"thumbs"``.
            operation: A callable (sync or async) or a command template. A
                single-operation task calls it once with no arguments, or
                with only ``context=`` if it takes one. A task over items
                applies it to each item, as `run` does.
            needs: Names of the tasks that must succeed first.
            items: Makes this a task over these items: an iterable,
                or a function called when the task starts, so that it can
                list what earlier tasks made.
            concurrency: Items of a task over items that run at once.
            retry: Retries after the first attempt, or a `Retry` policy.
            timeout: Seconds (or ``"30s"``) one attempt may take.
            backend: ``async``, ``thread``, ``process`` or ``subprocess``.
            batch_size: Items handed to one call of a task over items.
            policies: Policy objects, as `run` takes them.
            shell: Run the command template through ``/bin/sh``.
            env: The environment of the task's commands.
            allow_failures: Failed items a task over items may have and still
                succeed: ``True`` for any number, a count, or a percentage
                such as ``"5%"``. By default, none.
            estimate: Expected duration (seconds or ``"5m"``), used only to
                weigh the critical path.

        Returns:
            The task.

        Raises:
            ConfigurationError: The name is taken, or an option is invalid
                for this kind of task.
        """
        key = self._check_name(name)
        needs_tuple = _needs(needs, key)
        spec, is_async = self._spec(operation, key)
        if spec is not None and (shell or env is not None):
            raise ConfigurationError(
                f"task {key!r}: shell and env apply to command templates, and "
                "the operation is a callable"
            )
        if items is None:
            for option, value in (
                ("concurrency", concurrency),
                ("batch_size", batch_size),
                ("allow_failures", allow_failures),
            ):
                if value is not None:
                    raise ConfigurationError(
                        f"task {key!r}: {option} applies to a task over items; "
                        "give items=, or drop the option"
                    )
        elif isinstance(items, str | bytes) or not (
            isinstance(items, Iterable | AsyncIterable) or callable(items)
        ):
            # A string is iterable, but as items its characters are a mistake.
            raise ConfigurationError(
                f"task {key!r}: items={items!r} must be an iterable of items, or "
                "a function that returns one"
            )
        try:
            Retry.coerce(retry)
        except ConfigurationError as error:
            raise ConfigurationError(f"task {key!r}: {error}") from None
        if timeout is not None:
            parse_duration(timeout, name=f"timeout of task {key!r}")
        task = Task(
            name=name,
            key=key,
            operation=operation,
            needs=needs_tuple,
            items=items,
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            backend=backend,
            batch_size=batch_size,
            policies=tuple(policies),
            shell=shell,
            env=env,
            allowance=Allowance.parse(allow_failures, task=key),
            estimate=parse_estimate(estimate, task=key),
            spec=spec,
            is_async=is_async,
        )
        self._tasks[name] = task
        self._keys.add(key)
        return task

    def _check_name(self, name: Hashable) -> str:
        try:
            hash(name)
        except TypeError:
            raise ConfigurationError(
                f"task name {name!r} is not hashable; use a string"
            ) from None
        key = task_key(name)
        if name in self._tasks or key in self._keys:
            raise ConfigurationError(
                f"task {key!r} is already in the graph; give each task its own name"
            )
        return key

    def _spec(self, operation: Any, key: str) -> tuple[TaskSpec | None, bool]:
        if is_command(operation):
            return None, False
        if not callable(operation):
            raise ConfigurationError(
                f"task {key!r}: the operation {operation!r} is neither a callable "
                "nor a command template"
            )
        known = self._specs.get(id(operation))
        if known is None:
            spec = TaskSpec.from_callable(operation)
            known = self._specs[id(operation)] = (spec, spec.is_async)
        return known

    def check(self) -> None:
        """Check the whole graph before anything runs.

        Raises:
            ConfigurationError: A task needs a name that is not a task (the
                message suggests the closest name), two tasks over items
                would share a journal file, or a task's options are invalid.
            GraphCycleError: The dependencies form a cycle.
        """
        self._checked_sorter()

    def _checked_sorter(self) -> graphlib.TopologicalSorter[Hashable]:
        """Check the graph as `check` does; return its sorter, prepared."""
        check_needs(self._tasks)
        sorter = prepared_sorter(self._tasks)
        journals: dict[str, str] = {}
        for task in self._tasks.values():
            if task.has_items:
                # Lower case, since macOS file names ignore case by default.
                path = str(task_journal_path("graph", task.key)).lower()
                other = journals.setdefault(path, task.key)
                if other != task.key:
                    raise ConfigurationError(
                        f"tasks {other!r} and {task.key!r} differ only in case, "
                        "so their journal files would be the same; rename one"
                    )
            if not task.runs_inline:
                discard_job(prepare_task(task))
        return sorter

    def levels(self) -> list[list[Hashable]]:
        """Return the tasks grouped into levels, each needing only earlier ones.

        Raises:
            ConfigurationError: The graph is invalid; see `check`.
        """
        check_needs(self._tasks)
        return levels(self._tasks)

    def critical_path(self) -> CriticalPath:
        """Return the longest chain of dependencies; see `CriticalPath`.

        Raises:
            ConfigurationError: The graph is invalid; see `check`.
        """
        check_needs(self._tasks)
        return critical_path(self._tasks)

    async def arun(
        self,
        *,
        concurrency: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        force: bool = False,
        observers: Sequence[Observer] = (),
        task_observers: TaskObservers | None = None,
        handle_signals: bool = False,
    ) -> GraphReport:
        """Run the graph and return its report; see `run`."""
        sorter = self._checked_sorter()
        graph_run = _GraphRun(
            dict(self._tasks),
            sorter,
            concurrency=concurrency,
            journal=journal,
            force=force,
            observers=observers,
            task_observers=task_observers,
        )
        return await graph_run.run(handle_signals=handle_signals)

    def run(
        self,
        *,
        concurrency: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        force: bool = False,
        observers: Sequence[Observer] = (),
        task_observers: TaskObservers | None = None,
        handle_signals: bool = False,
    ) -> GraphReport:
        """Run every task once what it needs has succeeded; return the report.

        A failed task never raises: its dependents are skipped, with a
        reason that names it, and independent tasks go on.

        Args:
            concurrency: Tasks that run at once, like ``make -j``; the
                default is the number of CPUs. A task over items counts as one
                and runs its items with its own ``concurrency``.
            journal: The graph's journal file. An existing one is resumed:
                tasks that succeeded are skipped, tasks over items resume item
                by item, and what failed runs again.
            force: Resume a journal made by a different graph.
            observers: Receivers of the graph engine's events: one outcome
                per task that ran, whose item is the task's key.
            task_observers: Returns the observers of one task's own engine
                (tasks over items, commands, tasks with options), such as a
                writer of each command's output.
            handle_signals: Stop on SIGINT, SIGTERM and SIGHUP (main thread
                only): the first lets running tasks finish, the second
                cancels them.

        Returns:
            The report, with each task's state.

        Raises:
            ConfigurationError: The graph is invalid; nothing ran.
            GraphCycleError: The dependencies form a cycle; nothing ran.
            JournalError: The journal cannot be used; nothing ran.
            RunAbortedError: A journal failed during the run; what was
                committed is kept.
        """
        options: dict[str, Any] = {
            "concurrency": concurrency,
            "journal": journal,
            "force": force,
            "observers": observers,
            "task_observers": task_observers,
        }
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(handle_signals=handle_signals, **options))
        # An event loop runs here (a notebook): run on a helper thread.
        finished = _run_on_helper_thread(lambda: self.arun(**options))
        return cast(GraphReport, finished)


def _needs(needs: Iterable[Hashable] | str, key: str) -> tuple[Hashable, ...]:
    if isinstance(needs, str):
        return (needs,)
    try:
        names = tuple(dict.fromkeys(needs))
    except TypeError:
        raise ConfigurationError(
            f"task {key!r}: needs={needs!r} must be a list of task names"
        ) from None
    return names


class _ReadyTasks:
    """The graph engine's item source: the keys of tasks ready to start.

    A blocking iterator, which the engine pulls on a helper thread, rather
    than an async one. The engine reads an async source one item at a time,
    and each read wakes every idle worker coroutine. The helper thread
    hands over all ready tasks at once instead. On 10,000 independent no-op
    tasks at concurrency 100 (2-CPU Linux VM), an async source cost about
    650 us a task and this one about 25 us.

    It ends when no task is ready and none is running, since then no task
    can become ready any more.
    """

    def __init__(self, graph_run: _GraphRun) -> None:
        self._run = graph_run

    def __iter__(self) -> _ReadyTasks:
        return self

    def __next__(self) -> str:
        graph_run = self._run
        with graph_run.condition:
            ready = graph_run.ready
            while not ready:
                if graph_run.closed or graph_run.yielded == graph_run.finished:
                    raise StopIteration
                graph_run.condition.wait()
            graph_run.yielded += 1
            return ready.popleft()


class _GraphRun:
    """One run of a graph: the item source's state, dispatcher and observer.

    The engine's helper thread reads ``ready``, ``yielded`` and ``closed``
    and the event loop changes them, so both hold ``condition`` to do so.
    """

    def __init__(
        self,
        tasks: dict[Hashable, Task],
        sorter: graphlib.TopologicalSorter[Hashable],
        *,
        concurrency: int | None,
        journal: str | os.PathLike[str] | None,
        force: bool,
        observers: Sequence[Observer],
        task_observers: TaskObservers | None,
    ) -> None:
        self.tasks = {task.key: task for task in tasks.values()}
        self.names = {task.key: name for name, task in tasks.items()}
        self.seqs = {key: seq for seq, key in enumerate(self.tasks)}
        self.results = {task.key: TaskResult(task.name) for task in tasks.values()}
        self.kinds = {key: _kind(task) for key, task in self.tasks.items()}
        self.dependents: dict[str, list[str]] = collections.defaultdict(list)
        for key, task in self.tasks.items():
            for need in task.needs:
                self.dependents[task_key(need)].append(key)

        # The sorter works on names; the engine's items are the keys.
        self.sorter = sorter
        self.condition = threading.Condition()
        self.ready = collections.deque(map(task_key, sorter.get_ready()))
        self.yielded = 0
        self.finished = 0
        self.closed = False

        self.engines: set[Engine] = set()
        self.stopping: str | None = None
        self.cancelling = False
        self.aborted: BaseException | None = None
        self.received: list[int] = []
        self.journal_path = journal
        self.force = force
        self.task_observers = task_observers

        job = prepare(
            self.dispatch,
            concurrency=concurrency if concurrency is not None else cpu_count(),
            backend="async",
            key=_same_key,
        )
        self.journal = None
        if journal is not None:
            job.signature = signature(tasks)
            job.spec = {"graph": {"tasks": len(tasks)}}
            self.journal = open_journal(journal, job, force=force)
        self.engine = build_engine(
            _ReadyTasks(self), job, self.journal, [self, *observers], rerun=_RERUN
        )
        self.run_id = self.engine.run_id

    async def run(self, *, handle_signals: bool) -> GraphReport:
        """Run the graph engine to its end and build the report.

        Raises:
            RunAbortedError: A journal failed; what was committed is kept.
        """
        began = time.perf_counter()
        try:
            with self._signal_handlers(handle_signals):
                engine_report = await self.engine.run()
        finally:
            # Let the helper thread end if it still waits for a ready task.
            with self.condition:
                self.closed = True
                self.condition.notify_all()
        if self.aborted is not None:
            raise RunAbortedError(str(self.aborted)) from self.aborted
        interrupted = engine_report.interrupted or self.stopping is not None
        why = f" ({self.stopping})" if self.stopping else ""
        for result in self.results.values():
            if result.state is State.PENDING and interrupted:
                result.reason = f"not started: the run stopped{why}"
        return GraphReport(
            run_id=self.run_id,
            tasks={self.names[key]: result for key, result in self.results.items()},
            duration=time.perf_counter() - began,
            interrupted=interrupted,
            journal=None if self.journal_path is None else str(self.journal_path),
            signals=list(self.received),
        )

    # -- running one task ------------------------------------------------

    async def dispatch(self, key: str) -> Any:
        """Run the task ``key`` once; the graph engine records the outcome."""
        task = self.tasks[key]
        result = self.results[key]
        result.started = time.time()
        result.began = time.perf_counter()
        kind = self.kinds[key]
        if kind is _OWN_ENGINE:
            return await self._run_own_engine(task, result)
        assert task.spec is not None
        function = task.operation
        if task.spec.wants_context:
            seq = self.seqs[key]
            context = Context(self.run_id, key, 1, seq, f"{self.run_id}:{key}")
            function = functools.partial(function, context=context)
        if kind is _INLINE_ASYNC:
            return await function()
        # asyncio's default executor: at most min(32, CPUs + 4) threads at once.
        return await asyncio.to_thread(function)

    async def _run_own_engine(self, task: Task, result: TaskResult) -> Any:
        """Run a task over items, a command or a task with options on an engine."""
        job = prepare_task(task, self.run_id)
        # A single operation is one item, which renders to no argument.
        items: Any = [()]
        journal = None
        try:
            if task.has_items:
                items = task.items() if callable(task.items) else task.items
            if self.journal_path is not None and task.has_items:
                path = task_journal_path(self.journal_path, task.key)
                journal = open_journal(path, job, force=self.force)
        except JournalError as error:
            discard_job(job)
            self._abort(error)
            raise Interrupted(f"the journal of task {task.key} failed") from error
        except BaseException:
            discard_job(job)
            raise

        observers = self.task_observers(task) if self.task_observers else ()
        engine = build_engine(
            items, job, journal, observers, rerun=_RERUN if journal else None
        )
        self.engines.add(engine)
        if self.stopping is not None:
            engine.stop(self.stopping, cancel=self.cancelling)
        try:
            report = await engine.run()
        except RunAbortedError as error:
            self._abort(error)
            raise Interrupted(f"task {task.key} could not go on") from error
        finally:
            self.engines.discard(engine)

        if task.has_items:
            result.report = report
        if report.interrupted:
            # A single operation that ended before the stop took effect is
            # done, and must not run again on resume.
            done = not task.has_items and report.counts["succeeded"] == 1
            if not done:
                raise Interrupted(self.stopping or "the task's run was interrupted")
        if task.has_items:
            _judge(task, report)
            return None
        outcome = report.outcomes[0]
        if outcome.state is State.SUCCEEDED:
            return outcome.value
        if outcome.error is not None:
            raise outcome.error
        raise Interrupted(outcome.reason or outcome.state.value)

    # -- observing outcomes ----------------------------------------------

    def on_start(self, engine: Engine) -> None:
        """Receive the start of the graph engine's run."""

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        """Receive a retry; the graph engine itself never retries."""

    def on_finish(self, report: Report) -> None:
        """Receive the graph engine's report."""

    def on_outcome(self, outcome: Outcome) -> None:
        """Record a task's outcome, and release or skip its dependents."""
        key = outcome.item
        result = self.results[key]
        result.state = outcome.state
        result.source = outcome.source
        if result.began:
            result.duration = time.perf_counter() - result.began
        newly_ready: tuple[str, ...] = ()
        if outcome.state is State.SUCCEEDED:
            result.value = outcome.value
            self.sorter.done(self.names[key])
            newly_ready = tuple(map(task_key, self.sorter.get_ready()))
        elif outcome.state is State.FAILED:
            result.error = outcome.error
            self._skip_dependents(key)
        else:
            result.reason = outcome.reason
        with self.condition:
            self.finished += 1
            self.ready.extend(newly_ready)
            self.condition.notify()

    def _skip_dependents(self, failed: str) -> None:
        """Skip every task that needs ``failed``, directly or through others."""
        stack = [(dependent, failed) for dependent in self.dependents[failed]]
        while stack:
            key, through = stack.pop()
            result = self.results[key]
            if result.state is not State.PENDING:
                continue
            result.state = State.SKIPPED
            if through == failed:
                result.reason = f"needs {failed}, which failed"
            else:
                result.reason = (
                    f"needs {through}, which was skipped because {failed} failed"
                )
            if self.journal is not None:
                # NOTE: a skipped task is an event, not an item, of the journal:
                # the engine registers only the items it reads, so
                # `batchtools status` counts no skipped tasks.
                self.journal.event(
                    "task-skipped", {"task": key, "reason": result.reason}
                )
            stack.extend((dependent, key) for dependent in self.dependents[key])

    # -- stopping --------------------------------------------------------

    def stop(self, reason: str, *, cancel: bool) -> None:
        """Stop starting tasks and items; with ``cancel``, stop what runs too."""
        if self.stopping is None:
            self.stopping = reason
        self.cancelling = self.cancelling or cancel
        self.engine.stop(reason, cancel=cancel)
        for engine in list(self.engines):
            engine.stop(reason, cancel=cancel)

    def _abort(self, error: BaseException) -> None:
        if self.aborted is None:
            self.aborted = error
            log.error("graph run %s cannot go on: %s", self.run_id, error)
        self.stop(f"the run could not go on: {error}", cancel=True)

    @contextlib.contextmanager
    def _signal_handlers(self, enabled: bool) -> Iterator[None]:
        """Stop the graph on SIGINT, SIGTERM and SIGHUP while the block runs.

        Written here rather than with the engine's `signal_handlers`, because
        a signal must reach the engine of every running task too.
        """
        # NOTE: SIGTSTP (Ctrl-Z) is not handled. It stops this process but not
        # the commands of running tasks, because they have process groups of
        # their own, and their timeouts keep running meanwhile.
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for number in STOP_SIGNALS:
            loop.add_signal_handler(number, self._on_signal, number)
        try:
            yield
        finally:
            for number in STOP_SIGNALS:
                loop.remove_signal_handler(number)

    def _on_signal(self, number: int) -> None:
        self.received.append(number)
        name = signal.Signals(number).name
        self.stop(f"received {name}", cancel=len(self.received) > 1)


def _same_key(item: str) -> str:
    return item


def _kind(task: Task) -> str:
    if not task.runs_inline:
        return _OWN_ENGINE
    return _INLINE_ASYNC if task.is_async else _INLINE_THREAD


def _judge(task: Task, report: Report) -> None:
    """Raise `ItemsFailedError` if more items failed than the task allows."""
    not_succeeded = report.total - report.counts["succeeded"]
    if task.allowance.allows(not_succeeded, report.total):
        return
    groups = report.failures.most_common()
    raise ItemsFailedError(
        task.key,
        not_succeeded,
        report.total,
        task.allowance.describe(),
        groups[0].cause if groups else None,
    )
