"""Tests of KeyedLock, SharedState and open_run_resources with real files.

Runs go through `batchtools.run` on the async, thread and process backends.
Tests that need a key held while something else happens coordinate through
events and pipes, never through sleeps. A wait that ends only when the code
is broken has a generous timeout, so the test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import multiprocessing
import os
import pickle
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools import ConfigurationError, JournalError
from batchtools.flow.locks import (
    KeyedLock,
    LockStatistics,
    RunResources,
    SharedState,
    open_run_resources,
)
from batchtools.journal._state_store import key_text_of
from tests.flow import lock_tasks

WAIT = 30.0
"""Seconds a test waits for something that happens at once unless the code is broken."""


@pytest.fixture
def resources(tmp_path: Path) -> Iterator[RunResources]:
    opened = open_run_resources(tmp_path / "run")
    yield opened
    opened.close()


class InsideCounter:
    """Counts the threads inside a critical section and keeps the maximum."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.now = 0
        self.max = 0

    def enter(self) -> None:
        with self._mutex:
            self.now += 1
            self.max = max(self.max, self.now)

    def leave(self) -> None:
        with self._mutex:
            self.now -= 1


def try_hold(lock: KeyedLock, key: str) -> None:
    """Take and release the lock of ``key`` if it is free, else raise TimeoutError."""
    with lock.hold(key, timeout=0):
        pass


def key_on_other_stripe(lock: KeyedLock, key: str) -> str:
    """Return a key whose lock file differs from that of ``key``."""
    index = lock._stripe_of(key_text_of(key))
    for n in range(1000):
        candidate = f"{key}-other-{n}"
        if lock._stripe_of(key_text_of(candidate)) != index:
            return candidate
    raise AssertionError("every candidate key shares the lock file")


# -- 100 increments under one key, on each backend -----------------------


def test_thread_increments_under_one_key(resources: RunResources) -> None:
    lock, shared = resources.lock, resources.shared
    inside = InsideCounter()

    def increment(_: int) -> None:
        with lock.hold("count"):
            inside.enter()
            value = shared.get("count", 0)
            shared.set("count", value + 1)
            inside.leave()

    report = batchtools.run(range(100), increment, backend="thread", concurrency=16)

    assert report.ok
    assert shared.get("count") == 100
    assert inside.max == 1
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_async_increments_under_one_key(resources: RunResources) -> None:
    lock, shared = resources.lock, resources.shared
    inside = InsideCounter()

    async def increment(_: int) -> None:
        async with lock.hold_async("count"):
            inside.enter()
            value = await shared.aget("count", 0)
            await asyncio.sleep(0)  # another task would read the same value here
            await shared.aset("count", value + 1)
            inside.leave()

    report = batchtools.run(range(100), increment, backend="async", concurrency=16)

    assert report.ok
    assert shared.get("count") == 100
    assert inside.max == 1
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_process_increments_under_one_key(resources: RunResources) -> None:
    # NOTE: when few attempts overlap, this run can pass with a broken file
    # lock. test_killed_holder_releases_key checks the exclusion directly.
    items = [(resources.lock, resources.shared, n) for n in range(100)]

    report = batchtools.run(
        items, lock_tasks.increment_under_lock, backend="process", concurrency=4
    )

    assert report.ok
    assert resources.shared.get("count") == 100
    assert set(report.values()) == {1}  # one holder inside at a time
    assert resources.shared.get("inside") == 0


def test_process_updates_are_atomic(resources: RunResources) -> None:
    items = [(resources.lock, resources.shared, n) for n in range(100)]

    report = batchtools.run(
        items, lock_tasks.increment_by_update, backend="process", concurrency=4
    )

    assert report.ok
    assert resources.shared.get("count") == 100
    assert sorted(report.values()) == list(range(1, 101))


