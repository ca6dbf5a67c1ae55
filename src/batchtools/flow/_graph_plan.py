"""Tasks of a dependency graph, and the checks and plans made before it runs.

Ordering and cycle detection come from the standard library's
`graphlib.TopologicalSorter`. This module adds what graphlib leaves to its
caller. That is an error for a dependency that names no task, and a cycle
message in the direction of ``needs`` that starts at the task declared
first. It is also the levels for a dry run, the critical path, the
graph's signature for the journal, and the journal path of each task over
items. The job of a task's own engine and the report of a run are built
here too.
"""

from __future__ import annotations

import collections
import difflib
import functools
import graphlib
import hashlib
import inspect
import json
import os
import re
from collections.abc import (
    AsyncIterable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchtools._exceptions import (
    CommandFailedError,
    ConfigurationError,
    GraphCycleError,
    ItemsFailedError,
    RemoteError,
)
from batchtools.backends._base import TaskSpec
from batchtools.engine._api import Job, prepare
from batchtools.engine._outcome import Report, State, cause_of
from batchtools.observe._summary import format_duration
from batchtools.observe._summary import summary_lines as batch_summary_lines
from batchtools.policy._units import parse_duration
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.retry import Retry

# A task name used as is in the file name of its journal; others are hashed.
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?)\s*%\s*")


@dataclass(frozen=True, slots=True)
class Allowance:
    """How many items of a task over items may fail while the task still succeeds.

    Attributes:
        count: At most this many items; ``None`` when a share or no limit applies.
        percent: At most this share (0 to 100) of the items.
    """

    count: int | None = 0
    percent: float | None = None

    @classmethod
    def parse(cls, value: bool | int | str | None, *, task: str) -> Allowance:
        """Read ``allow_failures``: ``True``, a count, or a percentage such as "5%".

        Raises:
            ConfigurationError: The value is negative, above 100%, or of
                another type.
        """
        if value is None or value is False:
            return cls(0)
        if value is True:
            return cls(None)
        if isinstance(value, int) and value >= 0:
            return cls(value)
        match = _PERCENT.fullmatch(value) if isinstance(value, str) else None
        if match is not None and float(match[1]) <= 100:
            return cls(None, float(match[1]))
        raise ConfigurationError(
            f"task {task!r}: invalid allow_failures {value!r}; give True, a count "
            "of items such as 3, or a percentage such as '5%'"
        )

    def allows(self, failed: int, total: int) -> bool:
        """Return whether ``failed`` of ``total`` items may fail under the allowance."""
        if self.count is not None:
            return failed <= self.count
        if self.percent is not None:
            return failed * 100 <= self.percent * total
        return True

    def describe(self) -> str:
        """Return the allowance as text for messages."""
        if self.count is not None:
            return f"{self.count} item{'' if self.count == 1 else 's'}"
        if self.percent is not None:
            return f"{self.percent:g}%"
        return "any number"


@dataclass(frozen=True, slots=True, eq=False)
class Task:
    """A named task of a graph: one operation, or an operation over items.

    Build tasks with `Graph.add`, which checks the options.

    Attributes:
        name: The task's name, unique in its graph.
        key: The name as text (a string as it is, anything else as its
            repr): the task's key in the journal and in messages.
        operation: A callable (sync or async), or a command template.
        needs: Names of the tasks that must succeed before this one starts.
        items: For a task over items, its items, or a function that returns
            them when the task starts; ``None`` for a single operation.
        concurrency: Items of a task over items that run at once.
        retry: Retries after the first attempt, or a `Retry` policy.
        timeout: Seconds (or text such as ``"30s"``) one attempt may take.
        backend: ``async``, ``thread``, ``process`` or ``subprocess``.
        batch_size: Items handed to one call of a task over items.
        policies: Policy objects of the task's engine, as in `run`.
        shell: Run the command template through ``/bin/sh``.
        env: The environment of the task's commands.
        allow_failures: Failed items a task over items may have and still succeed.
        estimate: Expected seconds, used only to weigh the critical path.
        spec: How the backends see a callable operation; ``None`` for a
            command.
        is_async: Whether the operation is a coroutine function.
    """

    name: Hashable
    key: str
    operation: Any
    needs: tuple[Hashable, ...] = ()
    items: Iterable[Any] | AsyncIterable[Any] | Callable[[], Any] | None = None
    concurrency: int | str | Concurrency | None = None
    retry: Retry | int | None = None
    timeout: float | str | None = None
    backend: str | None = None
    batch_size: int | None = None
    policies: Sequence[object] = ()
    shell: bool = False
    env: Mapping[str, str] | None = None
    allowance: Allowance = Allowance()
    estimate: float | None = None
    spec: TaskSpec | None = None
    is_async: bool = False

    @property
    def has_items(self) -> bool:
        """Whether the task runs over items."""
        return self.items is not None

    @property
    def is_command(self) -> bool:
        """Whether the operation is a command template."""
        return self.spec is None

    @property
    def runs_inline(self) -> bool:
        """Whether the task is a plain call that needs no engine of its own.

        A single callable without options is awaited, or run on a thread,
        by the graph's own engine. Any option that the engine applies per
        run (retries, a timeout, a backend other than the callable's own,
        policies) gives the task an engine of its own.
        """
        if self.has_items or self.spec is None:
            return False
        if self.retry or self.timeout is not None or self.policies:
            return False
        natural = "async" if self.is_async else "thread"
        return self.backend in (None, natural)


