"""`prioritized`: read a source in the background and yield its items by priority."""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncIterable,
    Callable,
    Iterable,
)
from types import TracebackType
from typing import Any

from batchtools._exceptions import ConfigurationError
from batchtools.engine._feed import BLOCK, Feed
from batchtools.flow._priority import (
    PRIORITIZED_MAXSIZE,
    Clock,
    _aging_rate,
    _check_clock,
    _Heap,
    _item_text,
    _set_result,
    _size_limit,
    check_priority,
)


class Prioritized:
    """Items of a source, the highest priority first; an async iterator.

    A background task moves items from the source into a heap as they
    arrive, and each ``__anext__`` returns the highest priority among the
    items read so far. The source is read as the engine reads its input
    (`batchtools.engine._feed.Feed`). A sync iterable that may block (a
    generator, a file, standard input) is read on a helper thread, and an
    in-memory collection on the event loop.
    Reading pauses while ``maxsize`` items are held. Iteration ends when
    the source has ended and every item was returned. Use `prioritized` to
    make one.

    As the item source of an engine, pair it with ``Settings.read_ahead =
    0``, or the engine takes items from it in blocks and runs each block in
    the order taken.

    NOTE: an engine worker that waits for the next item of a slow source
    does not take a retry whose backoff ended meanwhile. The retry waits
    until the next item is read or the source ends.
    """

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        priority: Callable[[Any], Any],
        *,
        aging: float | None,
        clock: Clock,
        maxsize: int | None,
        on_invalid: Callable[[Any, ConfigurationError], float] | None,
        name: str,
    ) -> None:
        if not callable(priority):
            raise ConfigurationError(f"priority={priority!r} must be a callable")
        if on_invalid is not None and not callable(on_invalid):
            raise ConfigurationError(f"on_invalid={on_invalid!r} must be a callable")
        if not isinstance(source, AsyncIterable | Iterable):
            raise ConfigurationError(f"source={source!r} is not an iterable")
        self._feed = Feed(source)
        self._priority = priority
        self._on_invalid = on_invalid
        self._name = name
        self._heap = _Heap(_aging_rate(aging), _check_clock(clock))
        self._maxsize = _size_limit("maxsize", maxsize)
        self._read = 0
        self._ended = False
        self._error: BaseException | None = None
        self._item_waiter: asyncio.Future[None] | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Prioritized read={self._read} held={len(self._heap)}>"

    @property
    def read_count(self) -> int:
        """Items read from the source so far."""
        return self._read

    async def __aenter__(self) -> Prioritized:
        self._start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Prioritized:
        return self

    async def __anext__(self) -> Any:
        """Return the item with the highest priority read so far.

        Raises:
            ConfigurationError: An item's priority is invalid and there is
                no ``on_invalid``; the items still held are dropped.
            BaseException: Whatever the source raised.
        """
        self._start()
        while not self._heap and self._error is None:
            if self._ended:
                raise StopAsyncIteration
            self._item_waiter = asyncio.get_running_loop().create_future()
            await self._item_waiter
        if self._error is not None:
            error, self._error = self._error, None
            self._heap.pop_all()
            raise error
        item = self._heap.pop()
        _set_result(self._room_waiter)
        return item

    async def aclose(self) -> None:
        """Stop reading the source; a thread blocked reading it ends by itself."""
        self._ended = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._feed.aclose()
        self._heap.pop_all()
        _set_result(self._item_waiter)

    def _start(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._read_source())

    async def _read_source(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                room = BLOCK
                if self._maxsize is not None:
                    while len(self._heap) >= self._maxsize:
                        self._room_waiter = loop.create_future()
                        await self._room_waiter
                    room = min(room, self._maxsize - len(self._heap))
                block = await self._feed.read(room)
                if not block:
                    break
                for item in block:
                    self._add(item)
                _set_result(self._item_waiter)
        except Exception as error:
            self._error = error
        self._ended = True
        _set_result(self._item_waiter)
        # A helper thread reading a sync source waits for room until closed.
        await self._feed.aclose()

    def _add(self, item: Any) -> None:
        """Put one item read from the source into the heap.

        Raises:
            ConfigurationError: The priority is invalid, and there is no
                ``on_invalid`` or it returned an invalid priority too.
        """
        position = self._read
        self._read += 1
        where = f" for item {position} of the input ({_item_text(item)})"
        try:
            value = self._priority(item)
        except Exception as error:
            failure = ConfigurationError(
                f"{self._name} of item {position} of the input "
                f"({_item_text(item)}) could not be computed: {error!r}"
            )
            failure.__cause__ = error
        else:
            try:
                number = check_priority(value, name=self._name, where=where, text=True)
            except ConfigurationError as error:
                failure = error
            else:
                self._heap.push(item, number)
                return
        if self._on_invalid is None:
            raise failure
        fallback = self._on_invalid(item, failure)
        number = check_priority(fallback, name="on_invalid()", where=where)
        self._heap.push(item, number)


def prioritized(
    source: Iterable[Any] | AsyncIterable[Any],
    *,
    priority: Callable[[Any], Any],
    aging: float | None = None,
    clock: Clock = time.monotonic,
    maxsize: int | None = PRIORITIZED_MAXSIZE,
    on_invalid: Callable[[Any, ConfigurationError], float] | None = None,
    name: str = "priority",
) -> Prioritized:
    """Read ``source`` in the background; yield the highest priority first.

    Example::

        async with prioritized(paths, priority=os.path.getsize) as items:
            async for path in items:
                ...

    Args:
        source: A sync or async iterable of items.
        priority: Returns an item's priority, a larger number first: an int,
            a float or a number as text. If it raises, the priority is
            invalid.
        aging: Priority points an item gains per second of waiting.
        clock: Returns seconds for aging; a fake clock in tests.
        maxsize: Items held at most; reading pauses at this many, so
            priorities order items within a window of this size. ``None``
            reads the whole source as fast as it comes.
        on_invalid: Called with an item whose priority is invalid and the
            `ConfigurationError`. It returns the priority to use instead,
            such as ``-math.inf`` to run the item last, or raises. Without
            it, the iteration raises that error.
        name: What errors call the priority, such as ``"--priority"``.
            Items are counted from 0 in errors, in the order read.

    Raises:
        ConfigurationError: An argument is invalid.
    """
    return Prioritized(
        source,
        priority,
        aging=aging,
        clock=clock,
        maxsize=maxsize,
        on_invalid=on_invalid,
        name=name,
    )
