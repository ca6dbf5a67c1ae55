"""Concurrency limits: a fixed number of attempts in flight, or one that adapts.

An adaptive limit treats the service behind the task as a queue it cannot
see, as TCP congestion control treats the network. It estimates the
service's latency without load, raises the limit while latency stays near
that baseline, and lowers it when latency rises well above it or attempts
fail. Written here rather than taken from a package because the engine
needs the two halves apart: `ConcurrencyLimiter.try_acquire` admits an
attempt without waiting (the engine waits in its own loop), and
`ConcurrencyLimiter.release` feeds back each attempt's latency and result.
The controller is pure logic on an injectable clock.

The controller, in `batchtools.policy._adaptive`, decides once per round of
finished attempts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from batchtools._exceptions import ConfigurationError
from batchtools.policy._adaptive import Controller
from batchtools.policy._units import whole_number

P = ParamSpec("P")
R = TypeVar("R")

# How many (time, limit) points `ConcurrencyLimiter.history` keeps. Past
# that, every second point between the first and the latest is dropped.
HISTORY_POINTS = 1000

_SPEC = re.compile(
    r"\s*(?:(?P<fixed>\d+)|auto(?::(?P<min>\d+)-(?P<max>\d+))?)\s*",
    re.ASCII | re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Concurrency:
    """How many attempts may run at once: a fixed number or an adaptive limit.

    The limit moves between ``min`` and ``max``, so equal bounds make it
    fixed. `Concurrency.fixed` and `Concurrency.adaptive` cover the usual
    cases, and the constructor also tunes the controller, whose rules the
    module docstring describes.

    Args:
        min: The lowest limit.
        max: The highest limit.
        initial: The starting limit, or ``None`` to start at ``min``.
        latency_tolerance: Cut the limit when a round's median latency is
            more than this many times the baseline latency (above 1).
        failure_tolerance: Cut the limit when more than this share of a
            round's attempts signalled overload (at least 0, below 1).
        decrease_factor: The deepest cut in one round, as a factor of the
            limit (above 0, below 1). Overload always cuts this deep.
        round_samples: The fewest finished attempts that make a round.
        baseline_rounds: How many recent rounds the baseline latency is
            the minimum of.
        clock: Returns the current time in seconds: `time.monotonic` by
            default, a fake clock in tests.

    Raises:
        ConfigurationError: A value is out of range.
    """

    min: int
    max: int
    initial: int | None = None
    latency_tolerance: float = 1.25
    failure_tolerance: float = 0.1
    decrease_factor: float = 0.5
    round_samples: int = 5
    baseline_rounds: int = 30
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        for name in ("min", "max", "round_samples", "baseline_rounds"):
            _check_count("Concurrency", name, getattr(self, name))
        if self.max < self.min:
            raise ConfigurationError(
                f"Concurrency max={self.max!r} must be at least min={self.min!r}"
            )
        if self.initial is not None:
            _check_count("Concurrency", "initial", self.initial)
            if not self.min <= self.initial <= self.max:
                raise ConfigurationError(
                    f"Concurrency initial={self.initial!r} must lie between "
                    f"min={self.min!r} and max={self.max!r}, or be None"
                )
        _check_range("latency_tolerance", self.latency_tolerance, 1.0, math.inf)
        _check_range("decrease_factor", self.decrease_factor, 0.0, 1.0)
        _check_range(
            "failure_tolerance", self.failure_tolerance, 0.0, 1.0, low_allowed=True
        )

    @property
    def is_adaptive(self) -> bool:
        """Whether the limit can move, which needs ``min`` below ``max``."""
        return self.min < self.max

    @classmethod
    def fixed(cls, limit: int) -> Concurrency:
        """Return a limit that stays at ``limit``.

        Raises:
            ConfigurationError: ``limit`` is not an integer of at least 1.
        """
        _check_count("Concurrency.fixed", "limit", limit)
        return cls(min=limit, max=limit)

    @classmethod
    def adaptive(
        cls,
        min: int = 1,
        max: int = 64,
        *,
        initial: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Concurrency:
        """Return a limit that adapts between ``min`` and ``max``.

        The other settings keep their defaults. Call the constructor to
        change them.

        Raises:
            ConfigurationError: A bound is not an integer of at least 1,
                ``max`` is below ``min``, or ``initial`` lies outside them.
        """
        return cls(min=min, max=max, initial=initial, clock=clock)

    @classmethod
    def parse(
        cls,
        text: str | int,
        *,
        name: str = "concurrency",
        auto_max: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> Concurrency:
        """Read a limit such as ``8``, ``auto`` or ``auto:4-64``.

        ``N`` is a fixed limit of N, ``auto`` adapts between 1 and
        ``auto_max``, and ``auto:MIN-MAX`` adapts between MIN and MAX.

        Args:
            text: The value as given. An integer is a fixed limit.
            name: What the value configures, such as ``--jobs``, for the
                error message.
            auto_max: The highest limit of a plain ``auto``.
            clock: The clock of the returned policy.

        Raises:
            ConfigurationError: The text has another form, or a limit is
                below 1 or a lowest limit above the highest.
        """
        _check_count("Concurrency.parse", "auto_max", auto_max)
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        match = _SPEC.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigurationError(
                f"invalid {name} {text!r}: use a number of job slots such as "
                f"'8', 'auto' to adapt between 1 and {auto_max}, or "
                "'auto:MIN-MAX' such as 'auto:4-64'"
            )
        if match["fixed"]:
            lowest = highest = whole_number(match["fixed"], name=name, text=text)
        elif match["min"]:
            lowest = whole_number(match["min"], name=name, text=text)
            highest = whole_number(match["max"], name=name, text=text)
        else:
            lowest, highest = 1, auto_max
        if lowest < 1:
            raise ConfigurationError(
                f"invalid {name} {text!r}: the limit must be at least 1"
            )
        if highest < lowest:
            raise ConfigurationError(
                f"invalid {name} {text!r}: the lowest limit {lowest} is above "
                f"the highest {highest}"
            )
        return cls(min=lowest, max=highest, clock=clock)

    def limiter(self) -> ConcurrencyLimiter:
        """Return a new limiter with this policy, nothing in flight."""
        return ConcurrencyLimiter(self)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Limit how many calls of ``function`` (sync or async) run at once.

        All calls share one limiter, and each call's latency and result
        feed it: a call that raises an `Exception` counts as failed and,
        for an adaptive limit, as a sign of overload.
        """
        return self.limiter().wrap(function)