def test_thread_updates_are_atomic(resources: RunResources) -> None:
    shared = resources.shared

    def increment(_: int) -> int:
        value: int = shared.update("count", lambda n: n + 1, 0)
        return value

    report = batchtools.run(range(100), increment, backend="thread", concurrency=16)

    assert shared.get("count") == 100
    assert sorted(report.values()) == list(range(1, 101))


# -- keys that never wait on each other ----------------------------------


@pytest.mark.parametrize("stripes", [1, 4096])
def test_other_key_proceeds_while_held(tmp_path: Path, stripes: int) -> None:
    # With one stripe both keys share the lock file, which must not make
    # them wait for each other inside one process.
    lock = KeyedLock(tmp_path / "locks", stripes=stripes)
    a_held = threading.Event()
    release_a = threading.Event()
    b_held = threading.Event()

    def hold_a() -> None:
        with lock.hold("a"):
            a_held.set()
            release_a.wait(WAIT)

    def hold_b() -> None:
        with lock.hold("b"):
            b_held.set()

    holder = threading.Thread(target=hold_a)
    holder.start()
    try:
        assert a_held.wait(WAIT)
        with pytest.raises(TimeoutError, match="key 'a' was not free within 0 s"):
            try_hold(lock, "a")
        other = threading.Thread(target=hold_b)
        other.start()
        assert b_held.wait(WAIT)
        other.join(WAIT)
        assert not release_a.is_set()
    finally:
        release_a.set()
        holder.join(WAIT)
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_other_key_proceeds_while_held_async(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    async def scenario() -> None:
        a_held = asyncio.Event()
        release_a = asyncio.Event()

        async def hold_a() -> None:
            async with lock.hold_async("a"):
                a_held.set()
                await release_a.wait()

        holder = asyncio.create_task(hold_a())
        await asyncio.wait_for(a_held.wait(), WAIT)
        with pytest.raises(TimeoutError, match="key 'a' was not free"):
            async with lock.hold_async("a", timeout=0):
                pass
        async with asyncio.timeout(WAIT), lock.hold_async("b"):
            assert not holder.done()
        release_a.set()
        await asyncio.wait_for(holder, WAIT)

    asyncio.run(scenario())
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_nested_keys_on_one_stripe_do_not_deadlock(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks", stripes=1)

    with lock.hold("a"), lock.hold("b", timeout=WAIT):
        assert lock.statistics() == LockStatistics(2, 0, 1)

    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_lock_is_not_reentrant(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    with lock.hold("a"), pytest.raises(TimeoutError):
        try_hold(lock, "a")

    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_keys_match_by_type(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    with lock.hold(1), lock.hold("1", timeout=0), lock.hold((1,), timeout=0):
        assert lock.statistics().keys_held == 3


# -- waiters: order, cancellation, threads with coroutines ---------------


def test_async_waiters_get_key_in_fifo_order() -> None:
    lock = KeyedLock()
    order: list[int] = []

    async def scenario() -> None:
        async def wait_for_key(n: int) -> None:
            async with lock.hold_async("k"):
                order.append(n)

        async with lock.hold_async("k"):
            waiters = [asyncio.create_task(wait_for_key(n)) for n in range(5)]
            await asyncio.sleep(0)  # each waiter runs up to its wait
            assert lock.statistics() == LockStatistics(1, 5, 0)
        await asyncio.wait_for(asyncio.gather(*waiters), WAIT)

    asyncio.run(scenario())
    assert order == [0, 1, 2, 3, 4]


def test_cancelled_waiter_leaves_no_hold(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    async def scenario() -> None:
        async def wait_for_key() -> None:
            async with lock.hold_async("k"):
                raise AssertionError("a cancelled waiter got the key")

        async with lock.hold_async("k"):
            waiter = asyncio.create_task(wait_for_key())
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert lock.statistics() == LockStatistics(1, 0, 1)
        async with lock.hold_async("k", timeout=0):
            pass

    asyncio.run(scenario())
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_cancelled_handover_passes_key_on(tmp_path: Path) -> None:
    # The release hands the key to the first waiter, which is cancelled
    # before it runs; the key must go on to the next waiter.
    lock = KeyedLock(tmp_path / "locks")
    got_key: list[str] = []

    async def scenario() -> None:
        async def wait_for_key(name: str) -> None:
            async with lock.hold_async("k"):
                got_key.append(name)

        holder = lock.hold_async("k")
        await holder.__aenter__()
        first = asyncio.create_task(wait_for_key("first"))
        second = asyncio.create_task(wait_for_key("second"))
        await asyncio.sleep(0)
        await holder.__aexit__(None, None, None)
        first.cancel()
        await asyncio.wait_for(second, WAIT)
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
    assert got_key == ["second"]
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_async_wait_times_out(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    async def scenario() -> None:
        async with lock.hold_async("k"):
            with pytest.raises(TimeoutError, match="key 'k' was not free"):
                async with lock.hold_async("k", timeout=0.01):
                    pass
            assert lock.statistics() == LockStatistics(1, 0, 1)

    asyncio.run(scenario())
    assert lock.statistics() == LockStatistics(0, 0, 0)


def test_coroutine_waits_for_thread_holder(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")
    held = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def hold_in_thread() -> None:
        with lock.hold("k"):
            held.set()
            release.wait(WAIT)
            order.append("thread released")

    async def scenario() -> None:
        async def wait_for_key() -> None:
            async with lock.hold_async("k"):
                order.append("coroutine holds")

        assert await asyncio.to_thread(held.wait, WAIT)
        waiter = asyncio.create_task(wait_for_key())
        await asyncio.sleep(0)
        assert lock.statistics().waiters == 1
        release.set()
        await asyncio.wait_for(waiter, WAIT)

    thread = threading.Thread(target=hold_in_thread)
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        release.set()
        thread.join(WAIT)
    assert order == ["thread released", "coroutine holds"]


def test_hold_in_event_loop_raises(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match=r"use 'async with lock\.hold_async"):
            try_hold(lock, "k")

    asyncio.run(scenario())


def test_entries_are_dropped_after_release(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks", stripes=8)

    for n in range(1000):
        with lock.hold(f"key-{n}"):
            pass

    tables = lock._process_tables()
    assert tables.keys.counts() == (0, 0)
    assert tables.stripes is not None
    assert len(tables.stripes._stripes) <= 8
    assert len(list((tmp_path / "locks").glob("*.lock"))) <= 8


# -- across processes ----------------------------------------------------


def test_killed_holder_releases_key(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks", stripes=16)
    other_key = key_on_other_stripe(lock, "a")
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(
        target=lock_tasks.hold_until_killed, args=(lock, "a", theirs)
    )
    child.start()
    try:
        assert ours.poll(WAIT), "the child process never took the lock"
        assert ours.recv() == "held"

        with pytest.raises(TimeoutError, match="key 'a' was not free"):
            try_hold(lock, "a")
        with lock.hold(other_key, timeout=0):
            pass

        child.kill()
        child.join(WAIT)
        assert child.exitcode == -9
        with lock.hold("a", timeout=WAIT):
            assert lock.statistics() == LockStatistics(1, 0, 1)
    finally:
        if child.is_alive():
            child.kill()
            child.join(WAIT)


def test_shared_stripe_waits_across_processes(tmp_path: Path) -> None:
    # One stripe: every key shares the file, so a key held in another
    # process makes every other key wait too. Slower, still exclusive.
    lock = KeyedLock(tmp_path / "locks", stripes=1)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(
        target=lock_tasks.hold_until_killed, args=(lock, "a", theirs)
    )
    child.start()
    try:
        assert ours.poll(WAIT), "the child process never took the lock"
        with pytest.raises(TimeoutError, match="key 'b' was not free"):
            try_hold(lock, "b")
    finally:
        child.kill()
        child.join(WAIT)
    with lock.hold("b", timeout=WAIT):
        pass


# -- pickling ------------------------------------------------------------


def test_lock_pickles_as_directory_and_settings(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks", stripes=64, poll_interval=0.5)

    copy = pickle.loads(pickle.dumps(lock))

    assert isinstance(copy, KeyedLock)
    assert copy.directory == lock.directory
    assert copy.stripes == 64
    assert copy.poll_interval == 0.5
    assert str(tmp_path / "locks").encode() in pickle.dumps(lock)
    with lock.hold("k"), pytest.raises(TimeoutError):
        try_hold(copy, "k")


def test_lock_without_directory_does_not_pickle() -> None:
    with pytest.raises(TypeError, match="give it a directory"):
        pickle.dumps(KeyedLock())


def test_shared_state_pickles_as_path(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db", busy_timeout=5)
    shared.set("k", [1, "two"])

    copy = pickle.loads(pickle.dumps(shared))

    assert copy.path == shared.path
    assert copy.busy_timeout == 5.0
    assert copy.get("k") == [1, "two"]
    copy.set("k", "changed")
    assert shared.get("k") == "changed"


def test_run_resources_pickle_together(resources: RunResources) -> None:
    lock, shared = pickle.loads(pickle.dumps((resources.lock, resources.shared)))

    assert lock.directory == resources.directory / "locks"
    assert shared.path == resources.directory / "shared.db"


# -- shared state values -------------------------------------------------


class Color(enum.Enum):
    RED = 1


@pytest.mark.parametrize(
    "value",
    [
        "text",
        b"\xff\xfe invalid utf-8",
        -(2**70),
        1.5,
        float("inf"),
        True,
        None,
        (1, [2, 3]),
        {"a": {1: b"x"}, (1, 2): None},
        {1, 2},
        frozenset({"x"}),
        Path("/tmp/x"),
    ],
)
def test_values_round_trip_with_type(tmp_path: Path, value: Any) -> None:
    shared = SharedState(tmp_path / "shared.db")

    shared.set("k", value)

    stored = shared.get("k")
    assert stored == value
    assert type(stored) is type(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), r"the value has type builtins\.object"),
        ({"when": datetime(2024, 1, 1)}, r"the value\['when'\] has type datetime"),
        ([1, Color.RED], r"the value\[1\] has type tests\.flow\.test_locks\.Color"),
        ({(1, object()): 1}, r"a key of the value\[1\] has type builtins\.object"),
    ],
)
def test_set_rejects_values_that_need_pickle(
    tmp_path: Path, value: Any, message: str
) -> None:
    shared = SharedState(tmp_path / "shared.db")

    with pytest.raises(TypeError, match=message):
        shared.set("k", value)

    assert shared.get("k") is None


def test_update_rejects_new_value_that_needs_pickle(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")
    shared.set("k", 1)

    with pytest.raises(TypeError, match="the value that fn returned for key 'k'"):
        shared.update("k", lambda _: object())

    assert shared.get("k") == 1


def test_update_rolls_back_when_fn_raises(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")
    shared.set("k", 1)

    def fail(_: Any) -> Any:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        shared.update("k", fail)

    assert shared.get("k") == 1
    assert shared.update("k", lambda n: n + 1) == 2


def test_update_fn_calling_store_raises(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")

    with pytest.raises(RuntimeError, match="called the store"):
        shared.update("k", lambda _: shared.get("other"))

    assert shared.get("k") is None


def test_keys_must_be_hashable_and_storable(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")

    with pytest.raises(TypeError, match="key \\[1\\] is not hashable"):
        shared.set([1], 1)
    with pytest.raises(TypeError, match=r"has type tests\.flow\.test_locks\.Color"):
        shared.set(Color.RED, 1)
    with pytest.raises(ValueError, match="lone surrogate"):
        shared.set("\udc80", 1)


def test_get_delete_and_items(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")
    shared.set("a", 1)
    shared.set((2, "b"), [2])

    assert shared.get("missing", "default") == "default"
    assert shared.items() == {"a": 1, (2, "b"): [2]}
    assert shared.delete("a") is True
    assert shared.delete("a") is False
    assert shared.items() == {(2, "b"): [2]}


def test_async_twins(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")

    async def scenario() -> None:
        await shared.aset("k", 1)
        assert await shared.aupdate("k", lambda n: n + 1) == 2
        assert await shared.aget("k") == 2
        assert await shared.aitems() == {"k": 2}
        assert await shared.adelete("k") is True
        assert await shared.aget("k", "gone") == "gone"

    asyncio.run(scenario())


class CreatesFile:
    """Unpickling this creates the file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_stored_pickle_is_never_unpickled(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")
    shared.set("k", 1)
    marker = tmp_path / "unpickled"
    # A row written by other software, in the codec's format for a pickle.
    payload = base64.b64encode(pickle.dumps(CreatesFile(marker))).decode()
    with sqlite3.connect(tmp_path / "shared.db") as conn:
        conn.execute(
            "UPDATE state SET value = ? WHERE key = ?",
            (f'["x","{payload}"]', key_text_of("k")),
        )
    conn.close()

    with pytest.raises(JournalError, match="contains a pickled object"):
        shared.get("k")
    assert not marker.exists()


def test_close_then_use_reopens(tmp_path: Path) -> None:
    shared = SharedState(tmp_path / "shared.db")
    shared.set("k", 1)

    shared.close()
    shared.close()

    assert shared.get("k") == 1


# -- invalid paths and options -------------------------------------------


def test_other_stripe_count_is_rejected(tmp_path: Path) -> None:
    KeyedLock(tmp_path / "locks", stripes=16)

    with pytest.raises(ConfigurationError, match="stripes=16, and this lock has"):
        KeyedLock(tmp_path / "locks", stripes=32)


def test_recorded_stripes_are_checked_on_reopen(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks", stripes=16)
    settings = (tmp_path / "locks" / "settings.json").read_text()
    del lock

    assert settings == '{"stripes": 16}\n'
    with pytest.raises(ConfigurationError, match="set up with stripes=16"):
        KeyedLock(tmp_path / "locks", stripes=32)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stripes": 0}, r"stripes=0 is invalid"),
        ({"stripes": 2.0}, r"stripes=2.0 is invalid"),
        ({"poll_interval": 0}, r"poll_interval=0 is invalid"),
        ({"poll_interval": float("nan")}, r"poll_interval=nan is invalid"),
    ],
)
def test_lock_options_are_checked(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KeyedLock(tmp_path / "locks", **options)


def test_negative_timeout_is_rejected(tmp_path: Path) -> None:
    lock = KeyedLock(tmp_path / "locks")

    with pytest.raises(ValueError, match="timeout=-1 is invalid"):
        lock.hold("k", timeout=-1).__enter__()


def test_symlinked_lock_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")

    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        KeyedLock(tmp_path / "link")


def test_file_as_lock_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(ConfigurationError, match="it is not a directory"):
        open_run_resources(tmp_path / "file")


def test_other_sqlite_file_is_rejected(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()

    with pytest.raises(ConfigurationError, match="not a batchtools shared state"):
        SharedState(tmp_path / "other.db")


def test_directory_as_shared_state_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError, match="it is a directory; give the path of a file inside it"
    ):
        SharedState(tmp_path)


def test_busy_timeout_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="busy_timeout=0 is invalid"):
        SharedState(tmp_path / "shared.db", busy_timeout=0)


def test_run_resources_are_private(tmp_path: Path) -> None:
    opened = open_run_resources(tmp_path / "run")
    with opened.lock.hold("k"):
        pass
    opened.close()

    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run" / "locks").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run" / "shared.db").stat().st_mode & 0o777 == 0o600
    lock_files = list((tmp_path / "run" / "locks").glob("*.lock"))
    assert [os.stat(path).st_mode & 0o777 for path in lock_files] == [0o600]
