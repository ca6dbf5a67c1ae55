"""Memory and load: pause admission when memory runs low, bound what workers use.

`Memory` gathers four limits:

- ``free``: admission pauses while the machine's available memory is below
  this size, and resumes once it is above again. Attempts in flight go on.
- ``per_item``: concurrency is capped at the available memory divided by
  this size, when the run starts.
- ``max_worker``: a process worker whose resident memory exceeds this size
  is killed, and the item it was executing fails with `MemoryLimitError`.
  The process backend enforces it; it reads each worker's memory ten
  times a second.
- ``max_items_per_worker``: a process worker is replaced after this many
  items, so a task that leaks memory starts afresh now and then.

The pause is written here because it is part of admission: the engine queries
the `MemoryGate` before each start, and the gate reads the available memory
at most once per ``check_every`` seconds, so a fast run does not pay a
system call per item. The reading function and the clock are injectable.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from batchtools._exceptions import ConfigurationError, format_size
from batchtools.policy._units import parse_size

P = ParamSpec("P")
R = TypeVar("R")


def available_memory() -> int:
    """Return the bytes of memory available to new work on this machine."""
    import psutil

    return int(psutil.virtual_memory().available)


def total_memory() -> int:
    """Return the bytes of physical memory of this machine."""
    import psutil

    return int(psutil.virtual_memory().total)


@dataclass(frozen=True, slots=True)
class Memory:
    """Limits on memory use; see the module docstring.

    Args:
        free: Pause admission while available memory is below this size
            (bytes, or text such as ``"2G"``).
        per_item: Cap concurrency at available memory divided by this size.
        max_worker: Kill a process worker whose resident memory exceeds it.
        max_items_per_worker: Replace a process worker after this many items.
        available: Returns the available memory in bytes.
        total: Returns the machine's memory in bytes; ``free`` above it
            is rejected, because admission would never resume.
        clock: Returns the current time in seconds.
        check_every: Seconds between two readings of the available memory.

    Raises:
        ConfigurationError: A size or count is out of range.
    """

    free: int | str | None = None
    per_item: int | str | None = None
    max_worker: int | str | None = None
    max_items_per_worker: int | None = None
    available: Callable[[], int] = field(default=available_memory, repr=False)
    total: Callable[[], int] = field(default=total_memory, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    check_every: float = 0.25

    def __post_init__(self) -> None:
        for name, option in (
            ("free", "--memfree"),
            ("per_item", "--mem-per-item"),
            ("max_worker", "--max-memory"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            size = parse_size(value, name=f"Memory {name} ({option})")
            object.__setattr__(self, name, size)
        count = self.max_items_per_worker
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 1
        ):
            raise ConfigurationError(
                f"Memory max_items_per_worker={count!r} (--max-items-per-worker) "
                "must be a whole number of at least 1"
            )
        if not self.check_every > 0:
            raise ConfigurationError(
                f"Memory check_every={self.check_every!r} must be more than 0 seconds"
            )

    def cap(self, concurrency: int) -> int:
        """Return ``concurrency``, lowered to what ``per_item`` allows.

        At least one attempt always runs, even when memory is short.
        """
        if self.per_item is None:
            return concurrency
        assert isinstance(self.per_item, int)
        return max(1, min(concurrency, self.available() // self.per_item))

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Make calls of ``function`` (sync or async) wait while memory is short.

        Only ``free`` applies here: a call starts once the available memory
        is at least ``free``. A sync call waits by sleeping in its thread, an
        async call on the event loop.

        Raises:
            ConfigurationError: ``free`` is not set.
        """
        gate = self.gate()
        if gate is None:
            raise ConfigurationError(
                "a Memory decorator needs free=SIZE: it makes calls wait while "
                "less memory than that is available"
            )
        lock = threading.Lock()

        def delay() -> float:
            with lock:
                return gate.admit()

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def waiting_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                while (seconds := delay()) > 0:
                    await asyncio.sleep(seconds)
                return await function(*args, **kwargs)

            return waiting_async  # type: ignore[return-value]

        @functools.wraps(function)
        def waiting(*args: P.args, **kwargs: P.kwargs) -> R:
            while (seconds := delay()) > 0:
                time.sleep(seconds)
            return function(*args, **kwargs)

        return waiting

    def gate(self) -> MemoryGate | None:
        """Return the admission gate for one run, or ``None`` without ``free``."""
        if self.free is None:
            return None
        assert isinstance(self.free, int)
        total = self.total()
        if self.free > total:
            raise ConfigurationError(
                f"Memory free (--memfree) of {format_size(self.free)} is more than "
                f"this machine's {format_size(total)} of memory, so no item would "
                "ever start; give a smaller size"
            )
        return MemoryGate(self.free, self.available, self.clock, self.check_every)


class MemoryGate:
    """Tells the engine whether an attempt may start, given the free memory.

    Attributes:
        free: The bytes that must be available for admission.
        paused: Whether admission is paused now.
        pauses: How many times admission paused.
        paused_seconds: Time spent paused, up to the last reading.
        last_available: The latest reading, in bytes.
    """

    def __init__(
        self,
        free: int,
        available: Callable[[], int],
        clock: Callable[[], float],
        check_every: float,
    ) -> None:
        self.free = free
        self._available = available
        self._clock = clock
        self._check_every = check_every
        self._next_check = -float("inf")
        self._paused_since = 0.0
        self.paused = False
        self.pauses = 0
        self.paused_seconds = 0.0
        self.last_available = 0

    def admit(self) -> float:
        """Return 0 if an attempt may start now, else seconds to wait and ask again."""
        now = self._clock()
        if now < self._next_check:
            return self._next_check - now if self.paused else 0.0
        self._next_check = now + self._check_every
        self.last_available = available = self._available()
        if available >= self.free:
            if self.paused:
                self.paused = False
                self.paused_seconds += now - self._paused_since
            return 0.0
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._paused_since = now
        return self._check_every

    def paused_time(self) -> float:
        """Return the seconds spent paused so far, the current pause included."""
        if self.paused:
            return self.paused_seconds + self._clock() - self._paused_since
        return self.paused_seconds

    def reason(self) -> str:
        """Describe why admission is paused, for the progress line."""
        return (
            f"paused: {self.last_available / 2**20:,.0f} MiB available, "
            f"below {self.free / 2**20:,.0f} MiB"
        )
