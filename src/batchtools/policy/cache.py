"""Result cache: successful values kept per task and item key, in memory and on disk.

A `Cache` is the policy; `Cache.open` returns the runtime state, a
`ResultCache` for one namespace (the task's signature, so two tasks never
share entries). A hit is a successful value stored less than ``ttl``
seconds ago, whether it is found in memory or on disk. Failed outcomes are
never stored: the only ways in are `ResultCache.store` and
`ResultCache.resolve`, which take a value, while `ResultCache.abandon`
records nothing.

cachetools supplies the in-memory LRU. The rest is written here because
the engine needs two things beyond a memory cache:

- Single flight on its event loop, split into `ResultCache.claim`,
  `ResultCache.resolve` and `ResultCache.abandon`, so that the engine can
  run the leader's attempt through its own retry and timeout policies.
  Concurrent requests for a cold key wait for the leader. When the leader
  fails, the first waiter to claim the key again becomes the next leader.
  So one `ResultCache` runs at most one call per key at a time. Other
  processes that share the file run their own.
- A disk tier that never unpickles. Values are stored as the canonical
  text of `batchtools._codec`. A value that the codec can only pickle (tag
  ``x``) stays in memory, and disk entries that contain a pickle are
  ignored, because unpickling a file that other processes can write would
  run code from it.

The disk store is the SQLite file of `batchtools.journal._cache_store`. It
is imported inside `Cache.open`, so importing this module loads no I/O code
and the policy layer keeps to pure logic.

`Cache` objects are also decorators for sync and async functions. The key
is the digest of the canonical text of the arguments, and the namespace is
the function's module and qualified name.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import cachetools

from batchtools import _codec
from batchtools._exceptions import ConfigurationError
from batchtools.policy._units import parse_duration, parse_size

if TYPE_CHECKING:
    from batchtools.journal._cache_store import CacheStore

log = logging.getLogger("batchtools.cache")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# The codec writes a pickled value as the JSON array ["x","<base64>"]. A
# string payload cannot contain this text, because JSON escapes its quotes.
_PICKLE_NODE = '["x",'

Outcome = tuple[bool, Any]
"""``(True, value)`` when a value was found or shared, ``(False, None)`` otherwise."""


@dataclass(frozen=True, slots=True)
class Cache:
    """Keep successful values per item key, in memory and optionally on disk.

    Example::

        @Cache(path="~/.cache/thumbs.db", ttl="1d")
        def thumbnail(path: str) -> bytes: ...

    Args:
        path: The SQLite file that keeps values across runs and processes;
            ``None`` keeps them in memory only.
        ttl: How long a value stays valid after it was stored: seconds, a
            `timedelta`, or text such as ``"1h"``. ``None`` keeps values
            until they are evicted.
        max_entries: How many values the memory cache holds; the least
            recently used is dropped beyond that.
        max_size: The bound on the disk entries' total size: bytes, or
            text such as ``"512M"``. The least recently used entries are
            deleted beyond it. ``None`` leaves the file unbounded.
        clock: Returns the current time in seconds since the epoch. It is
            `time.time` by default, a fake clock in tests. A monotonic
            clock does not suit the disk store, whose times are compared
            across processes.

    Raises:
        ConfigurationError: A value is out of range or of the wrong type.
    """

    path: str | Path | None = None
    ttl: float | str | timedelta | None = None
    max_entries: int = 10_000
    max_size: int | str | None = None
    clock: Callable[[], float] = field(default=time.time, compare=False)
    _ttl_seconds: float | None = field(
        init=False, default=None, repr=False, compare=False
    )
    _max_bytes: int | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = self.path
        if path is not None and not isinstance(path, str | os.PathLike):
            raise ConfigurationError(f"Cache path={path!r} must be a file path or None")
        if path is not None and not os.fspath(path):
            raise ConfigurationError(
                "Cache path='' is empty; give a file path, or None to keep "
                "values in memory only"
            )
        if self.ttl is not None:
            ttl = parse_duration(self.ttl, name="cache ttl")
            object.__setattr__(self, "_ttl_seconds", ttl)
        entries = self.max_entries
        if isinstance(entries, bool) or not isinstance(entries, int):
            raise ConfigurationError(
                f"Cache max_entries={entries!r} must be an integer"
            )
        if entries < 1:
            raise ConfigurationError(
                f"Cache max_entries={entries!r} must be at least 1"
            )
        self._check_max_size()
        if not callable(self.clock):
            raise ConfigurationError(f"Cache clock={self.clock!r} must be callable")

    def _check_max_size(self) -> None:
        if self.max_size is None:
            return
        max_bytes = parse_size(self.max_size, name="cache max_size")
        if self.path is None:
            raise ConfigurationError(
                f"Cache max_size={self.max_size!r} bounds the file on disk, but "
                "path is None; give a path, or bound the memory with max_entries"
            )
        object.__setattr__(self, "_max_bytes", max_bytes)

    def open(self, namespace: str) -> ResultCache:
        """Open the cache of one task, opening the disk store if there is one.

        Args:
            namespace: The task's signature. Caches opened with different
                namespaces never share entries, even in one file.

        Raises:
            ConfigurationError: ``namespace`` is empty, or the path cannot
                hold a cache (a directory, a symbolic link, a folder that
                cannot be created or written, a network filesystem, or a
                file of another kind).
            JournalError: SQLite failed while the disk store dropped expired
                or surplus entries.
        """
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError(
                f"cache namespace {namespace!r} must be a non-empty string"
            )
        if self.path is None:
            return ResultCache(self, namespace, None)

        # Imported here so that the policy layer imports no I/O at load time.
        from batchtools.journal._cache_store import CacheStore

        store = CacheStore.open(self.path)
        try:
            if self._ttl_seconds is not None:
                store.expire(self.clock(), self._ttl_seconds)
            if self._max_bytes is not None:
                store.evict(self._max_bytes)
        except BaseException:
            store.close()
            raise
        log.debug("opened result cache %s for %s", store.path, namespace)
        return ResultCache(self, namespace, store)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Cache the values of ``function`` (sync or async) by its arguments.

        The disk store, if any, opens here, so a bad path fails when the
        function is decorated. Concurrent calls with equal arguments run
        the function once, across threads for a sync function and across
        tasks for an async one. The wrapper's ``cache`` attribute is its
        `ResultCache`, with the counters and `ResultCache.close`.

        Arguments are keys through their canonical encoding, so ``f(1)`` and
        ``f(x=1)`` are different calls. Values are shared, not copied, from
        the memory cache, so a caller that changes a returned list changes
        the cached one.

        Raises:
            ConfigurationError: As `open` does. Calls of the wrapper raise
                it when an argument cannot be encoded.
            JournalError: As `open` does.
        """
        namespace = f"{function.__module__}.{function.__qualname__}"
        cache = self.open(namespace)
        target: Callable[..., Any] = function
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def cached_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                key = _call_key(namespace, args, kwargs)
                value, _ = await cache.get_or_run(key, lambda: target(*args, **kwargs))
                return value

            cached_async.cache = cache  # type: ignore[attr-defined]  # documented
            return cached_async  # type: ignore[return-value]  # same signature

        @functools.wraps(function)
        def cached(*args: P.args, **kwargs: P.kwargs) -> R:
            key = _call_key(namespace, args, kwargs)
            value, _ = cache.get_or_run_blocking(
                key, functools.partial(function, *args, **kwargs)
            )
            return value

        cached.cache = cache  # type: ignore[attr-defined]  # documented above
        return cached


