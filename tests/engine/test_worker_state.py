"""Per-worker setup and teardown on every Python backend."""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools import ConfigurationError, RunAbortedError, State
from batchtools.journal import iter_items
from tests.engine import tasks


def test_thread_setup_and_teardown_per_thread() -> None:
    lock = threading.Lock()
    made: list[str] = []
    closed: list[str] = []

    def setup() -> str:
        name = threading.current_thread().name
        with lock:
            made.append(name)
        return name

    def teardown(state: str) -> None:
        with lock:
            closed.append(state)

    def task(item: int, context: batchtools.Context) -> tuple[str, str]:
        return context.state, threading.current_thread().name

    report = batchtools.run(
        range(200),
        task,
        backend="thread",
        concurrency=4,
        setup=setup,
        teardown=teardown,
    )

    assert report.ok
    assert sorted(made) == sorted(closed)
    assert len(made) == 4
    for state, thread in report.values():
        assert state == thread


def test_async_setup_shared_by_coroutines() -> None:
    events: list[str] = []

    class Client:
        pass

    async def setup() -> Client:
        events.append("setup")
        return Client()

    async def teardown(state: Client) -> None:
        events.append("teardown")

    async def task(item: int, context: batchtools.Context) -> int:
        assert isinstance(context.state, Client)
        return id(context.state)

    report = batchtools.run(
        range(50), task, concurrency=8, setup=setup, teardown=teardown
    )

    assert report.ok
    assert len(set(report.values())) == 1
    assert events == ["setup", "teardown"]


def test_process_workers_keep_their_own_state(tmp_path: Path) -> None:
    record = tmp_path / "closed.txt"

    def teardown(state: int) -> None:
        with record.open("a") as file:
            file.write(f"{state}\n")

    report = batchtools.run(
        range(60),
        tasks.state_and_pid,
        backend="process",
        concurrency=2,
        setup=tasks.worker_pid,
        teardown=teardown,
    )

    assert report.ok
    pids = set()
    for state, pid in report.values():
        assert state == pid
        pids.add(pid)
    closed = record.read_text().split()
    assert sorted(closed) == sorted(str(pid) for pid in pids)


def test_thread_setup_failure_stops_run() -> None:
    calls: list[int] = []

    def setup() -> None:
        raise ConnectionRefusedError("the database refused the connection")

    with pytest.raises(ConfigurationError) as caught:
        batchtools.run(
            range(5), calls.append, backend="thread", concurrency=2, setup=setup
        )

    assert calls == []
    message = str(caught.value)
    assert "setup function" in message
    assert "the database refused the connection" in message


def test_async_setup_failure_stops_run() -> None:
    calls: list[int] = []

    async def task(item: int) -> None:
        calls.append(item)

    def setup() -> None:
        raise ConnectionRefusedError("no route")

    with pytest.raises(ConfigurationError, match="setup function"):
        batchtools.run(range(5), task, setup=setup)

    assert calls == []


