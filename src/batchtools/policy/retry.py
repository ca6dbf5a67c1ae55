"""Retry policy and backoff: which failures are retried, how often, how long apart.

A plain number of retries means "retry every failure except cancellation".
`Retry` narrows that by exception type, predicate or exit code, and counts
``attempts`` including the first one. Cancellation, `KeyboardInterrupt` and
`SystemExit` are never retried, whatever the policy allows.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from batchtools._exceptions import (
    CommandFailedError,
    ConfigurationError,
    WorkerLostError,
)
from batchtools.policy._units import parse_duration

_NEVER_RETRIED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)

ErrorFilter = (
    type[BaseException]
    | tuple[type[BaseException], ...]
    | Callable[[BaseException], bool]
)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    Retry number ``n`` (1 for the first retry) waits a random time between 0
    and ``min(maximum, initial * multiplier ** (n - 1))`` seconds. Jitter
    stays on at the cap, so retries that reach it still spread out. With
    ``jitter=False`` the wait is the upper bound itself.

    Attributes:
        initial: The first retry's upper bound, in seconds.
        maximum: The cap on any wait, in seconds.
        multiplier: The growth factor per retry.
        jitter: Whether to draw the wait at random below the bound.
    """

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        for name in ("initial", "maximum"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ConfigurationError(f"Backoff {name}={value!r} must be a number")
            if value < 0:
                raise ConfigurationError(
                    f"Backoff {name}={value!r} must not be negative"
                )
        if self.initial > self.maximum:
            raise ConfigurationError(
                f"Backoff initial={self.initial!r} must not exceed "
                f"maximum={self.maximum!r}"
            )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ConfigurationError(
                f"Backoff multiplier={self.multiplier!r} must be at least 1"
            )

    def bound(self, retry_number: int) -> float:
        """Return the upper bound of the wait before retry ``retry_number``."""
        if self.initial == 0:
            return 0.0
        exponent = max(retry_number - 1, 0)
        # Compare in the log domain so that a large exponent cannot overflow.
        # Logs are subtracted because `maximum / initial` overflows for a tiny
        # initial.
        log_bound = math.log(self.initial) + exponent * math.log(self.multiplier)
        if log_bound >= math.log(self.maximum):
            return self.maximum
        try:
            grown = self.initial * self.multiplier**exponent
        except OverflowError:
            # Only a tiny initial gets here: the power overflows, the product not.
            grown = math.exp(log_bound)
        # Rounding may put the product a little above the cap.
        return float(min(self.maximum, grown))

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Draw the wait in seconds before retry ``retry_number`` (from 1)."""
        if TEST_MODE.no_waits:
            return 0.0
        bound = self.bound(retry_number)
        if not self.jitter:
            return bound
        return (rng or random).uniform(0.0, bound)


def _exception_types(value: object) -> bool:
    if isinstance(value, type):
        return issubclass(value, BaseException)
    return isinstance(value, tuple) and all(_exception_types(t) for t in value)


@dataclass(frozen=True, slots=True)
class Retry:
    """Which failed attempts are tried again, and when.

    Args:
        attempts: Attempts per item, counting the first; ``None`` means no
            limit and then requires ``deadline``.
        on: Exception types, or a predicate over the error, that are
            retried. Command failures, timeouts and lost workers are
            matched against it like any other error.
        exit_codes: For command tasks, the exit statuses that are retried;
            ``None`` retries every non-zero status.
        backoff: The wait between attempts.
        deadline: Seconds (or a `timedelta`, or text such as ``"10m"``) after an
            item's first attempt
            started, after which no further attempt of it starts.
        lost_workers: How many worker deaths one item may cause before it
            fails as a poison item. This budget is separate from
            ``attempts``.

    Raises:
        ConfigurationError: A value is out of range.
    """

    attempts: int | None = 3
    on: ErrorFilter = Exception
    exit_codes: frozenset[int] | None = None
    backoff: Backoff = field(default_factory=Backoff)
    deadline: float | str | timedelta | None = None
    lost_workers: int = 2

    def __post_init__(self) -> None:
        if self.attempts is not None and (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise ConfigurationError(
                f"Retry attempts={self.attempts!r} must be an integer of at least 1 "
                "(it counts the first attempt); use None for no limit"
            )
        if self.deadline is not None:
            seconds = parse_duration(self.deadline, name="Retry deadline")
            object.__setattr__(self, "deadline", seconds)
        if self.attempts is None and self.deadline is None:
            raise ConfigurationError(
                "Retry attempts=None retries without limit, so it needs a deadline"
            )
        if not (_exception_types(self.on) or callable(self.on)):
            raise ConfigurationError(
                f"Retry on={self.on!r} must be exception types or a predicate"
            )
        if self.exit_codes is not None:
            object.__setattr__(self, "exit_codes", frozenset(self.exit_codes))
        if isinstance(self.lost_workers, bool) or self.lost_workers < 0:
            raise ConfigurationError(
                f"Retry lost_workers={self.lost_workers!r} must be 0 or more"
            )

    @classmethod
    def coerce(cls, value: Retry | int | None) -> Retry:
        """Turn the ``retry=`` argument of `run` into a policy.

        Args:
            value: ``None`` or 0 for no retries, a number of retries after
                the first attempt, or a `Retry`.

        Raises:
            ConfigurationError: The value is negative or of the wrong type.
        """
        if isinstance(value, Retry):
            return value
        if value is None:
            return NO_RETRY
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(
                f"retry={value!r} must be a number of retries (0 or more) or a Retry"
            )
        return cls(attempts=value + 1)

    @property
    def deadline_seconds(self) -> float | None:
        """The per-item deadline in seconds, if any."""
        return self.deadline if isinstance(self.deadline, float) else None

    def is_retryable(self, error: BaseException) -> bool:
        """Return whether ``error`` may be retried, ignoring the attempt count."""
        if isinstance(error, _NEVER_RETRIED):
            return False
        if isinstance(error, WorkerLostError):
            return True
        if (
            isinstance(error, CommandFailedError)
            and self.exit_codes is not None
            and error.exit_status not in self.exit_codes
        ):
            return False
        if isinstance(self.on, type | tuple):
            return isinstance(error, self.on)
        return bool(self.on(error))

    def allows(self, error: BaseException, attempt: int, lost_workers: int) -> bool:
        """Return whether another attempt may follow failed attempt ``attempt``.

        Args:
            error: The error of the failed attempt.
            attempt: The number of the attempt that failed, from 1.
            lost_workers: How many workers this item has lost so far.
        """
        if not self.is_retryable(error):
            return False
        if isinstance(error, WorkerLostError):
            return lost_workers < self.lost_workers
        cap = TEST_MODE.max_attempts
        if cap is not None and attempt >= cap:
            return False
        return self.attempts is None or attempt < self.attempts


NO_RETRY = Retry(attempts=1)


@dataclass(slots=True)
class _TestMode:
    """Process-wide switches set by `batchtools.testing.fast_retries`.

    Attributes:
        no_waits: Backoff waits are zero.
        max_attempts: A cap on attempts per item, over any policy's count.
    """

    no_waits: bool = False
    max_attempts: int | None = None


TEST_MODE = _TestMode()
