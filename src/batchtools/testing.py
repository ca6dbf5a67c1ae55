"""Helpers for testing code that uses batchtools, in its users' own suites.

- `fast_retries` removes backoff waits and caps attempts, process-wide,
  for the duration of a ``with`` block (or of a test, through the pytest
  fixture ``batchtools_fast_retries``).
- `FakeClock` is a clock to pass as ``clock=`` to `RateLimit` and
  `CircuitBreaker`. It moves only when the test advances it.
- `flaky` wraps a task so that it fails the first N calls per item, or a
  given share of calls, with a chosen error.
- `ConcurrencyProbe` wraps a task and records how many calls ran at once.

The pytest fixtures live in `batchtools._pytest_plugin`, which pytest loads
through the ``pytest11`` entry point, so this module does not need pytest.

Example::

    from batchtools.testing import flaky, fast_retries

    def test_fetch_survives_two_failures():
        task = flaky(fetch, fail_first=2, error=ConnectionError)
        with fast_retries():
            report = batchtools.run(urls, task, retry=2)
        assert report.ok
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from batchtools import _codec
from batchtools.policy.retry import TEST_MODE

__all__ = ["ConcurrencyProbe", "FakeClock", "fast_retries", "flaky"]


@contextlib.contextmanager
def fast_retries(max_attempts: int | None = None) -> Iterator[None]:
    """Make backoff waits zero, and cap attempts per item, inside the block.

    Args:
        max_attempts: At most this many attempts per item, whatever the
            retry policy allows. ``None`` leaves the policies' counts alone.

    The switch is process-wide: it also affects runs on other threads.
    """
    saved = (TEST_MODE.no_waits, TEST_MODE.max_attempts)
    TEST_MODE.no_waits = True
    TEST_MODE.max_attempts = max_attempts
    try:
        yield
    finally:
        TEST_MODE.no_waits, TEST_MODE.max_attempts = saved


class FakeClock:
    """A clock that moves only when the test calls `advance` or sets `now`.

    Attributes:
        now: The current time in seconds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def __repr__(self) -> str:
        return f"<FakeClock now={self.now:g}>"

    def advance(self, seconds: float) -> None:
        """Move the clock forward.

        Raises:
            ValueError: ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds!r})")
        self.now += seconds


def flaky(
    task: Callable[..., Any],
    *,
    fail_first: int = 0,
    share: float = 0.0,
    error: type[BaseException] | Callable[[Any], BaseException] = ConnectionError,
    seed: int | None = 0,
) -> Callable[..., Any]:
    """Wrap ``task`` so that some calls fail before it is called.

    Args:
        task: A sync or async callable taking an item.
        fail_first: Fail the first this many calls for each item. Items
            are distinguished by their content.
        share: Also fail this share (0 to 1) of the other calls, drawn at
            random.
        error: The exception type, or a function from item to exception.
        seed: Seed of the random draws, for repeatable tests.

    Returns:
        A callable of the same kind (sync or async) as ``task``.

    Raises:
        ValueError: ``share`` is outside 0 to 1, or ``fail_first`` negative.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"flaky share={share!r} must be between 0 and 1")
    if fail_first < 0:
        raise ValueError(f"flaky fail_first={fail_first!r} must not be negative")
    calls: collections.Counter[str] = collections.Counter()
    draws = random.Random(seed)
    lock = threading.Lock()

    def maybe_fail(item: Any) -> None:
        key = _codec.encode(item)
        with lock:
            calls[key] += 1
            failing = calls[key] <= fail_first or draws.random() < share
        if not failing:
            return
        if isinstance(error, type):
            raise error(f"flaky failure of {item!r}")
        raise error(item)

    if inspect.iscoroutinefunction(task):

        @functools.wraps(task)
        async def flaky_async(item: Any, *args: Any, **kwargs: Any) -> Any:
            maybe_fail(item)
            return await task(item, *args, **kwargs)

        return flaky_async

    @functools.wraps(task)
    def flaky_sync(item: Any, *args: Any, **kwargs: Any) -> Any:
        maybe_fail(item)
        return task(item, *args, **kwargs)

    return flaky_sync


class ConcurrencyProbe:
    """Wraps tasks and records how many of their calls run at once.

    Attributes:
        in_flight: Calls running now.
        max_in_flight: The maximum number of calls that ran at once.
        calls: Calls started so far.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyProbe in_flight={self.in_flight} "
            f"max_in_flight={self.max_in_flight} calls={self.calls}>"
        )

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _exit(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def wrap(self, task: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``task`` (sync or async) counted by this probe."""
        if inspect.iscoroutinefunction(task):

            @functools.wraps(task)
            async def probed_async(*args: Any, **kwargs: Any) -> Any:
                self._enter()
                try:
                    return await task(*args, **kwargs)
                finally:
                    self._exit()

            return probed_async

        @functools.wraps(task)
        def probed(*args: Any, **kwargs: Any) -> Any:
            self._enter()
            try:
                return task(*args, **kwargs)
            finally:
                self._exit()

        return probed
