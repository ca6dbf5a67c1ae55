"""Lazy reading of the item source in small blocks.

The engine requests a block whenever its buffer of admitted items runs
dry, so at most one block is read ahead. Three kinds of source:

- sequences and other in-memory collections cannot block, so they are
  read on the event loop itself;
- any other sync iterable (a generator, a file, standard input) may
  block, so a helper thread pulls it into a small bounded buffer and the
  loop takes what is there;
- async iterables are awaited item by item.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

BLOCK = 256

_IN_MEMORY = (list, tuple, range, set, frozenset, dict, collections.deque, str, bytes)


class Feed:
    """Reads blocks of items from a source; see the module docstring."""

    def __init__(self, source: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._thread_reader: _ThreadReader | None = None
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        self.exhausted = False
        # Whether the source itself ended, rather than reading being stopped.
        self.finished = False
        if isinstance(source, AsyncIterable):
            self._async = aiter(source)
        elif isinstance(source, _IN_MEMORY) or type(source).__name__ in (
            "count",
            "cycle",
            "repeat",
            "dict_keys",
            "dict_values",
            "dict_items",
            "list_iterator",
            "tuple_iterator",
            "range_iterator",
        ):
            self._sync = iter(source)
        else:
            self._thread_reader = _ThreadReader(iter(source))

    @property
    def never_blocks(self) -> bool:
        """Whether `read_now` can serve every read: an in-memory source."""
        return self._sync is not None

    def read_now(self, limit: int = BLOCK) -> list[Any]:
        """Return up to ``limit`` items of an in-memory source at once."""
        assert self._sync is not None, "read_now() needs an in-memory source"
        if self.exhausted:
            return []
        block = list(itertools.islice(self._sync, limit))
        if not block:
            self.exhausted = True
            self.finished = True
        return block

    async def read(self, limit: int = BLOCK) -> list[Any]:
        """Return up to ``limit`` items, at least one unless the source is done.

        Raises:
            BaseException: Whatever the source raised while being read.
        """
        if self.exhausted:
            return []
        if self._sync is not None:
            block = list(itertools.islice(self._sync, limit))
        elif self._thread_reader is not None:
            block = await self._thread_reader.take(limit)
        else:
            assert self._async is not None
            try:
                block = [await anext(self._async)]
            except StopAsyncIteration:
                block = []
        if not block:
            self.exhausted = True
            self.finished = True
        return block

    async def aclose(self) -> None:
        """Stop reading; a blocked helper thread is left to end by itself."""
        self.exhausted = True
        if self._thread_reader is not None:
            self._thread_reader.stop()
        if self._async is not None and hasattr(self._async, "aclose"):
            await self._async.aclose()


class _ThreadReader:
    """Pulls a blocking iterator on a daemon thread into a bounded buffer."""

    def __init__(self, iterator: Iterator[Any], capacity: int = 2 * BLOCK) -> None:
        self._iterator = iterator
        self._capacity = capacity
        self._buffer: collections.deque[Any] = collections.deque()
        self._condition = threading.Condition()
        self._done = False
        self._stopped = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._pull, name="batchtools-reader", daemon=True
        )
        self._thread.start()

    def _pull(self) -> None:
        try:
            for item in self._iterator:
                with self._condition:
                    while len(self._buffer) >= self._capacity and not self._stopped:
                        self._condition.wait()
                    if self._stopped:
                        return
                    self._buffer.append(item)
                    self._wake()
        except BaseException as error:
            with self._condition:
                self._error = error
        with self._condition:
            self._done = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and self._loop is not None:
            self._waiter = None
            try:
                self._loop.call_soon_threadsafe(_set_done, waiter)
            except RuntimeError:
                pass  # The loop closed, so no caller reads any more.

    async def take(self, limit: int) -> list[Any]:
        if self._thread is None:
            self._start()
        assert self._loop is not None
        while True:
            with self._condition:
                if self._buffer:
                    count = min(limit, len(self._buffer))
                    block = [self._buffer.popleft() for _ in range(count)]
                    self._condition.notify()
                    return block
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._done:
                    return []
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
