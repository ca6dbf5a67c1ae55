"""The result cache: memory LRU and TTL, the disk store, single flight, decorators."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from batchtools import _codec
from batchtools._exceptions import ConfigurationError
from batchtools.journal._cache_store import USED_RESOLUTION, CacheStore
from batchtools.policy.cache import Cache, ResultCache
from batchtools.testing import FakeClock

LIMIT = 10.0
"""Seconds a test waits for threads or tasks before it fails.

Passing tests need a small fraction of it.
"""

CALLERS = 32


def disk_key(namespace: str, key: str) -> str:
    """Return the key under which ``ResultCache`` stores ``key`` on disk."""
    return _codec.digest(_codec.encode(namespace)) + ":" + key


def stored_texts(path: Path) -> list[str]:
    """Return every value text in the cache file at ``path``."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT value FROM entries")]
    finally:
        conn.close()


# -- configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 0}, r"invalid cache ttl 0: it must be greater than zero"),
        ({"ttl": -5.0}, r"invalid cache ttl -5.0"),
        ({"ttl": "0s"}, r"invalid cache ttl '0s'"),
        ({"ttl": "soon"}, r"invalid cache ttl 'soon'"),
        ({"ttl": True}, r"invalid cache ttl True"),
        ({"max_entries": 0}, r"max_entries=0 must be at least 1"),
        ({"max_entries": True}, r"max_entries=True must be an integer"),
        ({"max_entries": 2.5}, r"max_entries=2.5 must be an integer"),
        ({"max_size": "0M", "path": "c.db"}, r"invalid cache max_size '0M'"),
        ({"max_size": True, "path": "c.db"}, r"invalid cache max_size True"),
        ({"max_size": "1G"}, r"max_size='1G' bounds the file on disk, but path"),
        ({"path": ""}, r"path='' is empty"),
        ({"path": 5}, r"path=5 must be a file path or None"),
        ({"clock": 3.0}, r"clock=3.0 must be callable"),
    ],
)
def test_cache_rejects_invalid_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Cache(**options)


def test_cache_reads_ttl_text() -> None:
    clock = FakeClock()
    with Cache(ttl="1h", clock=clock).open("task") as cache:
        cache.store("k", 1)
        clock.advance(3599.5)
        assert cache.lookup("k") == (True, 1)
        clock.advance(0.5)
        assert cache.lookup("k") == (False, None)


def test_open_rejects_empty_namespace() -> None:
    with pytest.raises(ConfigurationError, match="namespace '' must be a non-empty"):
        Cache().open("")


# -- memory -----------------------------------------------------------------


def test_memory_evicts_least_recently_used() -> None:
    cache = Cache(max_entries=2).open("task")
    cache.store("a", 1)
    cache.store("b", 2)
    assert cache.lookup("a") == (True, 1)

    cache.store("c", 3)

    assert cache.lookup("b") == (False, None)
    assert cache.lookup("a") == (True, 1)
    assert cache.lookup("c") == (True, 3)


def test_memory_entry_expires_after_ttl() -> None:
    clock = FakeClock(1000.0)
    cache = Cache(ttl=10, clock=clock).open("task")
    cache.store("k", "value")

    clock.advance(9.9)
    assert cache.lookup("k") == (True, "value")
    clock.advance(0.1)
    assert cache.lookup("k") == (False, None)


def test_counters_and_repr() -> None:
    cache = Cache().open("task")
    cache.store("k", None)

    assert cache.lookup("k") == (True, None)
    assert cache.lookup("other") == (False, None)
    assert cache.hits == 1
    assert cache.misses == 1
    assert cache.stored == 1
    assert cache.unstorable == 0
    assert "hits=1 misses=1 stored=1" in repr(cache)


# -- disk -------------------------------------------------------------------


def test_disk_keeps_values_across_runs(tmp_path: Path) -> None:
    policy = Cache(path=tmp_path / "cache.db")
    with policy.open("task") as first_run:
        first_run.store("k", {"answer": 42})

    with policy.open("task") as second_run:
        assert second_run.lookup("k") == (True, {"answer": 42})
        assert second_run.hits == 1


WRITER_SCRIPT = """
import sys
from batchtools.policy.cache import Cache

with Cache(path=sys.argv[1]).open("task") as cache:
    cache.store("k", ("from", "child"))
"""