def task_key(name: Hashable) -> str:
    """Return a task name as text: a string as it is, anything else as its repr."""
    return name if isinstance(name, str) else repr(name)


def is_command(operation: Any) -> bool:
    """Return whether ``operation`` is a command template rather than a callable."""
    from batchtools.backends._command import CommandTemplate

    if isinstance(operation, str | CommandTemplate):
        return True
    return isinstance(operation, list | tuple) and all(
        isinstance(part, str | bytes) for part in operation
    )


def operation_name(task: Task) -> str:
    """Return a stable description of the task's operation, for the signature."""
    from batchtools.backends._command import CommandTemplate

    operation = task.operation
    if task.spec is not None:
        return task.spec.name
    if isinstance(operation, CommandTemplate):
        return operation.text
    return CommandTemplate.parse(operation, shell=task.shell).text


def parse_estimate(value: float | str | None, *, task: str) -> float | None:
    """Return an ``estimate`` in seconds.

    Raises:
        ConfigurationError: The value is not a positive duration.
    """
    if value is None:
        return None
    return parse_duration(value, name=f"estimate of task {task!r}")


def check_needs(tasks: Mapping[Hashable, Task]) -> None:
    """Reject a dependency that names no task, suggesting the closest name.

    Raises:
        ConfigurationError: Some task needs a name that is not a task.
    """
    keys: list[str] | None = None
    for task in tasks.values():
        for need in task.needs:
            if need in tasks:
                continue
            if keys is None:
                keys = [task_key(name) for name in tasks]
            close = difflib.get_close_matches(task_key(need), keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"task {task.key!r} needs {task_key(need)!r}, which is not a "
                f"task of the graph{hint}"
            )


def prepared_sorter(
    tasks: Mapping[Hashable, Task],
) -> graphlib.TopologicalSorter[Hashable]:
    """Return a sorter over the tasks, prepared, so that nothing is done yet.

    Raises:
        GraphCycleError: The dependencies form a cycle; the error names it.
    """
    sorter = sorter_of(tasks)
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        raise GraphCycleError(_oriented(error.args[1], tasks)) from None
    return sorter


def _oriented(found: list[Hashable], tasks: Mapping[Hashable, Task]) -> list[Hashable]:
    """Turn graphlib's cycle into one in the direction of ``needs``.

    graphlib lists each node before the nodes that depend on it. Reversed,
    each task needs the next. The cycle is then rotated to start at the
    task declared first, so that the message does not depend on the order
    in which graphlib walked the graph.
    """
    ring = list(reversed(found))[:-1]
    order = {name: index for index, name in enumerate(tasks)}
    start = min(range(len(ring)), key=lambda i: order[ring[i]])
    ring = ring[start:] + ring[:start]
    return [*ring, ring[0]]


def sorter_of(tasks: Mapping[Hashable, Task]) -> graphlib.TopologicalSorter[Hashable]:
    """Return a sorter over the tasks, in declaration order."""
    sorter: graphlib.TopologicalSorter[Hashable] = graphlib.TopologicalSorter()
    for name, task in tasks.items():
        sorter.add(name, *task.needs)
    return sorter


def levels(tasks: Mapping[Hashable, Task]) -> list[list[Hashable]]:
    """Group the tasks into levels: each needs only tasks of earlier levels.

    Listing the levels in turn gives a valid order to run the tasks in.
    Inside a level, tasks keep their declaration order.

    Raises:
        GraphCycleError: The dependencies form a cycle.
    """
    sorter = prepared_sorter(tasks)
    order = {name: index for index, name in enumerate(tasks)}
    grouped: list[list[Hashable]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=order.__getitem__)
        grouped.append(ready)
        sorter.done(*ready)
    return grouped


@dataclass(frozen=True, slots=True)
class CriticalPath:
    """The longest chain of dependencies in a graph.

    Attributes:
        tasks: The chain, from the first task to start to the last.
        length: Its total estimate in seconds, or its number of tasks when
            no task has an estimate.
        by_estimate: Whether ``length`` adds estimates rather than counts tasks.
    """

    tasks: list[Hashable]
    length: float
    by_estimate: bool


