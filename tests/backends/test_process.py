"""Tests of ProcessBackend with real worker processes, driven directly with asyncio.

Tasks that must be observed while they execute report through a FIFO and
wait at another one (see `tests.backends.process_tasks`), so no test sleeps
to wait for a state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
import sys
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from batchtools._exceptions import (
    ConfigurationError,
    RemoteError,
    RunAbortedError,
    WorkerLostError,
)
from batchtools.backends._base import Call, Context, TaskSpec
from batchtools.backends._process import (
    ProcessBackend,
    RemoteTraceback,
    check_picklable,
)
from tests.backends import process_tasks

T = TypeVar("T")

SCENARIO_TIMEOUT = 60.0
"""Seconds after which a scenario fails instead of hanging."""


class CancelledByTest(Exception):
    """The error the tests hand to cancel and stop_queued."""


class EventPipe:
    """A FIFO that tasks write lines to and the test reads on the event loop."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # A write end of our own keeps the reader from seeing end of file
        # between two tasks' writes.
        self._keep_fd = os.open(path, os.O_WRONLY)
        self._buffer = b""

    async def next_line(self) -> str:
        """Wait for the next line a task wrote and return it."""
        while b"\n" not in self._buffer:
            await self._readable()
            with contextlib.suppress(BlockingIOError):
                self._buffer += os.read(self._read_fd, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(self._read_fd, wake)
        try:
            await future
        finally:
            loop.remove_reader(self._read_fd)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._keep_fd)


