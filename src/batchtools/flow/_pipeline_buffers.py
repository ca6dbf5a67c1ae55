"""The bounded buffers between pipeline stages, and the per-stage tallies.

A `_Queue` carries the values of one stage's successes to the next stage,
remembering which input item each came from. An `_Output` gathers the final
outcomes, in input order when asked. Both are bounded, so a slow stage
holds back the ones before it instead of letting memory grow.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import statistics
import threading
from array import array
from collections.abc import Iterator
from typing import Any, NamedTuple

from batchtools.engine._outcome import (
    COUNT_KEYS,
    Outcome,
    Report,
)
from batchtools.flow._pipeline_report import PipelineOutcome, StageReport

# Values waiting between two stages; about one block of the engine's reads.
QUEUE_LIMIT = 256
# Final outcomes the caller has not taken yet, like `AsyncStream`'s backlog.
OUTPUT_LIMIT = 1024
# Attempt durations kept per stage for the percentiles: 80 KB of doubles.
SAMPLE_SIZE = 10_000


class _Origin(NamedTuple):
    """The original item behind a value on its way through the stages."""

    seq: int
    key: str | None
    item: Any


class _LatencySample:
    """Attempt durations of one stage: a bounded sample and the exact maximum.

    The sample is uniform over all durations (reservoir sampling,
    Algorithm R), so memory stays bounded. Up to `SAMPLE_SIZE` attempts
    the percentiles are exact; beyond that they are estimates.
    """

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self._size = size
        self._values = array("d")
        self._random = random.Random(seed)
        self.count = 0
        self.max: float | None = None

    def add(self, seconds: float) -> None:
        """Record one attempt's duration in seconds."""
        self.count += 1
        if self.max is None or seconds > self.max:
            self.max = seconds
        if len(self._values) < self._size:
            self._values.append(seconds)
            return
        slot = self._random.randrange(self.count)
        if slot < self._size:
            self._values[slot] = seconds

    def median(self) -> float | None:
        """Return the median of the sample, or ``None`` when it is empty."""
        return statistics.median(self._values) if self._values else None

    def percentile(self, share: float) -> float | None:
        """Return the nearest-rank percentile ``share`` (0 to 1) of the sample."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class _Tally:
    """Counts and attempt durations of one stage, kept as its outcomes pass."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.latency = _LatencySample()

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.state.value] += 1
        # NOTE: the items of a batch share their attempts' list, so a batch
        # stage counts each attempt once per item of the batch.
        for attempt in outcome.attempts:
            self.latency.add(attempt.duration)

    def finish(self, name: str, report: Report) -> StageReport:
        sample = self.latency
        return StageReport(
            name=name,
            counts=self.counts,
            attempts=sample.count,
            median_seconds=sample.median(),
            p95_seconds=sample.percentile(0.95),
            max_seconds=sample.max,
            report=report,
        )


class _Queue:
    """The bounded queue between two stages; the later stage's engine reads it.

    The pump of the earlier stage puts values in on the event loop. The
    later engine reads the queue as a blocking iterator, which it pulls on
    its reader thread and takes in blocks. An async source would instead
    be read one item per refill, and each refill wakes every idle worker
    of the engine.
    ``origins`` maps the later engine's ``seq`` of each value it read to
    the original item, until the pump of the later stage takes it out.
    """

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._values: collections.deque[tuple[Any, _Origin]] = collections.deque()
        self._limit = limit
        self._condition = threading.Condition()
        self._ended = False
        self._closed = False
        self._room: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.origins: dict[int, _Origin] = {}
        self._read = 0

    async def put(self, value: Any, origin: _Origin) -> bool:
        """Queue ``value``, waiting for room; false if the reader has closed."""
        while True:
            with self._condition:
                if self._closed:
                    return False
                if len(self._values) < self._limit:
                    self._values.append((value, origin))
                    self._condition.notify()
                    return True
                self._loop = asyncio.get_running_loop()
                room = self._room = self._loop.create_future()
            await room

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._condition:
            while not self._values and not (self._ended or self._closed):
                self._condition.wait()
            if self._closed or not self._values:
                raise StopIteration
            value, origin = self._values.popleft()
            self.origins[self._read] = origin
            self._read += 1
            room, self._room = self._room, None
        if room is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, room)
        return value

    def origin_of(self, seq: int) -> _Origin:
        """Return and forget the original item of the value read at ``seq``."""
        with self._condition:
            return self.origins.pop(seq)

    def end(self) -> None:
        """Mark that no more values come: the reader stops once it has read all."""
        with self._condition:
            self._ended = True
            self._condition.notify_all()

    def close_and_drain(self) -> list[_Origin]:
        """Stop the reader and return, oldest first, the items without an outcome.

        Those are the values still queued and the values the engine read
        but never gave an outcome. Later puts return false.
        """
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            leftovers = sorted(self.origins.values())
            leftovers.extend(origin for _, origin in self._values)
            self.origins.clear()
            self._values.clear()
            room, self._room = self._room, None
        if room is not None:
            _resolve(room)
        return leftovers


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Output:
    """Final outcomes on their way to the caller, bounded.

    Unordered, a producer waits while `OUTPUT_LIMIT` outcomes are queued.
    Ordered, an outcome is held until every earlier item's outcome has
    arrived, and a producer waits while that many are held. The outcome
    next in order is always taken at once, because taking it releases the
    ones held behind it. After a stop, items that a stage read but never
    ran leave gaps in the order, so ordered producers no longer wait, and
    the end releases what is held in input order.
    """

    def __init__(self, ordered: bool, limit: int = OUTPUT_LIMIT) -> None:
        self._ordered = ordered
        self._limit = limit
        self._ready: collections.deque[PipelineOutcome] = collections.deque()
        self._held: dict[int, PipelineOutcome] = {}
        self._next = 0
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._discarding = False
        self.relaxed = False
        self.ended = False

    def _must_wait(self, outcome: PipelineOutcome) -> bool:
        if self._discarding:
            return False
        if not self._ordered:
            return len(self._ready) >= self._limit
        if self.relaxed or outcome.seq == self._next:
            return False
        return len(self._ready) + len(self._held) >= self._limit

    async def put(self, outcome: PipelineOutcome) -> None:
        """Queue ``outcome`` for the caller, waiting for room."""
        while self._must_wait(outcome):
            self._space.clear()
            await self._space.wait()
        if self._discarding:
            return
        if not self._ordered:
            self._ready.append(outcome)
        else:
            self._held[outcome.seq] = outcome
            while self._next in self._held:
                self._ready.append(self._held.pop(self._next))
                self._next += 1
            self._space.set()
        self._arrived.set()

    def end(self) -> None:
        """Release what is held, in input order, and mark the end."""
        for seq in sorted(self._held):
            self._ready.append(self._held.pop(seq))
        self.ended = True
        self._arrived.set()

    def discard(self) -> None:
        """Drop every outcome from now on: the caller has gone."""
        self._discarding = True
        self._ready.clear()
        self._held.clear()
        self._space.set()

    async def take(self, limit: int) -> list[PipelineOutcome]:
        """Return up to ``limit`` outcomes, waiting for one; empty at the end."""
        while not self._ready:
            if self.ended:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        count = min(limit, len(self._ready))
        batch = [self._ready.popleft() for _ in range(count)]
        self._space.set()
        return batch
