"""A pool of resources that tasks share: connections, clients, sessions.

A resource moves through these states, and counts against ``max_size``
from the start of its creation to the end of its close::

    creating -> in use     the factory returned it
    creating -> gone       the factory raised; the slot is freed
    in use   -> idle       released, also when the block raised
    idle     -> in use     acquired; then checked, if there is a check
    in use   -> closing    discarded, failed its check, or released after aclose
    idle     -> closing    idle timeout passed above min_size, or aclose
    closing  -> gone       close returned or raised; the slot is freed

Capacity goes to waiting acquirers first, in arrival order: a released
resource or a freed slot is handed to the oldest waiter directly, so a
newcomer cannot take it in between. Idle resources are reused last in,
first out, so the ones a quieter load no longer needs stay at the bottom
of the stack until their idle timeout closes them.

The pool serves one event loop and is not thread-safe. There is no
background thread: the idle timeout is checked on every acquire and
release, and by `ResourcePool.reap`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from batchtools._exceptions import ConfigurationError, PoolTimeoutError
from batchtools.policy._units import parse_duration

T = TypeVar("T")

logger = logging.getLogger("batchtools.pool")

Duration = float | str | timedelta


class _Reservation:
    """A slot granted to an acquirer, which fills it by calling the factory."""

    __slots__ = ()


_RESERVED = _Reservation()


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool's counts.

    Attributes:
        size: Resources that count against ``max_size``: idle, in use, and
            being created or closed.
        idle: Resources waiting in the pool to be acquired.
        in_use: Resources acquired and not yet released.
        waiting: Acquirers waiting for a resource.
        created: Resources the factory has returned since the pool was made.
        closed: Resources the pool has closed (or tried to close) so far.
    """

    size: int
    idle: int
    in_use: int
    waiting: int
    created: int
    closed: int