@dataclass(frozen=True, slots=True)
class ConcurrencyStatistics:
    """A snapshot of a `ConcurrencyLimiter`.

    Attributes:
        limit: The current limit.
        in_flight: Attempts that hold a slot.
        waiting: Calls waiting for a slot in `ConcurrencyLimiter.acquire`
            or `ConcurrencyLimiter.acquire_blocking`.
        baseline_latency: The estimated latency without load, in seconds,
            or ``None`` for a fixed limit and before the first round.
        rounds: Rounds completed.
        increases: How often the limit went up.
        decreases: How often the limit went down.
    """

    limit: int
    in_flight: int
    waiting: int
    baseline_latency: float | None
    rounds: int
    increases: int
    decreases: int


class ConcurrencyLimiter:
    """The state of a `Concurrency`: the current limit and the slots taken.

    Every method is thread-safe. `try_acquire` and `release` never wait,
    for callers such as the engine that wait in their own loop. `acquire`,
    `acquire_blocking`, `slot`, `slot_blocking` and `wrap` wait here
    instead, and waiting coroutines get slots in the order they called.

    Attributes:
        policy: The `Concurrency` this limiter follows.
        history: ``(time, limit)`` when the limiter was made and at each
            change of the limit since, oldest first. Past `HISTORY_POINTS`
            points, every second point between the first and the latest
            is dropped, so the resolution halves but the span stays whole.
    """

    def __init__(self, policy: Concurrency) -> None:
        self.policy = policy
        start = policy.min if policy.initial is None else policy.initial
        self._limit = start
        self._controller = Controller(policy, start) if policy.is_adaptive else None
        self._in_flight = 0
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._threads_waiting = 0
        self._coroutines_waiting: collections.deque[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = collections.deque()
        self._increases = 0
        self._decreases = 0
        self.history: list[tuple[float, int]] = [(policy.clock(), start)]

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyLimiter limit={self._limit} "
            f"({self.policy.min}..{self.policy.max}) in_flight={self._in_flight} "
            f"waiting={self._threads_waiting + len(self._coroutines_waiting)}>"
        )

    @property
    def limit(self) -> int:
        """The current limit, between the policy's ``min`` and ``max``."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Attempts that hold a slot; above `limit` for a while after a cut."""
        return self._in_flight

    def statistics(self) -> ConcurrencyStatistics:
        """Return the current counts."""
        with self._lock:
            controller = self._controller
            return ConcurrencyStatistics(
                limit=self._limit,
                in_flight=self._in_flight,
                waiting=self._threads_waiting + len(self._coroutines_waiting),
                baseline_latency=None if controller is None else controller.baseline,
                rounds=0 if controller is None else controller.rounds,
                increases=self._increases,
                decreases=self._decreases,
            )

    def try_acquire(self) -> bool:
        """Take a slot if fewer attempts than the limit are in flight.

        Returns:
            Whether a slot was taken. Each taken slot needs one `release`.
        """
        with self._lock:
            return self._take_slot()

    def release(
        self,
        latency: float | None,
        *,
        failed: bool = False,
        overloaded: bool | None = None,
    ) -> None:
        """Free the slot of a finished attempt and feed its result to the limit.

        Args:
            latency: How long the attempt ran, in seconds of the policy's
                clock, which also dates each attempt's start from it.
                ``None`` frees the slot without a measurement, for a
                cancelled attempt.
            failed: Whether the attempt failed. Its latency then stays out
                of the latency estimate, because a failure can come much
                faster or slower than the work.
            overloaded: Whether the attempt signalled that the service is
                overloaded (a timeout, HTTP 429 or 503). ``None`` takes the
                value of ``failed``. Pass ``False`` for failures that are
                unrelated to load, such as invalid input.

        Raises:
            RuntimeError: No slot is taken.
            ValueError: ``latency`` is negative or not a finite number.
        """
        if latency is not None and not (math.isfinite(latency) and latency >= 0):
            raise ValueError(
                f"release latency={latency!r} must be a finite number of seconds "
                "of at least 0, or None"
            )
        with self._lock:
            if self._in_flight == 0:
                raise RuntimeError(
                    "release() called with no slot taken; call it once for "
                    "each slot that try_acquire() or acquire() took"
                )
            self._in_flight -= 1
            controller = self._controller
            if controller is not None:
                signal = failed if overloaded is None else overloaded
                controller.record(
                    latency, failed, signal, self._in_flight, self.policy.clock()
                )
                self._set_limit(controller.limit)
            self._hand_over_slots()

    async def acquire(self) -> None:
        """Wait on the event loop until a slot is free, then take it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take_slot():
                return
            granted = loop.create_future()
            self._coroutines_waiting.append((loop, granted))
        try:
            await granted
        except BaseException:
            self._forget_waiter(loop, granted)
            raise

    def acquire_blocking(self) -> None:
        """Block the calling thread until a slot is free, then take it."""
        with self._lock:
            self._threads_waiting += 1
            try:
                while not self._take_slot():
                    self._slot_freed.wait()
            except BaseException:
                # The wake-up this thread may have consumed goes to another.
                self._slot_freed.notify()
                raise
            finally:
                self._threads_waiting -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block and release it with the block's result.

        An `Exception` from the block counts as a failure. Cancellation
        frees the slot without a measurement.
        """
        await self.acquire()
        started = self.policy.clock()
        try:
            yield
        except Exception:
            self.release(self._since(started), failed=True)
            raise
        except BaseException:
            self.release(None)
            raise
        self.release(self._since(started))

    @contextlib.contextmanager
    def slot_blocking(self) -> Iterator[None]:
        """Hold a slot for the block, waiting on this thread; as `slot`."""
        self.acquire_blocking()
        started = self.policy.clock()
        try:
            yield
        except Exception:
            self.release(self._since(started), failed=True)
            raise
        except BaseException:
            self.release(None)
            raise
        self.release(self._since(started))

    def wrap(self, function: Callable[P, R]) -> Callable[P, R]:
        """Return ``function`` (sync or async) with each call in a slot."""
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def limited_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with self.slot():
                    return await function(*args, **kwargs)

            # mypy cannot tie the coroutine function back to Callable[P, R].
            return limited_async  # type: ignore[return-value]

        @functools.wraps(function)
        def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.slot_blocking():
                return function(*args, **kwargs)

        return limited

    def _since(self, started: float) -> float:
        # A clock set back by a test must not make release() raise and leak the slot.
        return max(0.0, self.policy.clock() - started)

    def _take_slot(self) -> bool:
        if self._in_flight >= self._limit:
            return False
        self._in_flight += 1
        if self._controller is not None:
            self._controller.note_start(self._in_flight)
        return True

    def _hand_over_slots(self) -> None:
        # Coroutines get a free slot directly, in order, so that a later
        # try_acquire() cannot take it first. Threads then race for the rest.
        while self._coroutines_waiting and self._take_slot():
            loop, granted = self._coroutines_waiting.popleft()
            loop.call_soon_threadsafe(self._grant, granted)
        free = self._limit - self._in_flight
        if self._threads_waiting and free > 0:
            self._slot_freed.notify(free)

    def _grant(self, granted: asyncio.Future[None]) -> None:
        # Runs on the waiter's loop. A waiter cancelled after its slot was
        # taken for it gives the slot back.
        if granted.cancelled():
            self.release(None)
        else:
            granted.set_result(None)

    def _forget_waiter(
        self, loop: asyncio.AbstractEventLoop, granted: asyncio.Future[None]
    ) -> None:
        with self._lock:
            try:
                self._coroutines_waiting.remove((loop, granted))
            except ValueError:
                pass  # Already handed a slot, which _grant or the lines below free.
        if granted.done() and not granted.cancelled():
            self.release(None)

    def _set_limit(self, limit: int) -> None:
        if limit == self._limit:
            return
        if limit > self._limit:
            self._increases += 1
        else:
            self._decreases += 1
        self._limit = limit
        self.history.append((self.policy.clock(), limit))
        if len(self.history) > HISTORY_POINTS:
            self.history[1:-1] = self.history[2:-1:2]


def _check_count(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{owner} {name}={value!r} must be an integer of at least 1"
        )


def _check_range(
    name: str, value: object, low: float, high: float, *, low_allowed: bool = False
) -> None:
    """Raise unless ``value`` is a number above ``low`` and below ``high``."""
    valid = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and (value >= low if low_allowed else value > low)
        and value < high
    )
    if not valid:
        lower = f"at least {low:g}" if low_allowed else f"above {low:g}"
        upper = "" if math.isinf(high) else f" and below {high:g}"
        raise ConfigurationError(
            f"Concurrency {name}={value!r} must be a number {lower}{upper}"
        )
