"""The measuring parts of a load test: the items of samples and the peak memory.

`batchtools.observe.loadtest.bench` uses both; see its module docstring.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import psutil

from batchtools._exceptions import ConfigurationError

MEMORY_INTERVAL = 0.05
"""Seconds of real time between two samples of the memory in use."""


class ItemSource:
    """Hands out the items of samples: from a factory, or from an iterable in turn."""

    def __init__(self, items: Iterable[Any] | Callable[[int], Any]) -> None:
        if isinstance(items, str | bytes):
            raise ConfigurationError(
                f"items={items!r} is a string, which would be used one character "
                "at a time; pass a list of items, such as [url]"
            )
        self._factory: Callable[[int], Any] | None = None
        self._cycle: Iterator[Any] | None = None
        if callable(items):
            self._factory = items
        else:
            # cycle() keeps each item it has read, so the items are read
            # once and at most as many are held as the input has.
            self._cycle = itertools.cycle(items)

    def take(self, count: int) -> list[Any]:
        """Return the next ``count`` items.

        Raises:
            ConfigurationError: The iterable has no items at all.
        """
        if self._factory is not None:
            return [self._factory(position) for position in range(1, count + 1)]
        assert self._cycle is not None
        batch = list(itertools.islice(self._cycle, count))
        if len(batch) < count:
            raise ConfigurationError(
                "items is empty; give at least one item, or a factory function "
                "that makes the item for a position in the sample"
            )
        return batch


class PeakMemory:
    """Samples the resident memory of this process and its descendants on a thread.

    Samples are taken on entry, every `MEMORY_INTERVAL` seconds and on exit.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._sample_until_stopped,
            name="batchtools-bench-memory",
            daemon=True,
        )

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(MEMORY_INTERVAL):
            self._sample()

    def _sample(self) -> None:
        # NOTE: a child process that starts and ends between two samples is
        # not counted, so the peak of very short commands is a lower bound.
        total = 0
        with contextlib.suppress(psutil.Error):
            total = self._process.memory_info().rss
            for child in self._process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    continue  # It ended between the listing and the read.
        self.peak = max(self.peak, total)
