"""Keyed locks and a shared key-value store for the tasks of one run.

A run's tasks execute as coroutines, as threads or in worker processes, and
a `KeyedLock` or `SharedState` works the same from each of them. Both
pickle as a path and settings, so they travel inside an item or a task's
context, and every copy in every process refers to the same lock or store.

The lock is written by hand because no standard package covers all three
kinds of caller: `threading.Lock` blocks an event loop, `asyncio.Lock` is
bound to one loop, and `filelock` polls a file and has no per-key, in-process
part. It has two levels:

- In one process, each key that is held has an entry with a FIFO queue of
  waiters. A waiting thread blocks on a lock of its own, and a waiting
  coroutine awaits a future on its own loop, so coroutines never block their
  loop and never occupy an executor thread. The release hands the key to the
  first waiter, and an entry is dropped when nobody holds it, so memory grows
  with the keys in use, never with the keys seen.
- Across processes, a key's hash selects one of ``stripes`` lock files in
  the lock's directory, locked with ``flock`` through `filelock`. Two keys
  may share a file. That only makes them wait for each other when different
  processes hold them, never breaks mutual exclusion. In one process, holders
  of keys on the same file share one ``flock``, so nesting two such keys
  cannot deadlock. The kernel releases a ``flock`` when its process dies, so
  a killed worker never leaves a key locked.

`SharedState` is defined next to its SQL in `batchtools.journal._state_store`
and exported here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import filelock

from batchtools._exceptions import ConfigurationError
from batchtools.fs.lock import canonical_path, make_private_directory
from batchtools.journal._state_store import (
    DEFAULT_BUSY_TIMEOUT,
    SharedState,
    key_text_of,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_STRIPES",
    "KeyedLock",
    "LockStatistics",
    "RunResources",
    "SharedState",
    "open_run_resources",
]

log = logging.getLogger("batchtools.flow")

DEFAULT_STRIPES = 4096
"""Lock files per directory: the bound on files, and on stripes held at once."""
DEFAULT_POLL_INTERVAL = 0.01
"""Seconds between two tries of a lock file that another process holds."""
MAX_STRIPES = 1 << 20
"""The largest ``stripes`` accepted; a larger number is taken for a typo."""

_SETTINGS_FILE = "settings.json"


# -- the in-process level ------------------------------------------------


class _ThreadWaiter:
    """A thread waiting for a key; it blocks on a lock that the release opens."""

    __slots__ = ("_gate",)

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()

    def wait(self, timeout: float | None) -> bool:
        return self._gate.acquire(timeout=-1 if timeout is None else timeout)

    def wake(self) -> bool:
        self._gate.release()
        return True


class _TaskWaiter:
    """A coroutine waiting for a key; the release completes its future on its loop."""

    __slots__ = ("_loop", "_name", "_table", "future")

    def __init__(
        self, table: _KeyTable, name: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._table = table
        self._name = name
        self._loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed, so nothing awaits the future
            log.warning("a lock skipped a waiter whose event loop is closed")
            return False
        return True

    def _deliver(self) -> None:
        # The key now belongs to this waiter. A cancelled waiter passes it on.
        if self.future.cancelled():
            self._table.release(self._name)
        else:
            self.future.set_result(None)


_Waiter = _ThreadWaiter | _TaskWaiter


class _KeyTable:
    """The keys held in this process, each with the queue of its waiters."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        # A key is held exactly while it is in the dict.
        self._held: dict[str, collections.deque[_Waiter]] = {}

    def acquire(self, name: str, deadline: float | None) -> None:
        with self._mutex:
            waiters = self._held.get(name)
            if waiters is None:
                self._held[name] = collections.deque()
                return
            waiter = _ThreadWaiter()
            waiters.append(waiter)
        if waiter.wait(_remaining(deadline)):
            return
        with self._mutex:
            if waiter in waiters:
                waiters.remove(waiter)
                raise TimeoutError
        # A release handed the key over between the timeout and the mutex.

    async def acquire_async(self, name: str, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        with self._mutex:
            waiters = self._held.get(name)
            if waiters is None:
                self._held[name] = collections.deque()
                return
            waiter = _TaskWaiter(self, name, loop)
            waiters.append(waiter)
        try:
            async with asyncio.timeout(_remaining(deadline)):
                await waiter.future
        except BaseException:
            with self._mutex:
                if waiter in waiters:
                    waiters.remove(waiter)
                    raise
            # The key was handed over. A pending future is cancelled here, so
            # _deliver passes the key on. A future with a result means that
            # this task owns the key, so it releases the key itself.
            if not waiter.future.cancel() and not waiter.future.cancelled():
                self.release(name)
            raise

    def release(self, name: str) -> None:
        with self._mutex:
            waiters = self._held[name]
            while waiters:
                if waiters.popleft().wake():
                    return
            del self._held[name]

    def counts(self) -> tuple[int, int]:
        with self._mutex:
            return len(self._held), sum(map(len, self._held.values()))


# -- the cross-process level ---------------------------------------------


class _Stripe:
    """One lock file, shared by every holder in this process of a key mapped to it."""

    __slots__ = ("busy", "file_lock", "holders")

    def __init__(self, file_lock: filelock.UnixFileLock) -> None:
        self.file_lock = file_lock
        self.holders = 0
        self.busy = False  # a thread is locking or unlocking the file


class _StripeTable:
    """The lock files of one directory, as this process uses them."""

    def __init__(self, directory: Path, poll_interval: float) -> None:
        self._directory = directory
        self._poll_interval = poll_interval
        self._mutex = threading.Lock()
        # At most one entry per stripe, kept for the table's lifetime, so
        # there is never a second file lock object on the same path.
        self._stripes: dict[int, _Stripe] = {}

    def acquire(self, index: int, deadline: float | None) -> None:
        while not self._try_acquire(index):
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            time.sleep(_min(self._poll_interval, remaining))

    async def acquire_async(self, index: int, deadline: float | None) -> None:
        # Each try is an open and a non-blocking flock on a local file, fast
        # enough to run on the event loop.
        while not self._try_acquire(index):
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            await asyncio.sleep(_min(self._poll_interval, remaining))

    def release(self, index: int) -> None:
        with self._mutex:
            stripe = self._stripes[index]
            stripe.holders -= 1
            if stripe.holders:
                return
            stripe.busy = True
        try:
            stripe.file_lock.release()
        finally:
            with self._mutex:
                stripe.busy = False

    def held(self) -> int:
        with self._mutex:
            return sum(1 for stripe in self._stripes.values() if stripe.holders)

    def _try_acquire(self, index: int) -> bool:
        with self._mutex:
            stripe = self._stripes.get(index)
            if stripe is None:
                stripe = self._stripes[index] = _Stripe(self._file_lock(index))
            # NOTE: the file stays locked while holders in this process
            # overlap, so other processes waiting for it can starve. Across
            # processes there is no FIFO order.
            if stripe.holders:
                stripe.holders += 1
                return True
            if stripe.busy:
                return False
            stripe.busy = True
        acquired = False
        try:
            stripe.file_lock.acquire(blocking=False)
            acquired = True
        except filelock.Timeout:
            pass
        finally:
            with self._mutex:
                stripe.busy = False
                if acquired:
                    stripe.holders += 1
        return acquired

    def _file_lock(self, index: int) -> filelock.UnixFileLock:
        # thread_local=False because a key acquired on one thread may be
        # released on another. preserve_lock_file keeps the file in place,
        # which also rules out filelock's fallback to a lock that a dead
        # process would leave behind.
        return filelock.UnixFileLock(
            self._directory / f"{index}.lock",
            mode=0o600,
            thread_local=False,
            blocking=False,
            preserve_lock_file=True,
            fallback_to_soft=False,
        )


class _ProcessTables:
    """The per-process state of one lock: its held keys and its lock files."""

    __slots__ = ("__weakref__", "keys", "stripe_count", "stripes")

    def __init__(self, stripes: _StripeTable | None, stripe_count: int) -> None:
        self.keys = _KeyTable()
        self.stripes = stripes
        self.stripe_count = stripe_count


# Every KeyedLock of one directory in this process shares its tables, so
# copies unpickled from different items exclude each other. The tables
# live while a KeyedLock refers to them.
_tables_lock = threading.Lock()
_tables: weakref.WeakValueDictionary[Path, _ProcessTables] = (
    weakref.WeakValueDictionary()
)


def _forget_after_fork() -> None:
    global _tables_lock, _tables
    # A parent's thread may have held the mutexes at the fork. A KeyedLock
    # that the child inherited looks up fresh tables, see _process_tables.
    _tables_lock = threading.Lock()
    _tables = weakref.WeakValueDictionary()


os.register_at_fork(after_in_child=_forget_after_fork)


# -- the public lock -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """The state of a `KeyedLock` in the calling process.

    Attributes:
        keys_held: Keys held by threads or coroutines of this process.
        waiters: Threads and coroutines of this process waiting for a key.
        stripes_held: Lock files this process holds; 0 without a directory.
    """

    keys_held: int
    waiters: int
    stripes_held: int


class KeyedLock:
    """A mutual exclusion lock per key, for threads, coroutines and processes.

    Holders of different keys never wait for each other in one process.
    Across processes they may, when their keys share a lock file (see
    ``stripes``). Waiters of one key in one process get it in FIFO order.
    The lock is not reentrant: holding a key again in the same thread or
    task waits for ever, unless a timeout is given.

    Keys are hashable values that batchtools can encode without pickle:
    str, int, bytes, or tuples of them. They match by type and value, so
    ``1`` and ``"1"`` are different keys.

    Example::

        lock = KeyedLock("/tmp/run-locks")
        with lock.hold(account_id):
            ...
        async with lock.hold_async(account_id):
            ...

    Args:
        directory: Folder of the lock files, made private (mode 0700) if
            missing, on a filesystem that supports ``flock`` (a local disk).
            Every process that uses the same folder shares the locks.
            ``None`` makes a lock for this process only, which cannot be
            pickled.
        stripes: How many lock files the keys are spread over. Every lock
            on one folder must use the same number.
        poll_interval: Seconds between two tries of a lock file that
            another process holds.

    Raises:
        ConfigurationError: ``stripes`` or ``poll_interval`` is out of
            range, or the directory cannot be used: it is a symbolic link
            or a file, it cannot be created, or it was set up with another
            number of stripes.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        stripes: int = DEFAULT_STRIPES,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        if type(stripes) is not int or not 1 <= stripes <= MAX_STRIPES:
            raise ConfigurationError(
                f"stripes={stripes!r} is invalid; give an int from 1 to {MAX_STRIPES}"
            )
        if not isinstance(poll_interval, int | float) or not (
            0 < poll_interval < math.inf
        ):
            raise ConfigurationError(
                f"poll_interval={poll_interval!r} is invalid; give a positive "
                "number of seconds"
            )
        self.directory = None if directory is None else canonical_path(directory)
        self.stripes = stripes
        self.poll_interval = float(poll_interval)
        self._pid = 0
        self._tables: _ProcessTables | None = None
        self._process_tables()  # sets up the directory now, so errors show early

    def __reduce__(self) -> tuple[Any, ...]:
        if self.directory is None:
            raise TypeError(
                "a KeyedLock without a directory locks one process only and "
                "cannot be pickled; give it a directory that the processes share"
            )
        return (_reopen_lock, (str(self.directory), self.stripes, self.poll_interval))

    def __repr__(self) -> str:
        stats = self.statistics()
        where = "this process" if self.directory is None else str(self.directory)
        return (
            f"<KeyedLock {where!r} keys_held={stats.keys_held} "
            f"waiters={stats.waiters} stripes_held={stats.stripes_held}>"
        )

    @contextlib.contextmanager
    def hold(self, key: Any, *, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of ``key`` for the ``with`` block, waiting for it if needed.

        For threads and worker processes; a coroutine uses `hold_async`.

        Args:
            key: The key to lock.
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Raises:
            TimeoutError: The key was not free within ``timeout``.
            TypeError: The key is not hashable or would need pickle.
            RuntimeError: The calling thread runs an event loop, which a
                wait would block.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "KeyedLock.hold() would block the running event loop; "
                "use 'async with lock.hold_async(key)' in a coroutine"
            )
        name = key_text_of(key)
        deadline = _deadline(timeout)
        tables = self._process_tables()
        try:
            tables.keys.acquire(name, deadline)
            try:
                if tables.stripes is not None:
                    tables.stripes.acquire(self._stripe_of(name), deadline)
            except BaseException:
                tables.keys.release(name)
                raise
        except TimeoutError:
            raise self._timed_out(key, timeout) from None
        try:
            yield
        finally:
            self._release(tables, name)

    @contextlib.asynccontextmanager
    async def hold_async(
        self, key: Any, *, timeout: float | None = None
    ) -> AsyncIterator[None]:
        """Hold the lock of ``key`` for the ``async with`` block, waiting if needed.

        The wait never blocks the event loop. Cancelling the waiting task
        leaves the lock as it was.

        Args:
            key: The key to lock.
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Raises:
            TimeoutError: The key was not free within ``timeout``.
            TypeError: The key is not hashable or would need pickle.
        """
        name = key_text_of(key)
        deadline = _deadline(timeout)
        tables = self._process_tables()
        try:
            await tables.keys.acquire_async(name, deadline)
            try:
                if tables.stripes is not None:
                    index = self._stripe_of(name)
                    await tables.stripes.acquire_async(index, deadline)
            except BaseException:
                tables.keys.release(name)
                raise
        except TimeoutError:
            raise self._timed_out(key, timeout) from None
        try:
            yield
        finally:
            self._release(tables, name)

    def statistics(self) -> LockStatistics:
        """Return the counts of held keys, waiters and lock files in this process."""
        tables = self._process_tables()
        keys_held, waiters = tables.keys.counts()
        stripes_held = 0 if tables.stripes is None else tables.stripes.held()
        return LockStatistics(keys_held, waiters, stripes_held)

    def _release(self, tables: _ProcessTables, name: str) -> None:
        try:
            if tables.stripes is not None:
                tables.stripes.release(self._stripe_of(name))
        finally:
            tables.keys.release(name)

    def _stripe_of(self, name: str) -> int:
        digest = hashlib.blake2b(
            name.encode("utf-8", "surrogatepass"), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") % self.stripes

    def _timed_out(self, key: Any, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"the lock of key {key!r} was not free within {timeout:g} s; another "
            "thread, task or process holds it, or another process holds a key "
            "that shares its lock file"
        )

    def _process_tables(self) -> _ProcessTables:
        # A copy inherited through fork looks its tables up again, because
        # the parent's mutexes may have been held at the fork.
        if self._tables is not None and self._pid == os.getpid():
            return self._tables
        if self.directory is None:
            tables = _ProcessTables(None, self.stripes)
        else:
            tables = _tables_of(self.directory, self.stripes, self.poll_interval)
        self._tables, self._pid = tables, os.getpid()
        return tables


def _reopen_lock(directory: str, stripes: int, poll_interval: float) -> KeyedLock:
    return KeyedLock(directory, stripes=stripes, poll_interval=poll_interval)


def _tables_of(directory: Path, stripes: int, poll_interval: float) -> _ProcessTables:
    with _tables_lock:
        tables = _tables.get(directory)
        if tables is None:
            make_private_directory(directory, "lock directory")
            _check_stripes(directory, stripes)
            tables = _ProcessTables(_StripeTable(directory, poll_interval), stripes)
            _tables[directory] = tables
    if tables.stripe_count != stripes:
        raise _stripes_mismatch(directory, tables.stripe_count, stripes)
    return tables


def _stripes_of(directory: Path) -> int | None:
    try:
        settings = json.loads((directory / _SETTINGS_FILE).read_text())
        return int(settings["stripes"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(
            f"invalid lock directory '{directory}': its {_SETTINGS_FILE} cannot "
            f"be read ({error}); give an empty or new directory"
        ) from error


def _check_stripes(directory: Path, stripes: int) -> None:
    """Record ``stripes`` in a new directory, or check it against the recorded one."""
    if _stripes_of(directory) is None:
        # Written whole under a temporary name, then linked, so a reader
        # never sees half a file, and the first of two racing writers wins.
        writer = f"{os.getpid()}.{threading.get_ident()}"
        temporary = directory / f".{_SETTINGS_FILE}.{writer}"
        try:
            temporary.write_text(json.dumps({"stripes": stripes}) + "\n")
            try:
                os.link(temporary, directory / _SETTINGS_FILE)
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
        except OSError as error:
            raise ConfigurationError(
                f"invalid lock directory '{directory}': writing its "
                f"{_SETTINGS_FILE} failed ({error.strerror}); give a directory "
                "you can write to"
            ) from error
    recorded = _stripes_of(directory)
    if recorded != stripes:
        raise _stripes_mismatch(directory, recorded, stripes)


def _stripes_mismatch(
    directory: Path, recorded: int | None, stripes: int
) -> ConfigurationError:
    return ConfigurationError(
        f"invalid lock directory '{directory}': it was set up with "
        f"stripes={recorded}, and this lock has stripes={stripes}; every lock "
        "on one directory must use the same number"
    )


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout={timeout!r} is invalid; give seconds >= 0 or None")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _min(interval: float, remaining: float | None) -> float:
    return interval if remaining is None else min(interval, remaining)


# -- the resources of a run ----------------------------------------------


class RunResources(NamedTuple):
    """The keyed lock and shared state of one run, made by `open_run_resources`.

    Attributes:
        lock: The run's `KeyedLock`, with its files in ``directory/locks``.
        shared: The run's `SharedState`, in ``directory/shared.db``.
        directory: The folder of both.
    """

    lock: KeyedLock
    shared: SharedState
    directory: Path

    def close(self) -> None:
        """Close this process's connection to the shared state.

        The files stay, so a caller that made the directory for this run
        alone removes it afterwards.
        """
        self.shared.close()


def open_run_resources(
    directory: str | os.PathLike[str],
    *,
    stripes: int = DEFAULT_STRIPES,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> RunResources:
    """Create or open the keyed lock and shared state of a run in ``directory``.

    The directory is made private to the user (mode 0700) if missing, and
    both objects pickle as paths, so a worker process that receives them
    uses the same files.

    Args:
        directory: The folder; it should be on a local disk and belong to
            this run only.
        stripes: See `KeyedLock`.
        poll_interval: See `KeyedLock`.
        busy_timeout: See `SharedState`.

    Raises:
        ConfigurationError: An option is out of range, or the directory or
            a file in it cannot be used, with the reason and the fix.
    """
    folder = canonical_path(directory)
    make_private_directory(folder, "run resources directory")
    lock = KeyedLock(folder / "locks", stripes=stripes, poll_interval=poll_interval)
    shared = SharedState(folder / "shared.db", busy_timeout=busy_timeout)
    return RunResources(lock, shared, folder)


_opened: dict[str, RunResources] = {}
_opened_lock = threading.Lock()


def resources_at(directory: str) -> RunResources:
    """Return the run resources in ``directory``, opening them once per process.

    A task context carries only the folder, so that a worker process opens
    the lock and the store on first use rather than for every item.
    """
    with _opened_lock:
        resources = _opened.get(directory)
        if resources is None:
            resources = _opened[directory] = open_run_resources(directory)
        return resources


def forget_resources(directory: str) -> None:
    """Close and forget this process's resources in ``directory``, if open."""
    with _opened_lock:
        resources = _opened.pop(directory, None)
    if resources is not None:
        resources.close()