def _call_key(namespace: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Return the cache key of a call with ``args`` and ``kwargs``.

    Raises:
        ConfigurationError: An argument cannot be encoded: the codec pickles
            values of types outside its table, and pickling it failed.
    """
    try:
        text = _codec.encode((args, sorted(kwargs.items())))
    except Exception as error:  # pickle raises whatever __reduce__ raises
        raise ConfigurationError(
            f"cannot build a cache key for a call of {namespace}: an argument "
            f"cannot be encoded ({type(error).__name__}: {error}); pass values "
            "that pickle, or remove the cache"
        ) from error
    # NOTE: arguments of types outside the codec's table are keyed by their
    # pickle bytes, which can differ between equal values.
    return _codec.digest(text)


class _Entry:
    """A value in memory, with when it was stored and last marked used on disk."""

    __slots__ = ("stored", "touched", "value")

    def __init__(self, stored: float, value: Any, touched: float) -> None:
        self.stored = stored
        self.value = value
        self.touched = touched


class _ThreadFlight:
    """The leader's call of a key in `ResultCache.get_or_run_blocking`."""

    __slots__ = ("done", "succeeded", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.succeeded = False
        self.value: Any = None


class ResultCache:
    """The entries of one namespace: a memory LRU in front of an optional disk store.

    Attributes:
        policy: The `Cache` that opened it.
        namespace: The task's signature.
        hits: Requests served with a value: `lookup` calls that found
            one, and `get_or_run` or `get_or_run_blocking` calls that
            returned without running the function.
        misses: `lookup` calls that found nothing, and `get_or_run` or
            `get_or_run_blocking` calls that ran the function.
        stored: Values stored by `store`, `resolve` and the ``get_or_run``
            methods.
        unstorable: Stored values kept in memory only, because their text
            would need pickle, is not valid UTF-8, cannot be encoded at
            all, or alone exceeds ``max_size``. Only counted with a disk
            store.

    It is meant for the engine's event loop thread. A lock makes the
    memory cache, the disk store and the counters safe to use from several
    threads as well, which the decorator for sync functions does. Disk
    reads and writes block the calling thread, the event loop included,
    for one short SQLite transaction each.
    """

    def __init__(self, policy: Cache, namespace: str, store: CacheStore | None) -> None:
        self.policy = policy
        self.namespace = namespace
        self._store = store
        self._path = None if store is None else str(store.path)
        self._disk_prefix = _codec.digest(_codec.encode(namespace)) + ":"
        self._ttl = policy._ttl_seconds
        self._max_bytes = policy._max_bytes
        self._memory = _memory_cache(policy.max_entries, self._ttl, policy.clock)
        self._lock = threading.Lock()
        self._flights: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._thread_flights: dict[str, _ThreadFlight] = {}
        self._threads_waiting = 0
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.unstorable = 0
        # Set by a run with secrets: a value whose text contains one stays in
        # memory and never reaches the file.
        self.holds_secret: Callable[[str], bool] | None = None

    def __repr__(self) -> str:
        disk = "" if self._path is None else f" path={self._path!r}"
        return (
            f"<ResultCache {self.namespace!r}{disk} hits={self.hits} "
            f"misses={self.misses} stored={self.stored} "
            f"unstorable={self.unstorable} waiting={self.waiting} "
            f"in_memory={len(self._memory)}>"
        )

    @property
    def waiting(self) -> int:
        """Callers that wait for another caller's run of the same key, now."""
        with self._lock:
            tasks = sum(
                not waiter.done()
                for waiters in self._flights.values()
                for waiter in waiters
            )
            return tasks + self._threads_waiting

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lookups and stores --------------------------------------------

    def lookup(self, key: str) -> Outcome:
        """Look ``key`` up in memory, then on disk; a disk hit is kept in memory.

        Returns:
            ``(True, value)`` for a value stored less than ``ttl`` seconds
            ago, else ``(False, None)``.

        Raises:
            JournalError: SQLite failed to read the disk store.
        """
        with self._lock:
            found, value = self._find(key)
            if found:
                self.hits += 1
            else:
                self.misses += 1
        return found, value

    def store(self, key: str, value: Any) -> None:
        """Store the value of a successful outcome.

        Failed outcomes have no way in: a leader that failed calls `abandon`.

        Raises:
            JournalError: SQLite failed to write the disk store; the value
                is kept in memory.
        """
        now = self.policy.clock()
        with self._lock:
            self._remember(key, value, now)
            self._persist(key, value, now)

    def close(self) -> None:
        """Close the disk store, if any. Closing twice is allowed.

        The cache stays usable afterwards, with the memory cache only.
        """
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    # -- single flight on an event loop ----------------------------------

    def claim(self, key: str) -> asyncio.Future[Outcome] | None:
        """Become the leader for ``key``, or join the leader's flight.

        Call it on the event loop after a `lookup` miss.

        Returns:
            ``None`` when the caller is the leader. The leader runs the
            function, then must call `resolve` with the value or `abandon`
            on failure or cancellation. Otherwise a future to await. It
            gives ``(True, value)`` when the leader stored a value, or
            ``(False, None)`` when the leader failed. Then the waiter calls
            `claim` again, and the first waiter to do so leads the next
            run. Cancelling a waiter affects no other caller.
        """
        with self._lock:
            waiters = self._flights.get(key)
            if waiters is None:
                self._flights[key] = []
                return None
            waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
        return waiter

    def resolve(self, key: str, value: Any) -> None:
        """Store the leader's value of ``key`` and pass it to the waiters.

        Raises:
            JournalError: SQLite failed to write the disk store. The value
                is kept in memory and the waiters have it.
        """
        now = self.policy.clock()
        with self._lock:
            self._remember(key, value, now)
            waiters = self._flights.pop(key, [])
        _wake(waiters, (True, value))
        with self._lock:
            self._persist(key, value, now)

    def abandon(self, key: str) -> None:
        """End the leader's flight of ``key`` without a value; nothing is stored.

        The waiters receive ``(False, None)``. Does nothing when ``key`` has
        no flight.
        """
        with self._lock:
            waiters = self._flights.pop(key, [])
        _wake(waiters, (False, None))

    async def get_or_run(
        self, key: str, fn: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """Return the cached value of ``key``, or run ``fn`` once to make it.

        Concurrent callers of a cold key wait for one leader. If the leader
        fails, its caller gets the exception, and the first waiter to
        resume becomes the next leader and runs ``fn`` itself. So a key
        whose function always fails runs once per caller, one at a time.

        Returns:
            The value, and whether it came without running ``fn`` (from
            the cache or from a concurrent leader).

        Raises:
            JournalError: SQLite failed to read or write the disk store.
        """
        while True:
            with self._lock:
                found, value = self._find(key)
                if found:
                    self.hits += 1
                    return value, True
            waiter = self.claim(key)
            if waiter is None:
                break
            succeeded, value = await waiter
            if succeeded:
                with self._lock:
                    self.hits += 1
                return value, True

        with self._lock:
            self.misses += 1
        try:
            result = await fn()
        except BaseException:
            self.abandon(key)
            raise
        self.resolve(key, result)
        return result, False

    # -- single flight across threads ------------------------------------

    def get_or_run_blocking(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """Return the cached value of ``key``, or call ``fn`` once to make it.

        The thread twin of `get_or_run`. Threads that request a cold key
        while another thread runs ``fn`` block until it ends. If it fails,
        the first of them to wake up becomes the next leader.

        Returns:
            The value, and whether it came without calling ``fn``.

        Raises:
            JournalError: SQLite failed to read or write the disk store.
        """
        while True:
            with self._lock:
                found, value = self._find(key)
                if found:
                    self.hits += 1
                    return value, True
                flight = self._thread_flights.get(key)
                if flight is None:
                    flight = self._thread_flights[key] = _ThreadFlight()
                    self.misses += 1
                    break
                self._threads_waiting += 1
            try:
                flight.done.wait()
            finally:
                with self._lock:
                    self._threads_waiting -= 1
            if flight.succeeded:
                with self._lock:
                    self.hits += 1
                return flight.value, True

        try:
            result = fn()
        except BaseException:
            with self._lock:
                del self._thread_flights[key]
            flight.done.set()
            raise
        now = self.policy.clock()
        with self._lock:
            self._remember(key, result, now)
            flight.succeeded, flight.value = True, result
            del self._thread_flights[key]
        flight.done.set()
        with self._lock:
            self._persist(key, result, now)
        return result, False

    # -- helpers; the caller holds the lock ------------------------------

    def _find(self, key: str) -> Outcome:
        now = self.policy.clock()
        entry = self._memory.get(key)
        if entry is not None:
            self._touch(key, entry, now)
            return True, entry.value
        if self._store is None:
            return False, None
        found = self._store.get(self._disk_prefix + key, now, self._ttl)
        if found is None:
            return False, None
        decoded, value = self._decode(key, found.text)
        if decoded:
            self._memory[key] = _Entry(found.stored, value, now)
        return decoded, value

    def _touch(self, key: str, entry: _Entry, now: float) -> None:
        # Memory hits must count as uses on disk as well, or the disk store
        # would evict the entries that are hot in memory.
        store = self._store
        if store is not None and now - entry.touched > store.used_resolution:
            store.touch(self._disk_prefix + key, now)
            entry.touched = now

    def _decode(self, key: str, text: str) -> Outcome:
        if _PICKLE_NODE in text:
            log.warning(
                "result cache %s: ignored the entry of key %s, which contains a "
                "pickled value; it is never unpickled",
                self._path,
                key,
            )
            return False, None
        try:
            return True, _codec.decode(text)
        except ValueError as error:
            log.warning(
                "result cache %s: ignored the damaged entry of key %s: %s",
                self._path,
                key,
                error,
            )
            return False, None

    def _remember(self, key: str, value: Any, now: float) -> None:
        self._memory[key] = _Entry(now, value, now)
        self.stored += 1

    def _persist(self, key: str, value: Any, now: float) -> None:
        if self._store is None:
            return
        disk_key = self._disk_prefix + key
        text = _disk_text(value)
        too_large = (
            text is not None
            and self._max_bytes is not None
            and len(disk_key) + len(text.encode("utf-8")) > self._max_bytes
        )
        if (
            text is None
            or too_large
            or (self.holds_secret is not None and self.holds_secret(text))
        ):
            self.unstorable += 1
            return
        self._store.put(disk_key, text, now)
        if self._max_bytes is not None:
            self._store.evict(self._max_bytes)


def _memory_cache(
    max_entries: int, ttl: float | None, clock: Callable[[], float]
) -> cachetools.Cache[str, _Entry]:
    if ttl is None:
        return cachetools.LRUCache(maxsize=max_entries)

    # An entry expires ttl seconds after it was first stored, not after it
    # entered memory, so a value read from disk keeps its original age.
    def expires_at(_key: str, entry: _Entry, _now: float) -> float:
        return entry.stored + ttl

    return cachetools.TLRUCache(maxsize=max_entries, ttu=expires_at, timer=clock)


def _disk_text(value: Any) -> str | None:
    """Return the text to store on disk for ``value``, or ``None`` if it must not be."""
    try:
        text = _codec.encode(value)
    except Exception:  # pickle raises whatever a value's __reduce__ raises
        return None
    if _PICKLE_NODE in text:
        return None
    try:
        # A str with lone surrogates encodes to JSON, but SQLite takes UTF-8.
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def _wake(waiters: list[asyncio.Future[Outcome]], outcome: Outcome) -> None:
    """Give ``outcome`` to each waiter, on its own event loop."""
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for waiter in waiters:
        loop = waiter.get_loop()
        if loop is current:
            _settle(waiter, outcome)
            continue
        try:
            loop.call_soon_threadsafe(_settle, waiter, outcome)
        except RuntimeError:
            pass  # The waiter's loop is closed, so no task awaits the waiter.


def _settle(waiter: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not waiter.done():
        waiter.set_result(outcome)