def critical_path(tasks: Mapping[Hashable, Task]) -> CriticalPath:
    """Return the longest chain of dependencies.

    When any task has an ``estimate``, chains are weighed by their estimates
    (a task without one weighs nothing); otherwise by their number of tasks.
    Of chains of equal weight, the one with more tasks wins, then the one
    through earlier-declared tasks.

    Raises:
        GraphCycleError: The dependencies form a cycle.
    """
    by_estimate = any(task.estimate is not None for task in tasks.values())
    # Per task: the (weight, number of tasks) of the longest chain ending there.
    longest: dict[Hashable, tuple[float, int]] = {}
    before: dict[Hashable, Hashable | None] = {}
    for level in levels(tasks):
        for name in level:
            task = tasks[name]
            weight = (task.estimate or 0.0) if by_estimate else 1.0
            heaviest: Hashable | None = None
            for need in task.needs:
                if heaviest is None or longest[need] > longest[heaviest]:
                    heaviest = need
            before[name] = heaviest
            weight_before, count = (
                longest[heaviest] if heaviest is not None else (0.0, 0)
            )
            longest[name] = (weight_before + weight, count + 1)
    if not longest:
        return CriticalPath([], 0.0, by_estimate)
    end = max(tasks, key=longest.__getitem__)
    chain: list[Hashable] = []
    cursor: Hashable | None = end
    while cursor is not None:
        chain.append(cursor)
        cursor = before[cursor]
    chain.reverse()
    return CriticalPath(chain, longest[end][0], by_estimate)


def signature(tasks: Mapping[Hashable, Task]) -> str:
    """Return the hash that a resumed graph must match: tasks, needs, operations."""
    description = sorted(
        [
            task.key,
            sorted(task_key(need) for need in task.needs),
            operation_name(task),
            task.has_items,
        ]
        for task in tasks.values()
    )
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def task_journal_path(journal: str | os.PathLike[str], key: str) -> Path:
    """Return the journal file of one task over items, next to the graph's journal.

    A name that is safe in a file name is used as it is. Any other name is
    replaced by its hash, so that no name can reach outside the folder.
    """
    stem = key
    if not _SAFE_FILE_NAME.fullmatch(key):
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        stem = f"task-{digest[:16]}"
    return Path(f"{os.fspath(journal)}.tasks") / f"{stem}.db"


# -- the job of a task's own engine --------------------------------------------


def prepare_task(task: Task, run_id: str | None = None) -> Job:
    """Check a task's options and build the job of its own engine.

    Raises:
        ConfigurationError: An option is invalid; the message names the task.
    """
    operation = task.operation
    key = None
    if not task.has_items:
        if task.spec is not None:
            operation = _call_once(task.spec)
        key = functools.partial(_constant, task.key)
    try:
        job = prepare(
            operation,
            concurrency=task.concurrency,
            retry=task.retry,
            timeout=task.timeout,
            backend=task.backend,
            batch_size=task.batch_size,
            policies=task.policies,
            shell=task.shell,
            env=task.env,
            key=key,
            collect=not task.has_items,
        )
    except ConfigurationError as error:
        raise ConfigurationError(f"task {task.key!r}: {error}") from error
    if run_id is not None:
        job.settings.run_id = run_id
    return job


def _constant(value: str, item: object) -> str:
    return value


def discard_job(job: Job) -> None:
    """Release what `prepare` opened for a job that will not run."""
    if job.settings.cache is not None:
        job.settings.cache.close()


class _CallOnce:
    """A single-operation callable as an engine task: the item is ignored."""

    def __init__(self, spec: TaskSpec) -> None:
        self.function = spec.function
        self.wants_context = spec.wants_context
        # The engine names the task after these, for messages and signatures.
        self.__qualname__ = spec.name.partition(":")[2]
        self.__module__ = spec.name.partition(":")[0]

    @property
    def __signature__(self) -> inspect.Signature:
        parameters = [inspect.Parameter("item", inspect.Parameter.POSITIONAL_ONLY)]
        if self.wants_context:
            parameters.append(
                inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY)
            )
        return inspect.Signature(parameters)

    def __call__(self, item: object, **context: Any) -> Any:
        return self.function(**context)


class _AsyncCallOnce(_CallOnce):
    async def __call__(self, item: object, **context: Any) -> Any:
        return await self.function(**context)


def _call_once(spec: TaskSpec) -> _CallOnce:
    return _AsyncCallOnce(spec) if spec.is_async else _CallOnce(spec)


# -- the report ------------------------------------------------------------------