def test_disk_is_shared_with_another_process(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    with Cache(path=path).open("task") as cache:
        assert cache.lookup("k") == (False, None)

        subprocess.run(
            [sys.executable, "-c", WRITER_SCRIPT, str(path)], check=True, timeout=LIMIT
        )

        assert cache.lookup("k") == (True, ("from", "child"))


def test_disk_hit_is_kept_in_memory(tmp_path: Path) -> None:
    policy = Cache(path=tmp_path / "cache.db")
    with policy.open("task") as first_run:
        first_run.store("k", "value")
    second_run = policy.open("task")
    assert second_run.lookup("k") == (True, "value")

    second_run.close()

    # Without its disk store, the cache can only find the value in memory.
    assert second_run.lookup("k") == (True, "value")


def test_disk_creates_missing_folder_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "cache.db"
    with Cache(path=path).open("task"):
        pass

    assert path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_disk_entry_expires_after_ttl(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    policy = Cache(path=tmp_path / "cache.db", ttl="1h", clock=clock)
    with policy.open("task") as first_run:
        first_run.store("k", "value")

    clock.advance(3000)
    with policy.open("task") as second_run:
        assert second_run.lookup("k") == (True, "value")
        # The copy in memory keeps the age of the disk entry.
        clock.advance(600)
        assert second_run.lookup("k") == (False, None)

    with policy.open("task") as third_run:
        assert third_run.lookup("k") == (False, None)
    assert stored_texts(tmp_path / "cache.db") == []


def test_disk_drops_expired_entries_at_open(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    path = tmp_path / "cache.db"
    with Cache(path=path, clock=clock).open("task") as first_run:
        first_run.store("old", 1)
        clock.advance(100)
        first_run.store("new", 2)

    clock.advance(50)
    with Cache(path=path, ttl=120, clock=clock).open("task"):
        assert stored_texts(path) == [_codec.encode(2)]


def test_disk_max_size_keeps_recently_used(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    path = tmp_path / "cache.db"
    value = "x" * 100
    entry_size = len(disk_key("task", "a")) + len(_codec.encode(value))
    policy = Cache(path=path, max_size=3 * entry_size + 10, clock=clock)
    with policy.open("task") as cache:
        for key in ("a", "b", "c"):
            cache.store(key, value)
            clock.advance(1)
        clock.advance(USED_RESOLUTION)
        # A hit from memory counts as a use on disk too.
        assert cache.lookup("a") == (True, value)
        clock.advance(1)

        cache.store("d", value)

    with policy.open("task") as next_run:
        assert next_run.lookup("a") == (True, value)
        assert next_run.lookup("b") == (False, None)
        assert next_run.lookup("c") == (True, value)
        assert next_run.lookup("d") == (True, value)


def test_disk_skips_value_larger_than_max_size(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    with Cache(path=path, max_size=200).open("task") as cache:
        cache.store("small", "s")
        cache.store("large", "x" * 500)

        assert cache.lookup("large") == (True, "x" * 500)
        assert cache.unstorable == 1
    assert stored_texts(path) == [_codec.encode("s")]


def test_namespaces_do_not_share_entries(tmp_path: Path) -> None:
    policy = Cache(path=tmp_path / "cache.db")
    with policy.open("task one") as one:
        one.store("k", 1)

    with policy.open("task two") as two:
        assert two.lookup("k") == (False, None)
    with policy.open("task one") as one_again:
        assert one_again.lookup("k") == (True, 1)


@pytest.mark.parametrize(
    "value",
    [
        (1, 2),
        [1, 2],
        b"\xff\x00 not utf-8",
        b"plain",
        {1: "int key", "1": "str key"},
        {"nested": [(1.5, None), {True, 3}]},
        frozenset({"a"}),
        Path("/tmp/x"),
        float("inf"),
    ],
    ids=repr,
)
def test_disk_round_trips_types(tmp_path: Path, value: Any) -> None:
    policy = Cache(path=tmp_path / "cache.db")
    with policy.open("task") as first_run:
        first_run.store("k", value)

    with policy.open("task") as second_run:
        found, restored = second_run.lookup("k")
    assert found
    assert type(restored) is type(value)
    assert restored == value


# -- values kept out of the disk store --------------------------------------


class Opaque:
    """A type outside the codec's table, so the codec pickles it."""

    def __init__(self, number: int) -> None:
        self.number = number

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.number == self.number

    def __hash__(self) -> int:
        return self.number


UNPICKLED: list[str] = []


def record_unpickling() -> str:
    """Record that a planted pickle ran; it must never be called."""
    UNPICKLED.append("ran")
    return "planted"


class Planted:
    """An object whose unpickling calls `record_unpickling`."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (record_unpickling, ())


@pytest.mark.parametrize(
    "value",
    [Opaque(7), Fraction(1, 3), threading.Lock(), "lone \ud800 surrogate"],
    ids=["pickled object", "fraction", "unpicklable lock", "lone surrogate"],
)
def test_unstorable_value_stays_in_memory(tmp_path: Path, value: Any) -> None:
    policy = Cache(path=tmp_path / "cache.db")
    with policy.open("task") as first_run:
        first_run.store("k", value)

        assert first_run.lookup("k") == (True, value)
        assert first_run.unstorable == 1

    assert stored_texts(tmp_path / "cache.db") == []
    with policy.open("task") as second_run:
        assert second_run.lookup("k") == (False, None)


def test_disk_entry_with_pickle_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    store = CacheStore.open(path)
    store.put(disk_key("task", "k"), _codec.encode([1, Planted()]), time.time())
    store.close()

    with Cache(path=path).open("task") as cache:
        assert cache.lookup("k") == (False, None)
    assert UNPICKLED == []


def test_damaged_disk_entry_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    store = CacheStore.open(path)
    store.put(disk_key("task", "k"), '["?",1]', time.time())
    store.close()

    with Cache(path=path).open("task") as cache:
        assert cache.lookup("k") == (False, None)
        assert cache.misses == 1


# -- bad paths ----------------------------------------------------------------


def test_path_that_is_a_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError,
        match=rf"invalid result cache path '{tmp_path}': it is a directory; give "
        rf"the path of a file inside it, such as '{tmp_path}/cache.db'",
    ):
        Cache(path=tmp_path).open("task")


def test_path_under_a_file_rejected(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder\n")

    with pytest.raises(
        ConfigurationError,
        match=r"its folder cannot be created \(Not a directory\); give a path in "
        "a folder you can write to",
    ):
        Cache(path=plain / "missing" / "cache.db").open("task")


def test_unwritable_path_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Permissions do not stop root, and tests may run as root, so this
    # test makes the open fail on purpose.
    path = tmp_path / "cache.db"
    real_open = os.open

    def refusing_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)

    with pytest.raises(
        ConfigurationError,
        match=r"it cannot be opened for writing \(Permission denied\)",
    ):
        Cache(path=path).open("task")


def test_symlink_path_rejected(tmp_path: Path) -> None:
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "real.db")

    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        Cache(path=link).open("task")


def test_other_sqlite_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE things (x)")
    conn.close()

    with pytest.raises(ConfigurationError, match="not a batchtools result cache"):
        Cache(path=path).open("task")


def test_non_sqlite_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a database\n" * 100)

    with pytest.raises(ConfigurationError, match="not a usable SQLite file"):
        Cache(path=path).open("task")


def test_decorator_rejects_bad_path_when_applied(tmp_path: Path) -> None:
    def square(x: int) -> int:
        return x * x

    with pytest.raises(ConfigurationError, match="it is a directory"):
        Cache(path=tmp_path)(square)


# -- failures and single flight on an event loop ----------------------------


def test_failure_is_not_cached() -> None:
    cache = Cache().open("task")
    calls = 0

    async def fail() -> int:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ValueError, match="boom"):
                await cache.get_or_run("k", fail)

    asyncio.run(scenario())

    assert calls == 2
    assert cache.lookup("k") == (False, None)
    assert cache.stored == 0


def test_concurrent_callers_of_cold_key_run_once() -> None:
    cache = Cache().open("task")
    calls = 0
    arrived = 0
    everyone_waits = asyncio.Event()

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await everyone_waits.wait()
        return "value"

    async def caller() -> tuple[str, bool]:
        nonlocal arrived
        arrived += 1
        if arrived == CALLERS:
            # get_or_run below joins the flight before the leader resumes.
            everyone_waits.set()
        return await cache.get_or_run("k", compute)

    async def scenario() -> list[tuple[str, bool]]:
        callers = [caller() for _ in range(CALLERS)]
        return await asyncio.wait_for(asyncio.gather(*callers), LIMIT)

    results = asyncio.run(scenario())

    assert calls == 1
    assert [value for value, _ in results] == ["value"] * CALLERS
    assert sum(was_hit for _, was_hit in results) == CALLERS - 1
    assert cache.hits == CALLERS - 1
    assert cache.misses == 1


def test_leader_failure_lets_next_waiter_run() -> None:
    cache = Cache().open("task")
    calls = 0
    arrived = 0
    everyone_waits = asyncio.Event()

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await everyone_waits.wait()
        if calls == 1:
            raise ConnectionError("first call fails")
        return "value"

    async def caller() -> tuple[str, bool]:
        nonlocal arrived
        arrived += 1
        if arrived == CALLERS:
            everyone_waits.set()
        return await cache.get_or_run("k", compute)

    async def scenario() -> list[Any]:
        callers = [caller() for _ in range(CALLERS)]
        gathered = asyncio.gather(*callers, return_exceptions=True)
        return await asyncio.wait_for(gathered, LIMIT)

    results = asyncio.run(scenario())

    errors = [r for r in results if isinstance(r, BaseException)]
    values = [r for r in results if not isinstance(r, BaseException)]
    assert calls == 2
    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionError)
    assert [value for value, _ in values] == ["value"] * (CALLERS - 1)
    assert sum(was_hit for _, was_hit in values) == CALLERS - 2


def test_claim_resolve_and_abandon() -> None:
    cache = Cache().open("task")

    async def scenario() -> None:
        assert cache.claim("k") is None
        first = cache.claim("k")
        second = cache.claim("k")
        assert first is not None
        assert second is not None
        assert cache.waiting == 2

        cache.abandon("k")
        assert await first == (False, None)
        assert await second == (False, None)
        assert cache.lookup("k") == (False, None)

        assert cache.claim("k") is None
        waiter = cache.claim("k")
        assert waiter is not None
        cache.resolve("k", [1, 2])
        assert await waiter == (True, [1, 2])
        assert cache.lookup("k") == (True, [1, 2])

    asyncio.run(scenario())


def test_cancelled_waiter_leaves_others_waiting() -> None:
    cache = Cache().open("task")

    async def scenario() -> None:
        assert cache.claim("k") is None
        cancelled = cache.claim("k")
        other_waiter = cache.claim("k")
        assert cancelled is not None
        assert other_waiter is not None

        cancelled.cancel()
        cache.resolve("k", "value")

        assert await other_waiter == (True, "value")

    asyncio.run(scenario())


def test_cancelled_leader_passes_the_key_on() -> None:
    cache = Cache().open("task")
    started = asyncio.Event()

    async def never_ends() -> str:
        started.set()
        await asyncio.Event().wait()
        return "unreachable"

    async def quick() -> str:
        return "value"

    async def scenario() -> tuple[str, bool]:
        leader = asyncio.create_task(cache.get_or_run("k", never_ends))
        await started.wait()
        follower = asyncio.create_task(cache.get_or_run("k", quick))
        await asyncio.sleep(0)  # Let the follower join the flight.
        assert cache.waiting == 1

        leader.cancel()

        return await asyncio.wait_for(follower, LIMIT)

    assert asyncio.run(scenario()) == ("value", False)


# -- decorators -----------------------------------------------------------


def test_sync_decorator_caches_by_arguments() -> None:
    calls: list[Any] = []

    @Cache()
    def describe(x: Any, *, unit: str = "") -> str:
        calls.append(x)
        return f"{x!r}{unit}"

    assert describe((1, 2)) == "(1, 2)"
    assert describe([1, 2]) == "[1, 2]"
    assert describe((1, 2)) == "(1, 2)"
    assert describe(3, unit="m") == "3m"
    assert describe(3, unit="m") == "3m"

    assert calls == [(1, 2), [1, 2], 3]


def test_sync_decorator_does_not_cache_failure() -> None:
    calls = 0

    @Cache()
    def flaky_once(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first call fails")
        return x

    with pytest.raises(ConnectionError, match="first call fails"):
        flaky_once(5)
    assert flaky_once(5) == 5
    assert flaky_once(5) == 5
    assert calls == 2


def test_sync_decorator_keeps_values_on_disk(tmp_path: Path) -> None:
    calls = 0

    def square(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * x

    policy = Cache(path=tmp_path / "cache.db")
    first = policy(square)
    assert first(4) == 16
    first.cache.close()  # type: ignore[attr-defined]  # set by the decorator

    second = policy(square)
    assert second(4) == 16
    second.cache.close()  # type: ignore[attr-defined]  # set by the decorator

    assert calls == 1


def test_decorated_functions_do_not_share_entries(tmp_path: Path) -> None:
    policy = Cache(path=tmp_path / "cache.db")

    @policy
    def double(x: int) -> int:
        return 2 * x

    @policy
    def triple(x: int) -> int:
        return 3 * x

    assert double(2) == 4
    assert triple(2) == 6
    double.cache.close()  # type: ignore[attr-defined]  # set by the decorator
    triple.cache.close()  # type: ignore[attr-defined]  # set by the decorator


def test_decorator_rejects_argument_that_cannot_be_encoded() -> None:
    @Cache()
    def identity(x: Any) -> Any:
        return x

    with pytest.raises(ConfigurationError, match="cannot build a cache key"):
        identity(threading.Lock())


def test_threads_calling_cold_key_run_once() -> None:
    calls = 0
    calls_lock = threading.Lock()
    release = threading.Event()
    barrier = threading.Barrier(CALLERS)
    results: list[int | None] = [None] * CALLERS

    @Cache()
    def slow_square(x: int) -> int:
        nonlocal calls
        with calls_lock:
            calls += 1
        release.wait(LIMIT)
        return x * x

    cache: ResultCache = slow_square.cache  # type: ignore[attr-defined]

    def worker(index: int) -> None:
        barrier.wait(LIMIT)
        results[index] = slow_square(7)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    wait_until(lambda: cache.waiting == CALLERS - 1)
    release.set()
    for thread in threads:
        thread.join(LIMIT)

    assert calls == 1
    assert results == [49] * CALLERS
    assert cache.hits == CALLERS - 1
    assert cache.misses == 1


def test_thread_leader_failure_lets_next_thread_run() -> None:
    calls = 0
    calls_lock = threading.Lock()
    release = threading.Event()
    barrier = threading.Barrier(CALLERS)
    outcomes: list[Any] = [None] * CALLERS

    @Cache()
    def fails_first(x: int) -> int:
        nonlocal calls
        with calls_lock:
            calls += 1
            first = calls == 1
        release.wait(LIMIT)
        if first:
            raise ConnectionError("first call fails")
        return x

    cache: ResultCache = fails_first.cache  # type: ignore[attr-defined]

    def worker(index: int) -> None:
        barrier.wait(LIMIT)
        try:
            outcomes[index] = fails_first(3)
        except ConnectionError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    wait_until(lambda: cache.waiting == CALLERS - 1)
    release.set()
    for thread in threads:
        thread.join(LIMIT)

    assert calls == 2
    assert sum(isinstance(o, ConnectionError) for o in outcomes) == 1
    assert outcomes.count(3) == CALLERS - 1


def test_async_decorator_caches_and_runs_once() -> None:
    calls = 0
    arrived = 0
    everyone_waits = asyncio.Event()

    @Cache()
    async def fetch(url: str) -> str:
        nonlocal calls
        calls += 1
        await everyone_waits.wait()
        return url.upper()

    async def caller() -> str:
        nonlocal arrived
        arrived += 1
        if arrived == CALLERS:
            everyone_waits.set()
        return await fetch("a")

    async def scenario() -> list[str]:
        callers = [caller() for _ in range(CALLERS)]
        return await asyncio.wait_for(asyncio.gather(*callers), LIMIT)

    assert asyncio.run(scenario()) == ["A"] * CALLERS
    assert calls == 1


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it is true; fail after `LIMIT` seconds."""
    deadline = time.monotonic() + LIMIT
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.001)
