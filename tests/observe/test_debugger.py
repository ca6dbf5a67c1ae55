"""The debugger over real runs: pdb reads scripted commands from a stream.

pdb reads its commands from ``stdin`` and writes to ``stdout`` when they are
given, so these tests need no terminal. A `GatedInput` keeps the prompt
open until the test releases it, so that the test can look at the paused run.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools._codec import digest, encode
from batchtools.engine._engine import Engine
from batchtools.journal import iter_items
from batchtools.observe._debugger import Debugger

WAIT = 30.0
"""Seconds a test waits for the debugger's prompt or for a run's thread."""


def fail_on_bad(item: str) -> str:
    if item == "bad":
        raise ValueError(f"cannot handle {item}")
    return item.upper()


async def fail_on_bad_async(item: str) -> str:
    if item == "bad":
        raise ValueError(f"cannot handle {item}")
    return item.upper()


class GatedInput(io.StringIO):
    """Debugger commands that pdb gets only once the test releases the prompt.

    Attributes:
        at_prompt: Set when pdb first reads a command.
        release: Set by the test to let pdb read the commands.
    """

    def __init__(self, commands: str) -> None:
        super().__init__(commands)
        self.at_prompt = threading.Event()
        self.release = threading.Event()

    # typeshed gives io's base class a bytes readline, which StringIO overrides.
    def readline(self, size: int = -1, /) -> str:  # type: ignore[override]
        self.at_prompt.set()
        assert self.release.wait(WAIT), "the test never released the prompt"
        return super().readline(size)


class SessionWatch:
    """Notes whether an outcome reached observers while a session was open."""

    def __init__(self, debugger: Debugger) -> None:
        self.debugger = debugger
        self.during_session = 0

    def on_start(self, engine: Engine) -> None:
        return None

    def on_retry(self, *arguments: object) -> None:
        return None

    def on_outcome(self, outcome: batchtools.Outcome) -> None:
        if self.debugger.session_open:
            self.during_session += 1

    def on_finish(self, report: batchtools.Report) -> None:
        return None


def _run_in_thread(
    **kwargs: Any,
) -> tuple[threading.Thread, list[batchtools.Report]]:
    """Start ``batchtools.run`` on a thread; the list receives its report."""
    reports: list[batchtools.Report] = []
    thread = threading.Thread(
        target=lambda: reports.append(batchtools.run(**kwargs)), daemon=True
    )
    thread.start()
    return thread, reports


# -- post-mortem ----------------------------------------------------------------


@pytest.mark.parametrize("task", [fail_on_bad, fail_on_bad_async])
def test_post_mortem_shows_task_frame(task: Callable[[str], Any]) -> None:
    output = io.StringIO()
    debugger = Debugger(stdin=io.StringIO("p item\nc\n"), stdout=output)

    report = batchtools.run(
        ["good", "bad", "other"],
        debugger.wrap(task),
        observers=[debugger],
        concurrency=1,
    )

    text = output.getvalue()
    assert report.counts["succeeded"] == 2
    assert report.counts["failed"] == 1
    assert debugger.post_mortems == 1
    assert not debugger.quit_requested
    assert "ValueError: cannot handle bad" in text
    assert f"The task failed on item {digest(encode('bad'))}" in text
    assert "-> raise ValueError" in text
    assert "'bad'" in text
    # The traceback starts at the task, not at the wrapper.
    assert "batchtools/observe/_debugger.py" not in text


def test_post_mortem_opens_once() -> None:
    output = io.StringIO()
    debugger = Debugger(stdin=io.StringIO("c\nc\n"), stdout=output)

    report = batchtools.run(
        ["bad", "bad", "good"],
        debugger.wrap(fail_on_bad),
        observers=[debugger],
        concurrency=1,
    )

    assert report.counts["failed"] == 2
    assert debugger.post_mortems == 1
    assert output.getvalue().count("The task failed on item") == 1


def test_post_mortem_keeps_retries() -> None:
    calls: list[str] = []

    def flaky(item: str) -> str:
        calls.append(item)
        if len(calls) == 1:
            raise ConnectionError("first call fails")
        return item

    debugger = Debugger(stdin=io.StringIO("c\n"), stdout=io.StringIO())

    report = batchtools.run(["a"], debugger.wrap(flaky), observers=[debugger], retry=1)

    assert report.counts["succeeded"] == 1
    assert calls == ["a", "a"]


def test_quit_stops_run_and_leaves_rest_pending(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    debugger = Debugger(stdin=io.StringIO("q\n"), stdout=io.StringIO())
    items = ["bad", *(f"item{number}" for number in range(50))]

    report = batchtools.run(
        items,
        debugger.wrap(fail_on_bad_async),
        observers=[debugger],
        concurrency=1,
        journal=journal,
    )

    states = [row.state for row in iter_items(journal)]
    assert debugger.quit_requested
    assert report.interrupted
    assert states[0] == "failed"
    assert "pending" in states


def test_session_pauses_thread_run() -> None:
    ran: list[str] = []

    commands = GatedInput("c\n")

    def record(item: str) -> str:
        ran.append(item)
        if item == "item0":
            # Busy when the session opens, so that this thread has a next
            # attempt queued by then, which must wait.
            assert commands.at_prompt.wait(WAIT)
        return fail_on_bad(item)

    debugger = Debugger(stdin=commands, stdout=io.StringIO())
    watch = SessionWatch(debugger)
    items = ["bad", *(f"item{number}" for number in range(40))]

    thread, reports = _run_in_thread(
        items=items,
        task=debugger.wrap(record),
        observers=[debugger, watch],
        concurrency=2,
        backend="thread",
    )
    try:
        assert commands.at_prompt.wait(WAIT)
        # The other thread finishes what it runs, then waits before its next
        # attempt instead of starting it.
        deadline = time.monotonic() + WAIT
        while debugger.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert debugger.waiting == 1
        ran_while_open = len(ran)
        assert debugger.session_open
    finally:
        commands.release.set()
        thread.join(WAIT)

    assert reports[0].counts["succeeded"] == 40
    assert ran_while_open < len(ran)
    assert watch.during_session == 0


def test_session_does_not_count_against_timeouts() -> None:
    slow_may_end = threading.Event()

    def task(item: str) -> str:
        if item == "slow":
            assert slow_may_end.wait(WAIT)
        return fail_on_bad(item)

    commands = GatedInput("c\n")
    debugger = Debugger(stdin=commands, stdout=io.StringIO())
    thread, reports = _run_in_thread(
        items=["slow", "bad"],
        task=debugger.wrap(task),
        observers=[debugger],
        concurrency=2,
        backend="thread",
        timeout=1.0,
    )
    try:
        assert commands.at_prompt.wait(WAIT)
        # Longer than the timeout: without the pause the slow item times out.
        time.sleep(1.5)
        commands.release.set()
        # Ended before its timeout once the session's 1.5 s are added, and
        # after the run's sweeper has had a chance to time it out without them.
        time.sleep(0.3)
    finally:
        commands.release.set()
        slow_may_end.set()
        thread.join(WAIT)

    report = reports[0]
    assert report.counts["succeeded"] == 1
    assert report.counts["failed"] == 1
    failure = report.failures.most_common()[0]
    assert failure.cause == "ValueError: cannot handle bad"


# -- the stop before an item ------------------------------------------------------


def test_break_at_stops_before_item_and_steps_in() -> None:
    output = io.StringIO()
    commands = "p item\ns\np item\nc\n"
    debugger = Debugger(
        post_mortem=False,
        break_at=digest(encode("b"))[:10],
        stdin=io.StringIO(commands),
        stdout=output,
    )

    report = batchtools.run(
        ["a", "b", "c"], debugger.wrap(fail_on_bad), observers=[debugger]
    )

    text = output.getvalue()
    assert report.counts["succeeded"] == 3
    assert debugger.breaks == 1
    assert f"Stopped before item {digest(encode('b'))} runs (attempt 1)" in text
    assert "-> return function(item, **arguments)" in text
    assert "--Call--" in text
    assert "fail_on_bad()" in text
    assert text.count("'b'") == 2


def test_break_at_async_task() -> None:
    output = io.StringIO()
    debugger = Debugger(
        post_mortem=False,
        break_at=digest(encode("b")),
        stdin=io.StringIO("s\nc\n"),
        stdout=output,
    )

    report = batchtools.run(
        ["a", "b"], debugger.wrap(fail_on_bad_async), observers=[debugger]
    )

    assert report.counts["succeeded"] == 2
    assert debugger.breaks == 1
    assert "fail_on_bad_async()" in output.getvalue()


def test_break_at_quit_puts_item_back(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    debugger = Debugger(
        post_mortem=False,
        break_at=digest(encode("b")),
        stdin=io.StringIO("q\n"),
        stdout=io.StringIO(),
    )

    report = batchtools.run(
        ["a", "b"],
        debugger.wrap(fail_on_bad),
        observers=[debugger],
        concurrency=1,
        journal=journal,
    )

    states = {row.item: row.state for row in iter_items(journal)}
    assert debugger.quit_requested
    assert report.counts["cancelled"] == 1
    assert states == {"a": "succeeded", "b": "pending"}


def test_wrapper_keeps_task_name() -> None:
    debugger = Debugger()

    wrapped = debugger.wrap(fail_on_bad)

    assert wrapped.__qualname__ == fail_on_bad.__qualname__
    assert wrapped.__module__ == fail_on_bad.__module__
    assert asyncio.iscoroutinefunction(debugger.wrap(fail_on_bad_async))


def test_empty_break_at_rejected() -> None:
    with pytest.raises(ValueError, match="break_at must be the start"):
        Debugger(break_at="  ")