@dataclass(slots=True)
class TaskResult:
    """The result of one task in a run of its graph.

    Attributes:
        name: The task's name.
        state: ``SUCCEEDED``, ``FAILED``, ``SKIPPED`` or ``CANCELLED``; or
            ``PENDING`` for a task that did not start because the run stopped.
        reason: Why the task was skipped, cancelled or not started.
        error: The error of a failed task.
        value: What a single-operation task returned.
        report: The report of the own run of a task over items.
        started: Wall-clock start, seconds since the epoch, if the task
            started in this session.
        duration: Seconds the task ran in this session.
        source: ``"run"``, or ``"journal"`` for a task that succeeded in
            an earlier session of the graph and did not run again.
        began: `time.perf_counter` at the start, for the duration.
    """

    name: Hashable
    state: State = State.PENDING
    reason: str | None = None
    error: BaseException | None = None
    value: Any = None
    report: Report | None = None
    started: float | None = None
    duration: float | None = None
    source: str = "run"
    began: float = field(default=0.0, repr=False)


_GRAPH_COUNT_KEYS = ("succeeded", "failed", "skipped", "cancelled", "pending")


@dataclass(slots=True, repr=False)
class GraphReport:
    """The report of a graph run: each task's result, and how the run ended.

    Attributes:
        run_id: The graph run's id, kept across resumed sessions.
        tasks: Each task's result, by name, in the order the tasks were added.
        duration: Seconds the run took.
        interrupted: Whether a signal, a cancel or a failed journal
            stopped the run early.
        journal: The graph's journal, if it had one.
        signals: The stop signals received, in order (with ``handle_signals``).
    """

    run_id: str
    tasks: dict[Hashable, TaskResult]
    duration: float = 0.0
    interrupted: bool = False
    journal: str | None = None
    signals: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={count}" for name, count in self.counts.items())
        return f"<GraphReport {self.run_id} {counts} in {self.duration:.3f} s>"

    @property
    def counts(self) -> dict[str, int]:
        """Tasks per state: succeeded, failed, skipped, cancelled and pending."""
        tally = collections.Counter(result.state for result in self.tasks.values())
        counts = dict.fromkeys(_GRAPH_COUNT_KEYS, 0)
        for state, count in tally.items():
            counts[state.value] = count
        return counts

    @property
    def ok(self) -> bool:
        """Whether every task succeeded and the run was not stopped early."""
        return not self.interrupted and all(
            result.state is State.SUCCEEDED for result in self.tasks.values()
        )

    def failed(self) -> list[TaskResult]:
        """Return the results of the tasks that failed, in task order."""
        return [r for r in self.tasks.values() if r.state is State.FAILED]

    def skipped(self) -> list[TaskResult]:
        """Return the results of the tasks skipped after a failure, in task order."""
        return [r for r in self.tasks.values() if r.state is State.SKIPPED]


def summary_lines(report: GraphReport, *, limit: int = 10) -> list[str]:
    """Return the summary of a graph run as lines of plain text.

    Args:
        report: The graph's report.
        limit: Failed and skipped tasks listed at most, each.
    """
    counts = report.counts
    total = sum(counts.values())
    parts = [
        f"{count} {name}"
        for name, count in counts.items()
        if count or name in ("succeeded", "failed")
    ]
    noun = "task" if total == 1 else "tasks"
    lines = [
        f"{total} {noun}: {', '.join(parts)} in {format_duration(report.duration)}"
    ]
    carried = sum(1 for r in report.tasks.values() if r.source == "journal")
    if carried:
        lines.append(
            f"{carried} of the succeeded tasks succeeded in an earlier session of "
            "this graph and did not run again."
        )
    failed = report.failed()
    if failed:
        lines.append("Failed tasks:")
        lines.extend(
            f"  {task_key(r.name)}: {_describe(r.error)}" for r in failed[:limit]
        )
        if len(failed) > limit:
            lines.append(f"  ... and {len(failed) - limit} more")
    skipped = report.skipped()
    if skipped:
        lines.append("Skipped tasks:")
        lines.extend(f"  {task_key(r.name)}: {r.reason}" for r in skipped[:limit])
        if len(skipped) > limit:
            lines.append(f"  ... and {len(skipped) - limit} more")
    unfinished = counts["cancelled"] + counts["pending"]
    if report.interrupted and unfinished:
        lines.append(f"{unfinished} tasks did not finish because the run stopped.")
    over_items = [r for r in report.tasks.values() if r.report is not None]
    if over_items:
        lines.append("Tasks over items:")
    for result in over_items:
        assert result.report is not None
        first, *rest = batch_summary_lines(result.report, groups=3)
        lines.append(f"  {task_key(result.name)}: {first}")
        lines.extend(f"    {line}" for line in rest)
    return lines


def _describe(error: BaseException | None) -> str:
    """Return an error as one line: its kind and the first line of its message."""
    if error is None:
        return "unknown error"
    if isinstance(error, CommandFailedError):
        # The exit status, and the last line the command wrote to stderr.
        return cause_of(error)
    if isinstance(error, ItemsFailedError | RemoteError):
        return str(error)
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