def test_process_setup_that_keeps_failing_aborts_the_run(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    with pytest.raises(RunAbortedError) as caught:
        batchtools.run(
            range(4),
            tasks.pid_of_worker,
            backend="process",
            concurrency=2,
            setup=tasks.setup_that_fails,
            journal=journal,
        )

    message = str(caught.value)
    assert "failed to start 3 times in a row" in message
    assert "setup function" in message
    assert "refused the connection" in message
    # Nothing ran, so a resume has every item left to do.
    states = {row.state for row in iter_items(journal)}
    assert states <= {"pending"}


def test_process_setup_that_fails_once_is_tried_again(tmp_path: Path) -> None:
    setup = tasks.SetupThatFailsOnce(str(tmp_path / "failed-once"))

    report = batchtools.run(
        range(6), tasks.pid_of_worker, backend="process", concurrency=2, setup=setup
    )

    assert report.ok


def test_thread_setup_raising_system_exit_stops_the_run() -> None:
    def setup() -> None:
        raise SystemExit(3)

    with pytest.raises(ConfigurationError, match="SystemExit"):
        batchtools.run(range(3), lambda item: item, backend="thread", setup=setup)


def stop_when(engine: Any, condition: Any) -> asyncio.Task[None]:
    """Stop ``engine`` once ``condition()`` is true, polling the event loop."""

    async def watch() -> None:
        while not condition():
            await asyncio.sleep(0.005)
        engine.stop("received SIGINT")

    return asyncio.ensure_future(watch())


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_stop_ends_hanging_setup(tmp_path: Path, backend: str) -> None:
    from batchtools.engine._api import build_engine, prepare

    started = tmp_path / "setup-started"
    release = threading.Event()

    def thread_setup() -> None:
        started.touch()
        release.wait(60)

    setup: Any = (
        thread_setup if backend == "thread" else tasks.SetupThatHangs(str(started))
    )

    async def main() -> batchtools.Report:
        job = prepare(tasks.pid_of_worker, backend=backend, concurrency=2, setup=setup)
        engine = build_engine(range(3), job, None)
        watcher = stop_when(engine, started.exists)
        report = await engine.run()
        await watcher
        return report

    try:
        report = asyncio.run(main())
    finally:
        release.set()

    assert report.interrupted
    assert report.total == 0


def test_terminate_ends_a_teardown_that_hangs() -> None:
    from batchtools.engine._api import build_engine, prepare

    in_teardown = threading.Event()
    release = threading.Event()

    def teardown(state: None) -> None:
        in_teardown.set()
        release.wait(60)

    async def main() -> batchtools.Report:
        job = prepare(
            lambda item: item, backend="thread", concurrency=2, teardown=teardown
        )
        engine = build_engine(range(3), job, None)

        async def terminate_in_teardown() -> None:
            while not in_teardown.is_set():
                await asyncio.sleep(0.005)
            engine.terminate("received SIGINT")

        watcher = asyncio.ensure_future(terminate_in_teardown())
        report = await engine.run()
        await watcher
        return report

    try:
        report = asyncio.run(main())
    finally:
        release.set()

    assert report.counts["succeeded"] == 3


def test_commands_take_no_setup_function() -> None:
    with pytest.raises(ConfigurationError, match="apply to Python tasks"):
        batchtools.run(["a"], "echo {}", setup=lambda: None)


def test_uncallable_setup_is_rejected() -> None:
    bad: Any = "connect"

    with pytest.raises(ConfigurationError, match="setup='connect'"):
        batchtools.run([1], lambda item: item, setup=bad)


def test_process_workers_recycled() -> None:
    report = batchtools.run(
        range(40),
        tasks.pid_of_worker,
        backend="process",
        concurrency=2,
        policies=[batchtools.Memory(max_items_per_worker=3)],
    )

    assert report.ok
    per_pid = collections.Counter(report.values())
    assert max(per_pid.values()) <= 3
    assert len(per_pid) >= 14
    # Each worker is replaced once it was sent its third item. The last
    # worker of each of the two slots may end the run with fewer items.
    full = sum(1 for count in per_pid.values() if count == 3)
    assert report.workers_recycled == full
    assert full >= 12
    assert report.workers_lost == 0


def test_memory_limit_fails_only_its_item() -> None:
    items = ["a", "b", "big", "c", "d", "e"]

    report = batchtools.run(
        items,
        tasks.hog_memory,
        backend="process",
        concurrency=2,
        timeout=120,
        policies=[batchtools.Memory(max_worker="150M")],
    )

    by_item = {outcome.item: outcome for outcome in report.outcomes}
    big = by_item.pop("big")
    assert big.state is State.FAILED
    assert isinstance(big.error, batchtools.MemoryLimitError)
    assert big.error.limit == 150 * 2**20
    assert big.error.rss > big.error.limit
    assert "MiB" in str(big.error)
    assert all(outcome.ok for outcome in by_item.values())
    assert report.memory_kills == 1


@pytest.mark.parametrize("backend", ["thread", "async"])
def test_worker_limits_need_the_process_backend(backend: str) -> None:
    async def coroutine(item: int) -> int:
        return item

    task = coroutine if backend == "async" else (lambda item: item)

    with pytest.raises(ConfigurationError, match="--backend process"):
        batchtools.run(
            [1],
            task,
            backend=backend,
            policies=[batchtools.Memory(max_worker="1G")],
        )


def test_memory_limit_below_idle_aborts() -> None:
    with pytest.raises(RunAbortedError) as caught:
        batchtools.run(
            range(3),
            tasks.pid_of_worker,
            backend="process",
            concurrency=1,
            policies=[batchtools.Memory(max_worker="1M")],
        )

    message = str(caught.value)
    assert "while executing nothing" in message
    assert "1.0 MiB" in message
    assert "raise --max-memory" in message


def test_timeout_starts_at_new_worker(tmp_path: Path) -> None:
    # "slow" times out and its worker is killed. The replacement's setup
    # takes longer than the timeout, and the items waiting for it must not
    # time out meanwhile: their timeout starts when the worker takes them.
    setup = functools.partial(
        tasks.setup_slow_after_first, str(tmp_path / "first-setup")
    )

    report = batchtools.run(
        ["slow", "a", "b"],
        tasks.sleep_if_slow,
        backend="process",
        concurrency=1,
        timeout=1.0,
        setup=setup,
    )

    states = {outcome.item: outcome.state.value for outcome in report.outcomes}
    assert states == {"slow": "failed", "a": "succeeded", "b": "succeeded"}
    assert isinstance(report.outcomes[0].error, batchtools.AttemptTimeoutError)
