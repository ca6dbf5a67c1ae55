"""Circuit breakers: stop calling what keeps failing, and probe before going back.

States and their changes, one table that a test walks::

    CLOSED --(failure rate over the window, or N failures in a row)--> OPEN
    OPEN --(reset timeout passed)--> HALF_OPEN
    HALF_OPEN --(every probe succeeded)--> CLOSED
    HALF_OPEN --(a probe failed)--> OPEN

Written here rather than taken from a package because the engine has to
ask "may this item start now, and if not, how long until it may" without
calling anything, so that items waiting for an open breaker hold no
concurrency slot. The logic is pure: time comes from an injectable clock.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import inspect
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import cachetools

from batchtools._exceptions import CircuitOpenError, ConfigurationError
from batchtools.policy._units import parse_duration, whole_number

P = ParamSpec("P")
R = TypeVar("R")


class BreakerState(enum.Enum):
    """The state of one circuit."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


BREAKER_TRANSITIONS: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}

_SPEC = re.compile(
    r"\s*(?:(?P<in_a_row>\d+)|(?P<percent>\d+(?:\.\d+)?)%/(?P<window>\d+))\s*"
)

# How often a call that waits for the probes of a half-open circuit checks
# again: a share of the reset timeout, within these bounds.
_PROBE_RECHECK_MIN = 0.05
_PROBE_RECHECK_MAX = 1.0
# The largest window: it keeps one entry per call, for every key.
MAX_WINDOW = 1_000_000
# Tolerance when comparing the failure share with the threshold.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a circuit's state.

    Attributes:
        key: The circuit's key (``None`` for an unkeyed breaker).
        old: The state before.
        new: The state after.
        at: The clock's time of the change.
        reason: Why it changed, as a sentence.
    """

    key: Any
    old: BreakerState
    new: BreakerState
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """When to open a circuit, how long to keep it open, and how to probe.

    Args:
        failure_rate: Open when at least this share (0 to 1) of the last
            ``window`` calls failed, once ``min_calls`` have been made.
        window: How many recent calls the rate looks at.
        min_calls: Calls needed in the window before the rate applies.
        consecutive_failures: Also open after this many failures in a row;
            ``None`` turns that rule off.
        reset_timeout: Seconds a circuit stays open before it lets probes
            through.
        probes: Calls let through while half-open; all must succeed to close.
        key: A function from item to the key of its own circuit (a URL's
            host, for example); ``None`` shares one circuit.
        fail_fast: Fail calls at once with `CircuitOpenError` while the
            circuit is open, instead of waiting for it.
        max_keys: How many keyed circuits are kept (least recently used
            forgotten first).
        on: Exception types that count as failures; others pass through
            without changing the circuit.
        clock: Returns the current time in seconds.

    Raises:
        ConfigurationError: A value is out of range.
    """

    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    consecutive_failures: int | None = None
    reset_timeout: float | str = 30.0
    probes: int = 1
    key: Callable[[Any], Any] | None = None
    fail_fast: bool = False
    max_keys: int = 10_000
    on: type[BaseException] | tuple[type[BaseException], ...] = Exception
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.reset_timeout, str):
            seconds = parse_duration(self.reset_timeout, name="reset_timeout")
            object.__setattr__(self, "reset_timeout", seconds)
        if not isinstance(self.on, type | tuple) or not _exception_types(self.on):
            raise ConfigurationError(
                f"CircuitBreaker on={self.on!r} must be an exception type or a "
                "tuple of them"
            )
        if isinstance(self.failure_rate, bool) or not (0 < self.failure_rate <= 1):
            raise ConfigurationError(
                f"CircuitBreaker failure_rate={self.failure_rate!r} must be above 0 "
                "and at most 1"
            )
        for name in ("window", "min_calls", "probes", "max_keys"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"CircuitBreaker {name}={value!r} must be an integer of at least 1"
                )
        if self.window > MAX_WINDOW:
            raise ConfigurationError(
                f"CircuitBreaker window={self.window} is too large: the window keeps "
                f"one entry per call, so give at most {MAX_WINDOW:,} calls"
            )
        if self.min_calls > self.window:
            raise ConfigurationError(
                f"CircuitBreaker min_calls={self.min_calls} must not exceed "
                f"window={self.window}"
            )
        consecutive = self.consecutive_failures
        if consecutive is not None and (
            isinstance(consecutive, bool)
            or not isinstance(consecutive, int)
            or consecutive < 1
        ):
            raise ConfigurationError(
                f"CircuitBreaker consecutive_failures={consecutive!r} must be at "
                "least 1, or None"
            )
        timeout = self.reset_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ConfigurationError(
                f"CircuitBreaker reset_timeout={timeout!r} must be a positive number "
                "of seconds"
            )

    @classmethod
    def parse(
        cls, text: str, *, reset_timeout: float | str = 30.0, fail_fast: bool = False
    ) -> CircuitBreaker:
        """Read a breaker such as ``5`` (5 failures in a row) or ``50%/20``.

        ``P%/W`` opens when P percent of the last W calls failed, once half of
        W calls were made.

        Raises:
            ConfigurationError: The text has another form.
        """
        timeout = parse_duration(reset_timeout, name="breaker reset timeout")
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ConfigurationError(
                f"invalid circuit breaker {text!r}: use N (N failures in a row) or "
                "P%/W (P percent of the last W calls), such as '5' or '50%/20'"
            )
        if match["in_a_row"]:
            # All of the last N calls failed is the same rule as N in a row.
            count = whole_number(match["in_a_row"], name="circuit breaker", text=text)
            in_a_row = max(count, 1)
            return cls(
                failure_rate=1.0,
                window=in_a_row,
                min_calls=in_a_row,
                consecutive_failures=count,
                reset_timeout=timeout,
                fail_fast=fail_fast,
            )
        window = whole_number(match["window"], name="circuit breaker", text=text)
        return cls(
            failure_rate=float(match["percent"]) / 100,
            window=window,
            min_calls=max(1, window // 2),
            reset_timeout=timeout,
            fail_fast=fail_fast,
        )

    def breakers(self) -> Breakers:
        """Return new circuits with this policy, all closed."""
        return Breakers(self)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Protect ``function`` (sync or async) with one circuit.

        While the circuit is open, a call fails at once with
        `CircuitOpenError` (a decorated function has nothing to wait for).
        A call through a closed or half-open circuit runs ``function``
        exactly once.
        """
        circuits = self.breakers()
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                key = circuits.key_of(args[0]) if args else None
                generation = circuits.enter(key)
                try:
                    value = await function(*args, **kwargs)
                except BaseException as error:
                    circuits.record(key, error, generation)
                    raise
                circuits.record(key, None, generation)
                return value

            return guarded_async  # type: ignore[return-value]

        @functools.wraps(function)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            key = circuits.key_of(args[0]) if args else None
            generation = circuits.enter(key)
            try:
                value = function(*args, **kwargs)
            except BaseException as error:
                circuits.record(key, error, generation)
                raise
            circuits.record(key, None, generation)
            return value

        return guarded


