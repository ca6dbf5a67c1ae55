"""Rate limits: at most N attempt starts per period, with a burst size.

The limiter is the generic cell rate algorithm, written here rather than
taken from a package because the engine needs its two halves apart: ask
whether a start is allowed now, and if not, for how long to wait, without
taking a token that a waiting item would then hold. A start consumes a
token only when it happens. It keeps one number per key, the theoretical
arrival time of the next start, so that in any window of length T at most
``rate * T + burst`` starts happen.

Keyed limits (one per host, say) keep their state in an LRU cache, so a
million distinct keys cannot exhaust memory; a key evicted and seen again
starts with a full burst.
"""

from __future__ import annotations

import asyncio
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

from batchtools._exceptions import ConfigurationError

P = ParamSpec("P")
R = TypeVar("R")

_RATE = re.compile(
    r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)?\s*(ms|s|m|h|d)\s*",
    re.ASCII,
)
_PERIODS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``per_second`` attempt starts a second, with bursts up to ``burst``.

    Args:
        per_second: The sustained rate, starts per second.
        burst: How many starts may happen at once after a quiet spell.
        key: A function from item to the key of its own limit (a URL's
            host, for example); ``None`` shares one limit among all items.
        max_keys: How many keyed limits are kept; the least recently used
            is forgotten beyond that.
        clock: Returns the current time in seconds; `time.monotonic` by
            default, a fake clock in tests.

    Raises:
        ConfigurationError: A value is out of range.
    """

    per_second: float
    burst: int = 1
    key: Callable[[Any], Any] | None = None
    max_keys: int = 10_000
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        rate = self.per_second
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ConfigurationError(f"RateLimit per_second={rate!r} must be a number")
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigurationError(
                f"RateLimit per_second={rate!r} must be greater than zero"
            )
        if isinstance(self.burst, bool) or not isinstance(self.burst, int):
            raise ConfigurationError(
                f"RateLimit burst={self.burst!r} must be an integer"
            )
        if self.burst < 1:
            raise ConfigurationError(
                f"RateLimit burst={self.burst!r} must be at least 1"
            )
        if self.max_keys < 1:
            raise ConfigurationError(
                f"RateLimit max_keys={self.max_keys!r} must be at least 1"
            )

    @classmethod
    def parse(
        cls, text: str, *, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> RateLimit:
        """Read a rate such as ``20/s``, ``100/m``, ``5/10s`` or ``1000/h``.

        Raises:
            ConfigurationError: The text has another form.
        """
        match = _RATE.fullmatch(text)
        if match is None:
            raise ConfigurationError(
                f"invalid rate {text!r}: use a count per period, such as '20/s', "
                "'100/m' or '5/10s'"
            )
        count = float(match[1])
        period = float(match[2] or 1) * _PERIODS[match[3]]
        if count <= 0 or period <= 0:
            raise ConfigurationError(
                f"invalid rate {text!r}: the count and the period must be above zero"
            )
        if not math.isfinite(count / period):
            raise ConfigurationError(f"invalid rate {text!r}: the number is too large")
        return cls(count / period, burst=burst, clock=clock)

    def limiter(self) -> RateLimiter:
        """Return a new limiter with this policy and no history."""
        return RateLimiter(self)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Limit how often ``function`` (sync or async) starts.

        With a ``key`` function, the key is taken from the first argument.
        """
        limiter = self.limiter()
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def limited_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                await limiter.acquire(limiter.key_of(args[0]) if args else None)
                return await function(*args, **kwargs)

            return limited_async  # type: ignore[return-value]

        @functools.wraps(function)
        def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            limiter.acquire_blocking(limiter.key_of(args[0]) if args else None)
            return function(*args, **kwargs)

        return limited


class RateLimiter:
    """The state of a `RateLimit`: when the next start is due, per key."""

    def __init__(self, policy: RateLimit) -> None:
        self.policy = policy
        self._interval = 1.0 / policy.per_second
        self._tolerance = (policy.burst - 1) * self._interval
        self._due: cachetools.LRUCache[Any, float] = cachetools.LRUCache(
            maxsize=policy.max_keys
        )
        self._lock = threading.Lock()
        self.starts = 0
        self.waits = 0

    def __repr__(self) -> str:
        return (
            f"<RateLimiter {self.policy.per_second:g}/s burst={self.policy.burst} "
            f"starts={self.starts} waits={self.waits} keys={len(self._due)}>"
        )

    def key_of(self, item: Any) -> Any:
        """Return the key whose limit applies to ``item``."""
        function = self.policy.key
        return function(item) if function is not None else None

    def try_start(self, key: Any = None) -> float:
        """Start now if the limit allows it; else return how long to wait.

        Returns:
            0.0 when the start happened (a token was taken), otherwise the
            seconds until a start could be allowed; nothing is taken then.
        """
        now = self.policy.clock()
        with self._lock:
            due = max(self._due.get(key, now), now)
            allowed_at = due - self._tolerance
            if allowed_at > now:
                self.waits += 1
                return allowed_at - now
            self._due[key] = due + self._interval
            self.starts += 1
            return 0.0

    async def acquire(self, key: Any = None) -> None:
        """Wait on the event loop until a start is allowed, then take it."""
        while (delay := self.try_start(key)) > 0:
            await asyncio.sleep(delay)

    def acquire_blocking(self, key: Any = None) -> None:
        """Block the calling thread until a start is allowed, then take it."""
        while (delay := self.try_start(key)) > 0:
            time.sleep(delay)
