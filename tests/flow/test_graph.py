"""Dependency graphs: order, failure propagation, checks, resume and reports.

Order and overlap are shown by what the tasks record as they run, and by
events that one task sets and another waits for, never by timings.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from batchtools import CommandFailedError, ConfigurationError, State
from batchtools._exceptions import JournalMismatchError
from batchtools.flow._graph_plan import task_journal_path
from batchtools.flow.graph import (
    Graph,
    GraphCycleError,
    GraphReport,
    ItemsFailedError,
    summary_lines,
)
from batchtools.journal import count_states, iter_items
from batchtools.testing import fast_retries
from tests.flow.graph_tasks import ItemStep, Step, fail_on_three, square

# An event that a test waits for is missed only if the graph is wrong; this
# bound only keeps such a test from hanging.
EVENT_LIMIT = 30.0

Operation = Callable[[], Coroutine[Any, Any, str]]


def recorder(log: list[str], name: str) -> Operation:
    """Return an async task that appends its start and end to ``log``."""

    async def operation() -> str:
        log.append(f"{name} start")
        await asyncio.sleep(0)
        log.append(f"{name} end")
        return name

    return operation


def failing(message: str) -> Operation:
    """Return an async task that raises RuntimeError(message)."""

    async def operation() -> str:
        raise RuntimeError(message)

    return operation


def states(report: GraphReport) -> dict[Any, State]:
    return {name: result.state for name, result in report.tasks.items()}


# -- order ----------------------------------------------------------------------


def test_diamond_runs_needs_first() -> None:
    log: list[str] = []
    graph = Graph()
    graph.add("top", recorder(log, "top"))
    graph.add("left", recorder(log, "left"), needs=["top"])
    graph.add("right", recorder(log, "right"), needs=["top"])
    graph.add("bottom", recorder(log, "bottom"), needs=["left", "right"])

    report = graph.run(concurrency=4)

    assert report.ok
    assert states(report) == dict.fromkeys(
        ["top", "left", "right", "bottom"], State.SUCCEEDED
    )
    assert log.index("top end") < log.index("left start")
    assert log.index("top end") < log.index("right start")
    assert log.index("left end") < log.index("bottom start")
    assert log.index("right end") < log.index("bottom start")
    assert report.tasks["bottom"].value == "bottom"


def test_task_starts_while_slow_task_runs() -> None:
    # C needs only A. B waits until C has started, so B can end only if C
    # starts while B still runs, which level-by-level scheduling never does.
    log: list[str] = []
    c_started = asyncio.Event()

    async def slow_b() -> str:
        log.append("B start")
        await asyncio.wait_for(c_started.wait(), EVENT_LIMIT)
        log.append("B end")
        return "B"

    async def c() -> str:
        log.append("C start")
        c_started.set()
        return "C"

    graph = Graph()
    graph.add("A", recorder(log, "A"))
    graph.add("B", slow_b)
    graph.add("C", c, needs=["A"])

    report = graph.run(concurrency=2)

    assert report.ok, summary_lines(report)
    assert log.index("A end") < log.index("C start")
    assert log.index("B start") < log.index("C start") < log.index("B end")


def test_sync_tasks_run_on_threads_in_order() -> None:
    calls: collections.Counter[str] = collections.Counter()
    graph = Graph()
    graph.add("first", Step("first", calls, set()))
    graph.add("second", Step("second", calls, set()), needs=["first"])

    report = graph.run()

    assert report.ok
    assert calls == {"first": 1, "second": 1}
    assert report.tasks["second"].value == "second"


def test_context_key_is_task_name() -> None:
    seen: list[Any] = []

    async def operation(context: Any) -> None:
        seen.append(context)

    graph = Graph()
    graph.add("named", operation)

    report = graph.run()

    assert report.ok
    assert seen[0].key == "named"
    assert seen[0].run_id == report.run_id
    assert seen[0].idempotency_key == f"{report.run_id}:named"


# -- failures -------------------------------------------------------------------


def test_failure_skips_only_its_dependents() -> None:
    log: list[str] = []
    graph = Graph()
    graph.add("fetch", failing("fetch broke"))
    graph.add("parse", recorder(log, "parse"), needs=["fetch"])
    graph.add("index", recorder(log, "index"), needs=["parse"])
    graph.add("clean", recorder(log, "clean"))
    graph.add("report", recorder(log, "report"), needs=["clean"])

    report = graph.run()

    assert not report.ok
    assert states(report) == {
        "fetch": State.FAILED,
        "parse": State.SKIPPED,
        "index": State.SKIPPED,
        "clean": State.SUCCEEDED,
        "report": State.SUCCEEDED,
    }
    assert report.tasks["parse"].reason == "needs fetch, which failed"
    assert report.tasks["index"].reason == (
        "needs parse, which was skipped because fetch failed"
    )
    assert isinstance(report.tasks["fetch"].error, RuntimeError)
    assert "parse start" not in log
    assert "index start" not in log


def test_task_with_two_failed_needs_is_skipped_once() -> None:
    graph = Graph()
    graph.add("a", failing("a broke"))
    graph.add("b", failing("b broke"))
    graph.add("both", recorder([], "both"), needs=["a", "b"])

    report = graph.run()

    assert report.counts == {
        "succeeded": 0,
        "failed": 2,
        "skipped": 1,
        "cancelled": 0,
        "pending": 0,
    }
    reason = report.tasks["both"].reason
    assert reason in ("needs a, which failed", "needs b, which failed")


def test_summary_names_failed_and_skipped_tasks() -> None:
    graph = Graph()
    graph.add("fetch", failing("no route to host"))
    graph.add("parse", recorder([], "parse"), needs=["fetch"])

    lines = summary_lines(graph.run())

    assert lines[0].startswith("2 tasks: 0 succeeded, 1 failed, 1 skipped in ")
    assert "  fetch: RuntimeError: no route to host" in lines
    assert "  parse: needs fetch, which failed" in lines


# -- checks before running ------------------------------------------------------


def test_cycle_is_named_without_tasks_outside_it() -> None:
    graph = Graph()
    for name, needs in {1: [], 5: [1, 8], 8: [5]}.items():
        graph.add(name, recorder([], str(name)), needs=needs)

    with pytest.raises(GraphCycleError, match="5 -> 8 -> 5") as caught:
        graph.run()

    assert caught.value.cycle == [5, 8, 5]
    assert "1" not in str(caught.value)


def test_cycle_starts_at_first_declared_task() -> None:
    graph = Graph()
    graph.add("a", recorder([], "a"), needs=["b"])
    graph.add("b", recorder([], "b"), needs=["c"])
    graph.add("c", recorder([], "c"), needs=["a"])

    with pytest.raises(GraphCycleError, match="a -> b -> c -> a"):
        graph.check()


def test_task_needing_itself_is_a_cycle() -> None:
    graph = Graph()
    graph.add("loop", recorder([], "loop"), needs=["loop"])

    with pytest.raises(GraphCycleError, match="loop -> loop"):
        graph.check()


def test_unknown_dependency_suggests_closest_name() -> None:
    graph = Graph()
    graph.add("thumbs", recorder([], "thumbs"))
    graph.add("index", recorder([], "index"), needs=["thumb"])

    with pytest.raises(ConfigurationError, match="did you mean 'thumbs'"):
        graph.run()


def test_cycle_runs_nothing() -> None:
    log: list[str] = []
    graph = Graph()
    graph.add("free", recorder(log, "free"))
    graph.add("x", recorder(log, "x"), needs=["y"])
    graph.add("y", recorder(log, "y"), needs=["x"])

    with pytest.raises(GraphCycleError):
        graph.run()

    assert log == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 4}, "concurrency applies to a task over items"),
        ({"allow_failures": 1}, "allow_failures applies to a task over items"),
        ({"shell": True}, "shell and env apply to command templates"),
        ({"retry": -1}, "retry=-1 must be a number of retries"),
        ({"timeout": "soon"}, "invalid timeout of task 'task'"),
        ({"estimate": 0}, "invalid estimate of task 'task'"),
    ],
)
def test_add_rejects_invalid_options(options: dict[str, Any], message: str) -> None:
    graph = Graph()

    with pytest.raises(ConfigurationError, match=message):
        graph.add("task", recorder([], "task"), **options)


def test_add_rejects_repeated_name() -> None:
    graph = Graph()
    graph.add("task", recorder([], "task"))

    with pytest.raises(ConfigurationError, match="'task' is already in the graph"):
        graph.add("task", recorder([], "task"))


def test_add_rejects_operation_that_is_not_callable() -> None:
    graph = Graph()

    with pytest.raises(ConfigurationError, match="neither a callable nor a command"):
        graph.add("task", 42)


@pytest.mark.parametrize("value", [-1, "150%", "many", 0.5])
def test_add_rejects_invalid_allow_failures(value: Any) -> None:
    graph = Graph()

    with pytest.raises(ConfigurationError, match="invalid allow_failures"):
        graph.add("task", square, items=[1], allow_failures=value)


def test_check_rejects_backend_that_cannot_run_task() -> None:
    graph = Graph()
    graph.add("task", ["true"], backend="thread")

    with pytest.raises(ConfigurationError, match="task 'task': a command template"):
        graph.check()


# -- tasks over items -------------------------------------------------------------


def test_items_all_run_before_dependent() -> None:
    calls: collections.Counter[int] = collections.Counter()
    log: list[str] = []
    graph = Graph()
    graph.add("each", ItemStep(calls, set()), items=range(20), concurrency=4)
    graph.add("after", recorder(log, "after"), needs=["each"])

    report = graph.run()

    assert report.ok
    assert calls == collections.Counter(range(20))
    batch = report.tasks["each"].report
    assert batch is not None
    assert batch.counts["succeeded"] == 20
    assert log == ["after start", "after end"]


def test_items_are_listed_when_task_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    graph = Graph()
    graph.add("make", ["touch", "a.txt", "b.txt", "c.txt"])
    graph.add(
        "check",
        ["test", "-e", "{}"],
        items=lambda: sorted(tmp_path.glob("*.txt")),
        needs=["make"],
    )

    report = graph.run()

    assert report.ok, summary_lines(report)
    batch = report.tasks["check"].report
    assert batch is not None
    assert batch.counts["succeeded"] == 3


@pytest.mark.parametrize(
    ("allow_failures", "expected"),
    [
        (None, State.FAILED),
        (1, State.FAILED),
        (2, State.SUCCEEDED),
        ("10%", State.FAILED),
        ("20%", State.SUCCEEDED),
        (True, State.SUCCEEDED),
    ],
)
def test_allow_failures_decides_task_state(
    allow_failures: bool | int | str | None, expected: State
) -> None:
    calls: collections.Counter[int] = collections.Counter()
    graph = Graph()
    graph.add(
        "each",
        ItemStep(calls, {3, 7}),
        items=range(10),
        allow_failures=allow_failures,
    )
    graph.add("after", recorder([], "after"), needs=["each"])

    report = graph.run()

    assert report.tasks["each"].state is expected
    after = State.SUCCEEDED if expected is State.SUCCEEDED else State.SKIPPED
    assert report.tasks["after"].state is after


def test_items_failed_error_names_counts() -> None:
    graph = Graph()
    graph.add(
        "each",
        ItemStep(collections.Counter(), {3, 7}),
        items=range(10),
        allow_failures=1,
    )

    report = graph.run()

    error = report.tasks["each"].error
    assert isinstance(error, ItemsFailedError)
    assert error.failed == 2
    assert error.total == 10
    assert str(error) == (
        "2 of 10 items did not succeed (allow_failures permits 1 item); "
        "most common cause: ValueError: item N is broken"
    )


def test_task_over_items_on_process_backend() -> None:
    graph = Graph()
    graph.add("squares", square, items=range(8), backend="process", concurrency=2)
    graph.add(
        "checked", fail_on_three, items=range(5), backend="process", allow_failures=1
    )

    report = graph.run()

    assert report.ok, summary_lines(report)
    checked = report.tasks["checked"].report
    assert checked is not None
    assert checked.counts["failed"] == 1


# -- commands -------------------------------------------------------------------


def test_command_task_returns_its_result(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    graph = Graph()
    graph.add("touch", ["touch", str(marker)])
    graph.add("echo", ["echo", "hello"], needs=["touch"])

    report = graph.run()

    assert report.ok, summary_lines(report)
    assert marker.exists()
    result = report.tasks["echo"].value
    assert result.exit_status == 0
    assert result.stdout == b"hello\n"


def test_failing_command_fails_with_its_exit_status() -> None:
    graph = Graph()
    graph.add("broken", ["sh", "-c", "exit 3"])
    graph.add("after", ["true"], needs=["broken"])

    report = graph.run()

    error = report.tasks["broken"].error
    assert isinstance(error, CommandFailedError)
    assert error.exit_status == 3
    assert report.tasks["after"].state is State.SKIPPED


def test_command_task_retries_on_its_own_engine(tmp_path: Path) -> None:
    # The script fails while the counter file has fewer than 3 lines.
    counter = tmp_path / "count"
    script = f'echo x >> {counter}; test "$(wc -l < {counter})" -ge 3'
    graph = Graph()
    graph.add("flaky", ["sh", "-c", script], retry=2)

    with fast_retries():
        report = graph.run()

    assert report.ok, summary_lines(report)
    assert counter.read_text().count("x") == 3


# -- journal and resume -----------------------------------------------------------


def build_steps(calls: collections.Counter[str], broken: set[str]) -> Graph:
    graph = Graph()
    graph.add("a", Step("a", calls, broken))
    graph.add("b", Step("b", calls, broken), needs=["a"])
    graph.add("c", Step("c", calls, broken), needs=["b"])
    graph.add("d", Step("d", calls, broken), needs=["a"])
    return graph


def test_resume_skips_succeeded_tasks(tmp_path: Path) -> None:
    journal = tmp_path / "graph.db"
    calls: collections.Counter[str] = collections.Counter()

    first = build_steps(calls, {"b"}).run(journal=journal)
    second = build_steps(calls, set()).run(journal=journal)

    assert states(first) == {
        "a": State.SUCCEEDED,
        "b": State.FAILED,
        "c": State.SKIPPED,
        "d": State.SUCCEEDED,
    }
    assert second.ok, summary_lines(second)
    assert calls == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert second.tasks["a"].source == "journal"
    assert second.tasks["a"].value == "a"
    assert second.tasks["b"].source == "run"
    assert second.run_id == first.run_id


def test_journal_holds_one_item_per_task(tmp_path: Path) -> None:
    journal = tmp_path / "graph.db"
    calls: collections.Counter[str] = collections.Counter()

    build_steps(calls, {"b"}).run(journal=journal)

    assert count_states(journal) == {"succeeded": 2, "failed": 1}
    keys = {row.key: row.state for row in iter_items(journal)}
    assert keys == {"a": "succeeded", "b": "failed", "d": "succeeded"}
    with sqlite3.connect(journal) as connection:
        skipped = connection.execute(
            "SELECT detail FROM events WHERE kind = 'task-skipped'"
        ).fetchall()
    assert len(skipped) == 1
    assert "needs b, which failed" in skipped[0][0]


def test_task_over_items_resumes_item_by_item(tmp_path: Path) -> None:
    journal = tmp_path / "graph.db"
    calls: collections.Counter[int] = collections.Counter()
    broken = {2}

    def build() -> Graph:
        graph = Graph()
        graph.add("each", ItemStep(calls, broken), items=range(5))
        return graph

    first = build().run(journal=journal)
    broken.clear()
    second = build().run(journal=journal)

    assert first.tasks["each"].state is State.FAILED
    assert second.ok, summary_lines(second)
    assert calls == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    assert task_journal_path(journal, "each").exists()
    batch = second.tasks["each"].report
    assert batch is not None
    assert batch.from_journal == 4


def test_changed_graph_needs_force(tmp_path: Path) -> None:
    journal = tmp_path / "graph.db"
    calls: collections.Counter[str] = collections.Counter()
    build_steps(calls, set()).run(journal=journal)
    changed = build_steps(calls, set())
    changed.add("e", Step("e", calls, set()), needs=["d"])

    with pytest.raises(JournalMismatchError, match="--force"):
        changed.run(journal=journal)
    report = changed.run(journal=journal, force=True)

    assert report.ok
    assert calls == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}


def test_unsafe_name_gets_hashed_journal(tmp_path: Path) -> None:
    path = task_journal_path(tmp_path / "graph.db", "../escape")

    assert path.parent == tmp_path / "graph.db.tasks"
    assert path.name.startswith("task-")


# -- plans ------------------------------------------------------------------------


def test_levels_group_tasks_by_depth() -> None:
    graph = Graph()
    graph.add("d", recorder([], "d"), needs=["b", "c"])
    graph.add("b", recorder([], "b"), needs=["a"])
    graph.add("c", recorder([], "c"), needs=["a"])
    graph.add("a", recorder([], "a"))

    assert graph.levels() == [["a"], ["b", "c"], ["d"]]


def test_critical_path_counts_tasks_without_estimates() -> None:
    graph = Graph()
    graph.add("a", recorder([], "a"))
    graph.add("b", recorder([], "b"), needs=["a"])
    graph.add("c", recorder([], "c"), needs=["b"])
    graph.add("side", recorder([], "side"), needs=["a"])

    path = graph.critical_path()

    assert path.tasks == ["a", "b", "c"]
    assert path.length == 3
    assert not path.by_estimate


def test_critical_path_weighs_estimates() -> None:
    graph = Graph()
    graph.add("a", recorder([], "a"), estimate="1s")
    graph.add("short", recorder([], "short"), needs=["a"], estimate="1s")
    graph.add("tail", recorder([], "tail"), needs=["short"], estimate="1s")
    graph.add("long", recorder([], "long"), needs=["a"], estimate="5m")

    path = graph.critical_path()

    assert path.tasks == ["a", "long"]
    assert path.length == 301.0
    assert path.by_estimate


def test_task_ending_during_stop_is_done(tmp_path: Path) -> None:
    import os
    import signal

    journal = tmp_path / "graph.db"
    runs: list[str] = []

    def interrupt_then_finish() -> str:
        runs.append("ran")
        # The first SIGINT lets running tasks finish; this one does.
        os.kill(os.getpid(), signal.SIGINT)
        return "done"

    def build() -> Graph:
        graph = Graph()
        # With its own retry policy the task runs on an engine of its own.
        graph.add("only", interrupt_then_finish, retry=1)
        return graph

    first = build().run(journal=journal, handle_signals=True)
    second = build().run(journal=journal)

    assert first.tasks["only"].state is State.SUCCEEDED
    assert first.tasks["only"].value == "done"
    assert second.tasks["only"].state is State.SUCCEEDED
    assert runs == ["ran"]