class Gate:
    """A FIFO that blocked tasks read from. Each byte written frees one task."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        # With both ends open here, tasks can open it at any time and bytes
        # written before they do wait in the FIFO.
        self._read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._write_fd = os.open(path, os.O_WRONLY)

    def open(self, count: int = 1) -> None:
        os.write(self._write_fd, b"x" * count)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


@pytest.fixture(scope="module", autouse=True)
def stop_multiprocessing_helpers() -> Iterator[None]:
    """Stop the forkserver and resource tracker after this module's tests.

    The backends start these long-lived helper processes of multiprocessing,
    and tests in other modules expect the test process to have no children.
    CPython's own tests stop them with the same private methods.
    """
    yield
    gc.collect()
    # Private and absent from typeshed, hence the ignores.
    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


@pytest.fixture
def events(tmp_path: Path) -> Iterator[EventPipe]:
    pipe = EventPipe(tmp_path / "events")
    yield pipe
    pipe.close()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    fifo = Gate(tmp_path / "gate")
    yield fifo
    fifo.close()


def run(scenario: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            return await scenario

    return asyncio.run(bounded())


def make_call(payload: Any, seq: int = 0, timeout: float | None = None) -> Call:
    context = Context("run-1", f"key-{seq}", 1, seq, f"run-1/key-{seq}")
    return Call(payload, context, timeout=timeout)


async def outcome_of(backend: ProcessBackend, call: Call) -> tuple[bool, Any]:
    """Return ``(True, value)`` or ``(False, error)`` for one attempt."""
    try:
        return True, await backend.execute(call)
    except (Exception, KeyboardInterrupt, SystemExit) as error:
        return False, error


async def run_items(
    backend: ProcessBackend, payloads: Sequence[Any], first_seq: int = 0
) -> list[tuple[bool, Any]]:
    return await asyncio.gather(
        *(
            outcome_of(backend, make_call(payload, first_seq + i))
            for i, payload in enumerate(payloads)
        )
    )


def submit(backend: ProcessBackend, call: Call) -> asyncio.Task[tuple[bool, Any]]:
    return asyncio.create_task(outcome_of(backend, call))


@contextlib.asynccontextmanager
async def started(
    function: Callable[..., Any], concurrency: int
) -> AsyncIterator[ProcessBackend]:
    backend = ProcessBackend(TaskSpec.from_callable(function), concurrency)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose(cancel=True)


async def calibrate(backend: ProcessBackend, directory: Path) -> set[int]:
    """Run quick `run_once` items so that the backend chunks, and return the pids."""
    payloads = [(str(directory), 100_000 + i, "") for i in range(300)]
    outcomes = await run_items(backend, payloads, first_seq=100_000)
    assert all(ok for ok, _ in outcomes), outcomes
    return {pid for _, (_, pid) in outcomes}


def block(events: EventPipe, gate: Gate) -> str:
    return f"block:{events.path}:{gate.path}"


def ran(directory: Path, x: int) -> bool:
    return (directory / f"ran-{x}").exists()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def descendants() -> set[int]:
    return {process.pid for process in psutil.Process().children(recursive=True)}


# --- Values and errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("concurrency", "capacity"), [(1, 1024), (2, 2048), (32, 16384), (100, 25600)]
)
def test_capacity_per_worker_and_bound(concurrency: int, capacity: int) -> None:
    backend = ProcessBackend(TaskSpec.from_callable(process_tasks.square), concurrency)

    assert backend.capacity == capacity


def test_values_and_errors_per_item() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.square_or_fail, 2) as backend:
            return await run_items(backend, list(range(60)))

    outcomes = run(scenario())

    for x, (ok, value) in enumerate(outcomes):
        if x % 7 == 3:
            assert not ok, x
            assert isinstance(value, ValueError)
            assert str(value) == f"bad item {x}"
        else:
            assert ok, (x, value)
            assert value == x * x


def test_error_has_remote_traceback_as_cause() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.square_or_fail, 1) as backend:
            return await run_items(backend, [3])

    [(ok, error)] = run(scenario())

    assert not ok
    assert isinstance(error.__cause__, RemoteTraceback)
    text = str(error.__cause__)
    assert text.startswith("Traceback (most recent call last):")
    assert "in square_or_fail" in text
    assert 'raise ValueError(f"bad item {x}")' in text
    assert text.rstrip().endswith("ValueError: bad item 3")


def test_many_tiny_items_travel_in_chunks() -> None:
    async def scenario() -> tuple[list[tuple[bool, Any]], int, int]:
        async with started(process_tasks.square, 2) as backend:
            outcomes = await run_items(backend, list(range(20_000)))
            return outcomes, backend.chunks_sent, backend.statistics().workers_started

    outcomes, chunks_sent, workers_started = run(scenario())

    assert [value for _, value in outcomes] == [x * x for x in range(20_000)]
    assert all(ok for ok, _ in outcomes)
    assert chunks_sent < 2_000
    assert workers_started == 2


def test_context_reaches_task() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.describe_context, 2) as backend:
            return await run_items(backend, [10, 11, 12])

    outcomes = run(scenario())

    assert outcomes == [
        (True, (10, "key-0", 1, 0)),
        (True, (11, "key-1", 1, 1)),
        (True, (12, "key-2", 1, 2)),
    ]


def test_unpicklable_exception_becomes_remote_error() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.raise_two_argument_error, 1) as backend:
            return await run_items(backend, [5])

    [(ok, error)] = run(scenario())

    assert not ok
    assert isinstance(error, RemoteError)
    assert error.type_name == "tests.backends.process_tasks.TwoArgumentError"
    assert error.message == "code 5: the disk is full"
    assert "raise TwoArgumentError(x, " in error.traceback_text
    assert "TwoArgumentError: code 5: the disk is full" in error.traceback_text
    assert isinstance(error.__cause__, RemoteTraceback)
    assert str(error.__cause__) == error.traceback_text


def test_interrupt_and_exit_are_item_errors() -> None:
    async def scenario() -> tuple[list[tuple[bool, Any]], int]:
        async with started(process_tasks.raise_base_exception, 1) as backend:
            outcomes = await run_items(backend, ["pid", "interrupt", "exit", "pid"])
            return outcomes, backend.statistics().workers_started

    outcomes, workers_started = run(scenario())

    (first_ok, first_pid), (_, interrupt), (_, exit_), (last_ok, last_pid) = outcomes
    assert isinstance(interrupt, KeyboardInterrupt)
    assert isinstance(exit_, SystemExit)
    assert exit_.code == 4
    assert first_ok
    assert last_ok
    assert first_pid == last_pid
    assert workers_started == 1


def test_unpicklable_return_value_fails_item() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.return_lock, 1) as backend:
            return await run_items(backend, [1])

    [(ok, error)] = run(scenario())

    assert not ok
    assert isinstance(error, pickle.PicklingError)
    assert "process_tasks:return_lock" in str(error)
    assert "returned a lock that cannot be pickled" in str(error)


def test_item_unpicklable_in_parent_fails_alone() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.identity, 1) as backend:
            return await run_items(backend, [1, threading.Lock(), 3])

    outcomes = run(scenario())

    assert outcomes[0] == (True, 1)
    assert outcomes[2] == (True, 3)
    ok, error = outcomes[1]
    assert not ok
    assert isinstance(error, pickle.PicklingError)
    assert "cannot be pickled to send it to a worker process" in str(error)


def test_item_unpicklable_in_worker_fails_alone() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.identity, 1) as backend:
            # Short items first, so that the next ones share a chunk.
            await run_items(backend, list(range(300)))
            return await run_items(backend, [1, process_tasks.UnpicklableHere(), 3, 4])

    outcomes = run(scenario())

    assert outcomes[0] == (True, 1)
    assert outcomes[2] == (True, 3)
    assert outcomes[3] == (True, 4)
    ok, error = outcomes[1]
    assert not ok
    assert isinstance(error, pickle.UnpicklingError)
    assert "cannot be unpickled in the worker process" in str(error)
    assert "this object cannot be unpickled here" in str(error)


def test_large_items_and_results_round_trip() -> None:
    # Sizes around the 64 KiB of a pipe and the 256 KiB of a worker's
    # journal, so partial writes, partial reads, a full journal and results
    # too large for it all happen.
    sizes = [10, 70_000, 300_000, 3_000_000] + [40_000] * 30

    async def scenario() -> tuple[list[tuple[bool, Any]], list[tuple[bool, Any]]]:
        async with started(process_tasks.identity, 2) as backend:
            echoed = await run_items(
                backend, [process_tasks.make_bytes(size) for size in sizes]
            )
        async with started(process_tasks.make_bytes, 2) as backend:
            generated = await run_items(backend, sizes)
        return echoed, generated

    echoed, generated = run(scenario())

    for size, (ok, value) in zip(sizes, echoed, strict=True):
        assert ok
        assert value == process_tasks.make_bytes(size)
    for size, (ok, value) in zip(sizes, generated, strict=True):
        assert ok
        assert value == process_tasks.make_bytes(size)


def test_result_unpicklable_in_parent_fails_item() -> None:
    parent = os.getpid()

    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.return_unpicklable_in, 1) as backend:
            return await run_items(backend, [0, parent, 0])

    outcomes = run(scenario())

    assert outcomes[0][0]
    assert outcomes[2][0]
    ok, error = outcomes[1]
    assert not ok
    assert isinstance(error, pickle.UnpicklingError)
    assert "cannot be unpickled in the main process" in str(error)


# --- The task itself ---------------------------------------------------------


def make_locked_task() -> Callable[[int], int]:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    return locked


def test_unpicklable_task_raises_configuration_error() -> None:
    task = TaskSpec.from_callable(make_locked_task())
    backend = ProcessBackend(task, 1)

    with pytest.raises(ConfigurationError) as caught:
        check_picklable(task)
    with pytest.raises(ConfigurationError):
        run(backend.start())

    message = str(caught.value)
    assert task.name in message
    assert "lock" in message
    assert "Define the task at module level" in message
    assert backend.statistics().workers_started == 0


def test_lambda_task_travels_by_value() -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(lambda x: x + 1, 1) as backend:
            return await run_items(backend, [1, 2])

    assert run(scenario()) == [(True, 2), (True, 3)]


def test_task_not_importable_in_workers() -> None:
    # Pickled by reference to a module that exists only in this process.
    module = types.ModuleType("batchtools_test_ghost_tasks")
    exec("def ghost(x):\n    return x\n", module.__dict__)
    sys.modules[module.__name__] = module

    async def scenario() -> list[tuple[bool, Any]]:
        async with started(module.ghost, 2) as backend:
            first = await run_items(backend, [1, 2])
            later = await run_items(backend, [3])
            return first + later

    try:
        outcomes = run(scenario())
    finally:
        del sys.modules[module.__name__]

    for ok, error in outcomes:
        assert not ok
        assert isinstance(error, ConfigurationError)
        assert "batchtools_test_ghost_tasks:ghost" in str(error)
        assert "cannot be loaded in a worker process" in str(error)
        assert "ModuleNotFoundError" in str(error)


def test_workers_dying_at_startup_abort_run() -> None:
    async def scenario() -> tuple[list[tuple[bool, Any]], int]:
        async with started(process_tasks.ExitOnLoad(), 1) as backend:
            outcomes = await run_items(backend, [1, 2])
            outcomes.append(await outcome_of(backend, make_call(3)))
            return outcomes, backend.statistics().workers_started

    outcomes, workers_started = run(scenario())

    for ok, error in outcomes:
        assert not ok
        assert isinstance(error, RunAbortedError)
        assert "failed to start 3 times in a row" in str(error)
        assert "worker process exited with status 7" in str(error)
    assert workers_started == 3


# --- Concurrency -------------------------------------------------------------


def test_at_most_concurrency_items_execute(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    async def scenario() -> tuple[list[tuple[bool, Any]], set[str], int]:
        async with started(process_tasks.hold_slot, 3) as backend:
            tasks = [
                submit(
                    backend, make_call((str(tmp_path), x, events.path, gate.path), x)
                )
                for x in range(12)
            ]
            # Three items hold a slot and wait at the gate. A fourth item
            # executing now would take slot 3.
            pids = {(await events.next_line()).split()[3] for _ in range(3)}
            gate.open(12)
            outcomes = await asyncio.gather(*tasks)
            return outcomes, pids, backend.statistics().workers_started

    outcomes, pids, workers_started = run(scenario())

    assert all(ok for ok, _ in outcomes), outcomes
    assert max(slot for _, slot in outcomes) == 2
    assert len(pids) == 3
    assert workers_started == 3


def test_calls_with_timeout_travel_alone() -> None:
    async def scenario() -> tuple[list[tuple[bool, Any]], int]:
        async with started(process_tasks.square, 1) as backend:
            await run_items(backend, list(range(300)))
            before = backend.chunks_sent
            outcomes = await asyncio.gather(
                *(outcome_of(backend, make_call(x, x, timeout=60.0)) for x in range(20))
            )
            return outcomes, backend.chunks_sent - before

    outcomes, chunks = run(scenario())

    assert outcomes == [(True, x * x) for x in range(20)]
    assert chunks == 20


def test_workers_ignore_sigint(tmp_path: Path, events: EventPipe, gate: Gate) -> None:
    async def scenario() -> tuple[tuple[bool, Any], tuple[bool, Any], int, int]:
        async with started(process_tasks.run_once, 1) as backend:
            blocked = submit(
                backend, make_call((str(tmp_path), 1, block(events, gate)))
            )
            pid = int((await events.next_line()).split()[2])
            os.kill(pid, signal.SIGINT)
            gate.open()
            first = await blocked
            second = await outcome_of(backend, make_call((str(tmp_path), 2, "")))
            return first, second, pid, backend.statistics().workers_started

    first, second, pid, workers_started = run(scenario())

    assert first == (True, (1, pid))
    assert second == (True, (2, pid))
    assert workers_started == 1


# --- Lost workers ------------------------------------------------------------


def test_sigkill_fails_only_that_item(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    async def scenario() -> Any:
        async with started(process_tasks.run_once, 2) as backend:
            original = await calibrate(backend, tmp_path)
            payloads = [
                (str(tmp_path), x, "sigkill" if x == 160 else "") for x in range(300)
            ]
            outcomes = await run_items(backend, payloads)
            # Two items waiting at the gate at the same time prove that two
            # workers are alive, one of them the replacement.
            blocked = [
                submit(backend, make_call((str(tmp_path), x, block(events, gate)), x))
                for x in (1000, 1001)
            ]
            pids = {int((await events.next_line()).split()[2]) for _ in blocked}
            gate.open(2)
            await asyncio.gather(*blocked)
            return original, outcomes, pids, backend.statistics()

    original, outcomes, pids, statistics = run(scenario())

    ok, error = outcomes[160]
    assert not ok
    assert isinstance(error, WorkerLostError)
    assert error.exit_status == -9
    assert "SIGKILL" in str(error)
    # run_once raises FileExistsError for an item that runs twice, so this
    # also shows that no finished item was executed again.
    for x, (ok, value) in enumerate(outcomes):
        if x != 160:
            assert ok, (x, value)
            assert value[0] == x
    assert len(original) == 2
    assert len(pids - original) == 1
    assert statistics.workers_started == 3
    assert statistics.workers_lost == 1


@pytest.mark.parametrize(
    ("action", "exit_status", "text"),
    [
        ("sigsegv", -11, "worker process killed by SIGSEGV"),
        ("exit3", 3, "worker process exited with status 3"),
    ],
)
def test_lost_worker_exit_status(
    tmp_path: Path, action: str, exit_status: int, text: str
) -> None:
    async def scenario() -> list[tuple[bool, Any]]:
        async with started(process_tasks.run_once, 1) as backend:
            payloads = [(str(tmp_path), 0, ""), (str(tmp_path), 1, action)]
            payloads.append((str(tmp_path), 2, ""))
            return await run_items(backend, payloads)

    first, (ok, error), last = run(scenario())

    assert first[0]
    assert last[0]
    assert not ok
    assert isinstance(error, WorkerLostError)
    assert error.exit_status == exit_status
    assert str(error) == text


# --- Cancel and stop ---------------------------------------------------------


def test_cancel_executing_call_kills_and_replaces(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    async def scenario() -> Any:
        async with started(process_tasks.run_once, 1) as backend:
            await calibrate(backend, tmp_path)
            calls = [
                make_call((str(tmp_path), 1, block(events, gate)), 1),
                make_call((str(tmp_path), 2, ""), 2),
                make_call((str(tmp_path), 3, ""), 3),
            ]
            tasks = [submit(backend, call) for call in calls]
            pid = int((await events.next_line()).split()[2])
            backend.cancel(calls[0], CancelledByTest("cancelled"))
            outcomes = await asyncio.gather(*tasks)
            return outcomes, pid, backend.statistics()

    outcomes, pid, statistics = run(scenario())

    ok, error = outcomes[0]
    assert not ok
    assert isinstance(error, CancelledByTest)
    assert outcomes[1][0]
    assert outcomes[2][0]
    assert outcomes[1][1][1] != pid
    assert statistics.workers_started == 2
    assert statistics.workers_lost == 0


def test_cancel_call_sent_but_not_started(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    async def scenario() -> Any:
        async with started(process_tasks.run_once, 1) as backend:
            await calibrate(backend, tmp_path)
            before = backend.chunks_sent
            calls = [
                make_call((str(tmp_path), 1, block(events, gate)), 1),
                make_call((str(tmp_path), 2, ""), 2),
                make_call((str(tmp_path), 3, ""), 3),
            ]
            tasks = [submit(backend, call) for call in calls]
            await events.next_line()
            # All three calls are at the worker: this test is about those.
            assert backend.chunks_sent - before == 2
            backend.cancel(calls[1], CancelledByTest("second"))
            backend.cancel(calls[2], CancelledByTest("third"))
            # Both fail while the first call still waits at the gate.
            cancelled = await asyncio.gather(tasks[1], tasks[2])
            gate.open()
            first = await tasks[0]
            return first, cancelled, backend.statistics()

    first, cancelled, statistics = run(scenario())

    assert first[0]
    assert [str(error) for _, error in cancelled] == ["second", "third"]
    assert all(isinstance(error, CancelledByTest) for _, error in cancelled)
    assert not ran(tmp_path, 2)
    assert not ran(tmp_path, 3)
    assert statistics.workers_started == 1


def test_cancel_call_queued_in_parent(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    async def scenario() -> Any:
        async with started(process_tasks.run_once, 1) as backend:
            calls = [
                make_call((str(tmp_path), 1, block(events, gate)), 1),
                make_call((str(tmp_path), 2, ""), 2),
            ]
            tasks = [submit(backend, call) for call in calls]
            await events.next_line()
            backend.cancel(calls[1], CancelledByTest("queued"))
            cancelled = await tasks[1]
            gate.open()
            return await tasks[0], cancelled

    first, (ok, error) = run(scenario())

    assert first[0]
    assert not ok
    assert isinstance(error, CancelledByTest)
    assert not ran(tmp_path, 2)


def test_cancel_before_execute(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, Any]:
        async with started(process_tasks.run_once, 1) as backend:
            call = make_call((str(tmp_path), 1, ""), 1)
            backend.cancel(call, CancelledByTest("early"))
            return await outcome_of(backend, call)

    ok, error = run(scenario())

    assert not ok
    assert isinstance(error, CancelledByTest)
    assert not ran(tmp_path, 1)


def test_stop_queued_fails_unstarted_calls(
    tmp_path: Path, events: EventPipe, gate: Gate
) -> None:
    stop = CancelledByTest("stopped")

    async def scenario() -> Any:
        async with started(process_tasks.run_once, 1) as backend:
            await calibrate(backend, tmp_path)
            blocked = submit(
                backend, make_call((str(tmp_path), 0, block(events, gate)), 0)
            )
            queued = [
                submit(backend, make_call((str(tmp_path), x, ""), x))
                for x in range(1, 2500)
            ]
            await events.next_line()
            backend.stop_queued(stop)
            stopped = await asyncio.gather(*queued)
            late = await outcome_of(backend, make_call((str(tmp_path), 9999, ""), 9999))
            gate.open()
            return await blocked, stopped, late, backend.statistics()

    first, stopped, late, statistics = run(scenario())

    assert first[0]
    assert all(outcome == (False, stop) for outcome in stopped)
    assert late == (False, stop)
    assert not any(ran(tmp_path, x) for x in range(1, 2500))
    assert not ran(tmp_path, 9999)
    assert statistics.workers_started == 1


# --- Closing -----------------------------------------------------------------


@pytest.mark.parametrize("cancel", [False, True])
def test_aclose_reaps_workers_and_closes_fds(
    tmp_path: Path, events: EventPipe, gate: Gate, cancel: bool
) -> None:
    async def warm_up() -> None:
        # Starts multiprocessing's forkserver and resource tracker, which
        # stay, and lets its shared-memory heap allocate its arena.
        async with started(process_tasks.square, 2) as backend:
            await run_items(backend, [1, 2, 3])

    async def scenario() -> Any:
        backend = ProcessBackend(TaskSpec.from_callable(process_tasks.run_once), 2)
        await backend.start()
        payloads = [(str(tmp_path), x, "sigkill" if x == 5 else "") for x in range(20)]
        outcomes = await run_items(backend, payloads)
        blocked = None
        if cancel:
            call = make_call((str(tmp_path), 100, block(events, gate)), 100)
            blocked = submit(backend, call)
            await events.next_line()
        await backend.aclose(cancel=cancel)
        return outcomes, (await blocked if blocked else None), backend.statistics()

    run(warm_up())
    gc.collect()
    fds_before = open_fds()
    children_before = descendants()

    outcomes, blocked, statistics = run(scenario())
    gc.collect()

    assert open_fds() == fds_before
    assert descendants() == children_before
    assert statistics.workers_started == 3
    assert isinstance(outcomes[5][1], WorkerLostError)
    if cancel:
        assert blocked is not None
        assert not blocked[0]
        assert isinstance(blocked[1], RuntimeError)