class ResourcePool(Generic[T]):
    """An async pool of at most ``max_size`` resources that tasks share.

    Example::

        pool = ResourcePool(connect, max_size=4, idle_timeout="5m")
        async with pool:
            async with pool.acquire() as connection:
                await connection.execute(query)

    Args:
        factory: Makes a new resource; a sync function or a coroutine
            function, called with no arguments. It must not return None.
        min_size: Resources that `open` creates, and that the idle timeout
            never closes.
        max_size: The maximum number of resources that exist at once.
        close: Disposes of a resource (sync or async). Without it, the pool
            calls the resource's ``aclose()`` or, failing that, its
            ``close()`` method, awaiting the result when it is awaitable.
        check: Tells whether an idle resource is still usable (sync or
            async, returning a bool) before `acquire` hands it out. A
            resource that fails the check, or whose check raises, is closed
            and replaced. New resources are not checked.
        idle_timeout: Seconds, or a duration such as ``"5m"``, that a
            resource above ``min_size`` may stay idle before it is closed.
            ``None`` keeps idle resources open.
        acquire_timeout: Seconds, or a duration, that `acquire` waits for a
            free resource before it raises `PoolTimeoutError`. It does not
            bound the factory or the check. ``None`` waits without a limit.
        name: The pool's name in errors and logs; the factory's qualified
            name by default.
        clock: Returns the current time in seconds, for the idle timeout;
            `time.monotonic` by default, a fake clock in tests. The acquire
            timeout runs on the event loop's own clock.

    Raises:
        ConfigurationError: A value is out of range or of the wrong type.
    """

    @overload
    def __init__(
        self,
        factory: Callable[[], Awaitable[T]],
        *,
        min_size: int = 0,
        max_size: int = 10,
        close: Callable[[T], object] | None = None,
        check: Callable[[T], bool | Awaitable[bool]] | None = None,
        idle_timeout: Duration | None = None,
        acquire_timeout: Duration | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    @overload
    def __init__(
        self,
        factory: Callable[[], T],
        *,
        min_size: int = 0,
        max_size: int = 10,
        close: Callable[[T], object] | None = None,
        check: Callable[[T], bool | Awaitable[bool]] | None = None,
        idle_timeout: Duration | None = None,
        acquire_timeout: Duration | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    def __init__(
        self,
        factory: Callable[[], Awaitable[T] | T],
        *,
        min_size: int = 0,
        max_size: int = 10,
        close: Callable[[T], object] | None = None,
        check: Callable[[T], bool | Awaitable[bool]] | None = None,
        idle_timeout: Duration | None = None,
        acquire_timeout: Duration | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _validate_callables(factory=factory, close=close, check=check, clock=clock)
        _validate_size("min_size", min_size, lowest=0)
        _validate_size("max_size", max_size, lowest=1)
        if min_size > max_size:
            raise ConfigurationError(
                f"ResourcePool min_size={min_size} must not exceed "
                f"max_size={max_size}; raise max_size or lower min_size"
            )
        self.name = name if name is not None else _name_of(factory)
        self.min_size = min_size
        self.max_size = max_size
        self.idle_timeout = _optional_duration(
            idle_timeout, "idle_timeout", "None keeps idle resources open"
        )
        self.acquire_timeout = _optional_duration(
            acquire_timeout, "acquire_timeout", "None waits without a limit"
        )
        self._factory = factory
        self._close = close
        self._check = check
        self._clock = clock

        # Idle resources with the clock's time of their release, oldest first.
        self._idle: list[tuple[T, float]] = []
        # Keyed by id() because resources need not be hashable.
        self._in_use: dict[int, T] = {}
        self._discarded: set[int] = set()
        self._creating = 0
        self._closing = 0
        self._waiters: collections.deque[asyncio.Future[T | _Reservation]] = (
            collections.deque()
        )
        self._background: set[asyncio.Task[None]] = set()
        self._created_count = 0
        self._closed_count = 0
        self._is_closed = False
        self._drained = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else "open"
        return (
            f"<ResourcePool {self.name!r} {state} size={self.size}/{self.max_size} "
            f"idle={self.idle} in_use={self.in_use} waiting={self.waiting}>"
        )

    @property
    def size(self) -> int:
        """Resources counted against ``max_size``, even those being made or closed."""
        return len(self._idle) + len(self._in_use) + self._creating + self._closing

    @property
    def idle(self) -> int:
        """Resources waiting in the pool to be acquired."""
        return len(self._idle)

    @property
    def in_use(self) -> int:
        """Resources acquired and not yet released."""
        return len(self._in_use)

    @property
    def waiting(self) -> int:
        """Acquirers waiting for a resource."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def created(self) -> int:
        """Resources the factory has returned since the pool was made."""
        return self._created_count

    @property
    def closed(self) -> int:
        """Resources the pool has closed (or tried to close) so far.

        This is a count. Whether the pool itself is closed is `is_closed`.
        """
        return self._closed_count

    @property
    def is_closed(self) -> bool:
        """Whether `aclose` has been called."""
        return self._is_closed

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the pool's counts."""
        return PoolStatistics(
            size=self.size,
            idle=self.idle,
            in_use=self.in_use,
            waiting=self.waiting,
            created=self.created,
            closed=self.closed,
        )

    async def __aenter__(self) -> ResourcePool[T]:
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create resources one after another until the pool contains ``min_size``.

        Acquiring does not need it: without `open`, resources are created on
        demand. Calling it again tops the pool up to ``min_size``.

        Raises:
            RuntimeError: The pool is closed, or bound to another event loop.
            Exception: Whatever the factory raised. The resources created
                before it stay in the pool.
        """
        self._bind_loop()
        self._raise_if_closed()
        while not self._is_closed and self._live_count() < self.min_size:
            self._creating += 1
            resource = await self._create()
            self._give_back(resource)

    def acquire(self) -> contextlib.AbstractAsyncContextManager[T]:
        """Borrow a resource for the duration of an ``async with`` block.

        The block receives an idle resource that passed ``check``. When none
        is idle, it receives a new one if the pool is below ``max_size``, and
        otherwise waits for one. On leaving the block the resource goes back
        to the pool, even when the block raised, unless `discard` was called
        on it. A block that is cancelled (or interrupted) closes the resource
        instead, because it may have stopped in the middle of an exchange.

        Raises:
            PoolTimeoutError: No resource was free within ``acquire_timeout``.
            RuntimeError: The pool is closed, or bound to another event loop.
            TypeError: The factory returned None.
            Exception: Whatever the factory raised.
        """
        return self._lease()

    def discard(self, resource: T) -> None:
        """Mark a borrowed resource as broken, so that it is closed on release.

        Call it inside the ``async with pool.acquire()`` block. The resource
        is closed when the block ends, and its slot is freed.

        Raises:
            ValueError: ``resource`` is not in use from this pool.
        """
        key = id(resource)
        if self._in_use.get(key) is not resource:
            raise ValueError(
                f"cannot discard {type(resource).__name__} object: it is not in "
                f"use from pool {self.name!r}; call discard inside the "
                "'async with pool.acquire()' block that returned it"
            )
        self._discarded.add(key)

    async def reap(self) -> int:
        """Close the resources above ``min_size`` idle for ``idle_timeout``.

        Acquire and release do this too, but close in the background. This
        call also waits until every close started in the background has
        finished.

        Returns:
            How many resources this call found expired.

        Raises:
            RuntimeError: The pool is bound to another event loop.
        """
        self._bind_loop()
        expired = self._reap_expired()
        if self._background:
            await asyncio.wait(set(self._background))
        return expired

    async def aclose(self) -> None:
        """Close the pool and every resource in it, each exactly once.

        Idle resources are closed at once, and acquirers still waiting fail
        with `RuntimeError`. The call then waits until every borrowed
        resource has been released and closed, without a time limit. Later
        acquires raise `RuntimeError`. Calling it again waits the same way.

        Raises:
            RuntimeError: The pool is bound to another event loop.
        """
        self._bind_loop()
        if not self._is_closed:
            self._is_closed = True
            logger.debug("closing pool %r: %s", self.name, self.statistics())
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(self._closed_error())
            self._waiters.clear()
            while self._idle:
                self._close_in_background(self._idle.pop()[0])
            self._note_drained()
        await self._drained.wait()

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[T]:
        resource = await self._get()
        try:
            yield resource
        except BaseException as error:
            if isinstance(error, Exception):
                await self._put(resource)
            else:
                # Cancelled (a timeout, say) or interrupted at an await, the
                # resource may be in the middle of an exchange: close it
                # rather than hand it to the next task.
                self._discarded.discard(id(resource))
                del self._in_use[id(resource)]
                self._close_in_background(resource)
            raise
        await self._put(resource)

    async def _get(self) -> T:
        self._bind_loop()
        self._raise_if_closed()
        self._reap_expired()
        # Every change that frees capacity hands it to the waiters at once
        # (_dispatch), so while anyone waits _take finds nothing, and a
        # newcomer queues behind them.
        grant = self._take()
        if grant is None:
            grant = await self._wait()
        while True:
            if isinstance(grant, _Reservation):
                return await self._create()
            if await self._passes_check(grant):
                return grant
            grant = await self._replace(grant)

    async def _put(self, resource: T) -> None:
        key = id(resource)
        if key in self._discarded:
            self._discarded.discard(key)
            await self._dispose(resource)
            return
        self._give_back(resource)
        self._reap_expired()

    def _take(self) -> T | _Reservation | None:
        """Take an idle resource or reserve a slot, if the pool has either."""
        if self._idle:
            resource, _ = self._idle.pop()
            self._in_use[id(resource)] = resource
            return resource
        if self.size < self.max_size:
            self._creating += 1
            return _RESERVED
        return None

    def _dispatch(self) -> None:
        """Hand free capacity to waiting acquirers, oldest first."""
        while self._waiters:
            if self._waiters[0].done():
                # A cancelled waiter whose task has not yet run to remove it.
                self._waiters.popleft()
                continue
            grant = self._take()
            if grant is None:
                return
            self._waiters.popleft().set_result(grant)

    async def _wait(self) -> T | _Reservation:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T | _Reservation] = loop.create_future()
        self._waiters.append(waiter)
        timer = None
        if self.acquire_timeout is not None:
            timer = loop.call_later(
                self.acquire_timeout, self._expire, waiter, self.acquire_timeout
            )
        try:
            return await waiter
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: asyncio.Future[T | _Reservation], timeout: float) -> None:
        if waiter.done():
            return
        self._waiters.remove(waiter)
        waiter.set_exception(PoolTimeoutError(self.name, timeout, self.size))

    def _abandon(self, waiter: asyncio.Future[T | _Reservation]) -> None:
        """Withdraw a cancelled waiter, returning whatever it was granted."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            return
        # The grant arrived in the same loop iteration as the cancellation.
        grant = waiter.result()
        if isinstance(grant, _Reservation):
            self._creating -= 1
            self._dispatch()
            self._note_drained()
        else:
            self._give_back(grant)

    async def _create(self) -> T:
        """Call the factory to fill a slot already counted in ``_creating``."""
        try:
            resource: T = await _call(self._factory)
        except BaseException:
            self._creating -= 1
            self._dispatch()
            self._note_drained()
            raise
        self._creating -= 1
        if resource is None:
            self._dispatch()
            self._note_drained()
            raise TypeError(
                f"the factory of pool {self.name!r} returned None; it must return "
                "the new resource"
            )
        if id(resource) in self._in_use or any(r is resource for r, _ in self._idle):
            self._dispatch()
            self._note_drained()
            raise TypeError(
                f"the factory of pool {self.name!r} returned a "
                f"{type(resource).__name__} that the pool already holds; it must "
                "return a new object each time"
            )
        self._in_use[id(resource)] = resource
        self._created_count += 1
        logger.debug("pool %r created a resource: %s", self.name, self.statistics())
        return resource

    async def _passes_check(self, resource: T) -> bool:
        if self._check is None:
            return True
        try:
            return bool(await _call(self._check, resource))
        except Exception:
            logger.warning(
                "the check of a resource of pool %r raised an error, so the pool "
                "closes the resource",
                self.name,
                exc_info=True,
            )
            return False
        except BaseException:
            # A check cancelled midway may leave the resource in the middle of
            # an exchange, so the resource is closed.
            del self._in_use[id(resource)]
            self._close_in_background(resource)
            raise

    async def _replace(self, resource: T) -> T | _Reservation:
        """Close a resource that failed its check, keeping its slot."""
        logger.debug("a resource of pool %r failed its check", self.name)
        del self._in_use[id(resource)]
        self._closing += 1
        try:
            await self._close_resource(resource)
        except BaseException:
            self._closing -= 1
            self._dispatch()
            self._note_drained()
            raise
        self._closing -= 1
        if self._is_closed:
            self._note_drained()
            raise self._closed_error()
        # The slot just freed goes back to this acquirer, which already waited.
        # Nothing else ran since it was freed, so _take cannot return None.
        grant = self._take()
        assert grant is not None
        return grant

    def _give_back(self, resource: T) -> None:
        """Return a resource that was in use to the idle stack or a waiter."""
        del self._in_use[id(resource)]
        if self._is_closed:
            self._close_in_background(resource)
            return
        self._idle.append((resource, self._clock()))
        self._dispatch()

    async def _dispose(self, resource: T) -> None:
        """Close a resource that was in use, and free its slot."""
        del self._in_use[id(resource)]
        self._closing += 1
        try:
            await self._close_resource(resource)
        finally:
            self._closing -= 1
            self._dispatch()
            self._note_drained()

    def _reap_expired(self) -> int:
        """Start closing idle resources above ``min_size`` past the idle timeout.

        Returns:
            How many resources it found expired.
        """
        if self.idle_timeout is None or not self._idle:
            return 0
        cutoff = self._clock() - self.idle_timeout
        limit = min(self._live_count() - self.min_size, len(self._idle))
        count = 0
        # The stack is sorted by release time, so the expired are at the bottom.
        while count < limit and self._idle[count][1] <= cutoff:
            count += 1
        expired = self._idle[:count]
        del self._idle[:count]
        for resource, _ in expired:
            self._close_in_background(resource)
        if count:
            logger.debug(
                "pool %r is closing %d resources past the idle timeout",
                self.name,
                count,
            )
        return count

    def _close_in_background(self, resource: T) -> None:
        self._closing += 1
        task = asyncio.get_running_loop().create_task(
            self._close_counted(resource), name=f"close resource of {self.name}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_counted(self, resource: T) -> None:
        try:
            await self._close_resource(resource)
        finally:
            self._closing -= 1
            self._dispatch()
            self._note_drained()

    async def _close_resource(self, resource: T) -> None:
        """Close a resource, logging an `Exception` from the close, not raising it."""
        try:
            if self._close is not None:
                await _call(self._close, resource)
            else:
                await _close_by_method(resource)
        except Exception:
            logger.warning(
                "closing a resource of pool %r failed", self.name, exc_info=True
            )
        finally:
            self._closed_count += 1

    def _live_count(self) -> int:
        """Resources that exist or are being created, without those closing."""
        return len(self._idle) + len(self._in_use) + self._creating

    def _note_drained(self) -> None:
        if self._is_closed and self.size == 0:
            self._drained.set()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                f"pool {self.name!r} is used from another event loop than the one "
                "it started on; a ResourcePool serves one loop, so make one per loop"
            )

    def _raise_if_closed(self) -> None:
        if self._is_closed:
            raise self._closed_error()

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(
            f"pool {self.name!r} is closed; make a new ResourcePool to acquire again"
        )


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async function and return its result."""
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _close_by_method(resource: object) -> None:
    for method_name in ("aclose", "close"):
        method = getattr(resource, method_name, None)
        if callable(method):
            await _call(method)
            return


def _name_of(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _validate_callables(**functions: object) -> None:
    for name, function in functions.items():
        if function is None and name != "factory":
            continue
        if not callable(function):
            raise ConfigurationError(
                f"ResourcePool {name}={function!r} must be a callable"
            )


def _validate_size(name: str, value: int, *, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"ResourcePool {name}={value!r} must be an integer")
    if value < lowest:
        raise ConfigurationError(
            f"ResourcePool {name}={value!r} must be at least {lowest}"
        )


def _optional_duration(value: Duration | None, name: str, hint: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, name=f"ResourcePool {name}")
    except ConfigurationError as error:
        raise ConfigurationError(f"{error}; {hint}") from None