def _exception_types(value: object) -> bool:
    if isinstance(value, type):
        return issubclass(value, BaseException)
    return isinstance(value, tuple) and all(_exception_types(v) for v in value)


class Breaker:
    """One circuit: its state and the recent results that decide it."""

    def __init__(self, policy: CircuitBreaker, key: Any) -> None:
        self.policy = policy
        self.key = key
        self.state = BreakerState.CLOSED
        self._results: collections.deque[bool] = collections.deque(maxlen=policy.window)
        self._failures_in_window = 0
        self._in_a_row = 0
        self._opened_at = 0.0
        # Closed, with a full window of successes: another success changes
        # nothing, so it need not be recorded.
        self.healthy = False
        self._probes_started = 0
        self._probes_passed = 0
        # Changes with every transition, so that a call's result counts only
        # in the state it started in: a slow call that began before the
        # circuit opened cannot close it later.
        self.generation = 0

    def __repr__(self) -> str:
        failed = self._failures_in_window
        return (
            f"<Breaker {self.key!r} {self.state.value} "
            f"failed={failed}/{len(self._results)} in_a_row={self._in_a_row}>"
        )

    def wait_time(self, now: float) -> tuple[float, Transition | None]:
        """Decide whether a call may start at ``now``; a start is counted.

        Returns:
            The seconds to wait (0.0 when the call may start now), and the
            state change this caused, if any.
        """
        transition = None
        if self.state is BreakerState.OPEN:
            remaining = self._opened_at + float(self.policy.reset_timeout) - now
            if remaining > 0:
                return remaining, None
            transition = self._move(
                BreakerState.HALF_OPEN, now, "the reset timeout passed"
            )
        if self.state is BreakerState.HALF_OPEN:
            if self._probes_started >= self.policy.probes:
                recheck = min(
                    max(float(self.policy.reset_timeout) / 20, _PROBE_RECHECK_MIN),
                    _PROBE_RECHECK_MAX,
                )
                return recheck, transition
            self._probes_started += 1
        return 0.0, transition

    def release_probe(self) -> None:
        """Give back a probe whose call ended neither in success nor failure."""
        if self.state is BreakerState.HALF_OPEN and self._probes_started:
            self._probes_started -= 1

    def record(
        self, failed: bool, now: float, generation: int | None = None
    ) -> Transition | None:
        """Count the result of a call that `wait_time` let start.

        Args:
            failed: Whether the call failed.
            now: The clock's time.
            generation: The circuit's `generation` when the call started;
                a result from another generation is ignored.
        """
        if generation is not None and generation != self.generation:
            return None
        if self.state is BreakerState.HALF_OPEN:
            if failed:
                return self._open(now, "a probe failed")
            self._probes_passed += 1
            if self._probes_passed >= self.policy.probes:
                return self._move(BreakerState.CLOSED, now, "every probe succeeded")
            return None
        if self.state is BreakerState.OPEN:
            return None  # A call that started before the circuit opened.
        if len(self._results) == self._results.maxlen and self._results[0]:
            self._failures_in_window -= 1
        self._results.append(failed)
        self._failures_in_window += failed
        self._in_a_row = self._in_a_row + 1 if failed else 0
        transition = self._check_thresholds(now)
        self.healthy = (
            self.state is BreakerState.CLOSED
            and self._failures_in_window == 0
            and len(self._results) == self._results.maxlen
        )
        return transition

    def _check_thresholds(self, now: float) -> Transition | None:
        policy = self.policy
        if policy.consecutive_failures is not None and self._in_a_row >= (
            policy.consecutive_failures
        ):
            return self._open(now, f"{self._in_a_row} calls failed in a row")
        calls = len(self._results)
        if calls >= policy.min_calls and (
            self._failures_in_window >= policy.failure_rate * calls - _EPSILON
        ):
            reason = f"{self._failures_in_window} of the last {calls} calls failed"
            return self._open(now, reason)
        return None

    def _open(self, now: float, reason: str) -> Transition:
        self._opened_at = now
        return self._move(BreakerState.OPEN, now, reason)

    def _move(self, new: BreakerState, now: float, reason: str) -> Transition:
        old = self.state
        if new not in BREAKER_TRANSITIONS[old]:
            raise RuntimeError(f"circuit cannot go from {old.value} to {new.value}")
        self.state = new
        self.healthy = False
        self.generation += 1
        self._probes_started = 0
        self._probes_passed = 0
        if new is BreakerState.CLOSED:
            self._results.clear()
            self._failures_in_window = 0
            self._in_a_row = 0
        return Transition(self.key, old, new, now, reason)


class Breakers:
    """The circuits of one `CircuitBreaker` policy, one per key, in an LRU.

    Attributes:
        single: The one circuit of a policy without a key function.
        transitions: Every state change so far, oldest first.
    """

    def __init__(self, policy: CircuitBreaker) -> None:
        self.policy = policy
        self._circuits: cachetools.LRUCache[Any, Breaker] = cachetools.LRUCache(
            maxsize=policy.max_keys
        )
        self._lock = threading.Lock()
        # Without a key function there is one circuit, kept out of the LRU.
        self.single = Breaker(policy, None) if policy.key is None else None
        self.transitions: list[Transition] = []

    def __repr__(self) -> str:
        open_count = sum(
            1 for b in self._circuits.values() if b.state is not BreakerState.CLOSED
        )
        return f"<Breakers keys={len(self._circuits)} not_closed={open_count}>"

    def key_of(self, item: Any) -> Any:
        """Return the key of the circuit that guards ``item``."""
        function = self.policy.key
        return function(item) if function is not None else None

    def circuit(self, key: Any) -> Breaker:
        """Return the circuit of ``key``, making a closed one if needed."""
        if self.single is not None:
            return self.single
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Breaker(self.policy, key)
        return circuit

    def wait_time(self, key: Any) -> float:
        """Return 0.0 if a call under ``key`` may start now, else seconds to wait."""
        return self.admit(key)[0]

    def admit(self, key: Any) -> tuple[float, int]:
        """Decide whether a call under ``key`` may start now.

        Returns:
            The seconds to wait (0.0 when it may start) and the circuit's
            generation, to pass back to `record` with the call's result.
        """
        circuit = self.single
        if circuit is not None and circuit.state is BreakerState.CLOSED:
            # A closed circuit admits every call, and reading its state needs
            # no lock: a call admitted as it opens counts in the old generation.
            return 0.0, circuit.generation
        with self._lock:
            circuit = self.circuit(key)
            delay, transition = circuit.wait_time(self.policy.clock())
            self._note(transition)
            return delay, circuit.generation

    def enter(self, key: Any) -> int:
        """Let a call start now, or fail it because the circuit is open.

        Returns:
            The circuit's generation, to pass back to `record`.

        Raises:
            CircuitOpenError: The circuit is open or its probes are taken.
        """
        delay, generation = self.admit(key)
        if delay > 0:
            raise CircuitOpenError(key, delay)
        return generation

    def record(
        self, key: Any, error: BaseException | None, generation: int | None = None
    ) -> None:
        """Count a call's result; errors outside ``on`` do not count.

        Args:
            key: The circuit's key.
            error: The call's error, or ``None`` when it succeeded.
            generation: What `admit` or `enter` returned for the call; a
                result from an earlier state of the circuit is ignored.
        """
        single = self.single
        if (
            error is None
            and single is not None
            and single.healthy
            and generation in (None, single.generation)
        ):
            return
        if error is not None and not isinstance(error, self.policy.on):
            failed = None
        else:
            failed = error is not None
        with self._lock:
            circuit = self.circuit(key)
            if generation is not None and generation != circuit.generation:
                return
            if failed is None:
                circuit.release_probe()
                return
            self._note(circuit.record(failed, self.policy.clock()))

    async def wait(self, key: Any) -> None:
        """Wait on the event loop until a call under ``key`` may start."""
        while (delay := self.wait_time(key)) > 0:
            await asyncio.sleep(delay)

    def _note(self, transition: Transition | None) -> None:
        if transition is not None:
            self.transitions.append(transition)
