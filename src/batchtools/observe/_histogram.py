"""A log-bucketed histogram of durations with a bounded relative error.

Bucket ``i`` contains the values in ``(gamma ** (i - 1), gamma ** i]``,
with ``gamma = (1 + a) / (1 - a)`` for a relative error ``a``. A value is
reported as ``2 * gamma ** i / (gamma + 1)``, the point whose relative
distance to both ends of its bucket is ``a``, so every estimate is within
``a`` of the value it replaces. With ``a = 0.01`` the buckets grow by a
factor of about 1.0202.

Written here rather than taken from a package because it must be cheap
enough to update on the engine's loop for every attempt, pure Python, and
mergeable; buckets are kept in a dict, so the memory is bounded by the
number of buckets between ``min_value`` and ``max_value`` (about 2,100 at
the defaults) however many values are added.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from math import ceil as _ceil
from math import log as _log

from batchtools._exceptions import ConfigurationError


class LogHistogram:
    """Counts of non-negative values in logarithmic buckets.

    Quantiles come from the buckets and are within ``relative_error`` of
    the exact sample quantile (up to floating-point rounding) for values
    between ``min_value`` and ``max_value``. The count, sum, minimum and
    maximum are exact.

    Args:
        relative_error: The bound on the relative error of a quantile,
            above 0 and below 1.
        min_value: Values at or below this are counted in one bucket that
            reports the smallest value seen, so their error is at most
            ``min_value`` in absolute terms.
        max_value: Values above this are counted in the top bucket, where
            the error bound no longer holds.

    Raises:
        ConfigurationError: A value is out of range.
    """

    __slots__ = (
        "_buckets",
        "_gamma",
        "_inverse_log_gamma",
        "_low",
        "_max_index",
        "_zero_index",
        "count",
        "max",
        "min",
        "relative_error",
        "sum",
    )

    def __init__(
        self,
        relative_error: float = 0.01,
        *,
        min_value: float = 1e-9,
        max_value: float = 1e9,
    ) -> None:
        if isinstance(relative_error, bool) or not 0 < relative_error < 1:
            raise ConfigurationError(
                f"LogHistogram relative_error={relative_error!r} must be above 0 "
                "and below 1, such as 0.01"
            )
        if not 0 < min_value < max_value or not math.isfinite(max_value):
            raise ConfigurationError(
                f"LogHistogram min_value={min_value!r} and max_value={max_value!r} "
                "must be finite, with 0 < min_value < max_value"
            )
        self.relative_error = float(relative_error)
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._inverse_log_gamma = 1 / math.log(self._gamma)
        self._low = min_value
        # Values above min_value fall in buckets from _index(min_value) up,
        # so the bucket below it is free to count the values at or below it.
        self._zero_index = self._index(min_value) - 1
        self._max_index = self._index(max_value)
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def __repr__(self) -> str:
        return (
            f"<LogHistogram count={self.count} buckets={len(self._buckets)} "
            f"relative_error={self.relative_error}>"
        )

    def _index(self, value: float) -> int:
        return math.ceil(math.log(value) * self._inverse_log_gamma)

    def add(self, value: float) -> None:
        """Count ``value``; a negative value (a clock step) counts as 0."""
        # The engine's loop calls this for every attempt, so _index is inlined.
        if value > self._low:
            index = _ceil(_log(value) * self._inverse_log_gamma)
            if index > self._max_index:
                index = self._max_index
        else:
            if value < 0:
                value = 0.0
            index = self._zero_index
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def update(self, values: Iterable[float]) -> None:
        """Count every value of ``values``."""
        for value in values:
            self.add(value)

    def merge(self, other: LogHistogram) -> None:
        """Add the counts of ``other``, which must have the same buckets.

        Raises:
            ConfigurationError: ``other`` has another relative error or range.
        """
        if (other._gamma, other._low, other._max_index) != (
            self._gamma,
            self._low,
            self._max_index,
        ):
            raise ConfigurationError(
                f"cannot merge {other!r} into {self!r}: their relative errors or "
                "value ranges differ; make both with the same arguments"
            )
        buckets = self._buckets
        for index, count in other._buckets.items():
            buckets[index] = buckets.get(index, 0) + count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def copy(self) -> LogHistogram:
        """Return an independent copy."""
        twin = LogHistogram.__new__(LogHistogram)
        for name in LogHistogram.__slots__:
            setattr(twin, name, getattr(self, name))
        twin._buckets = dict(self._buckets)
        return twin

    @property
    def bucket_count(self) -> int:
        """How many buckets contain values."""
        return len(self._buckets)

    @property
    def max_buckets(self) -> int:
        """How many buckets there can be, which bounds the memory used."""
        return self._max_index - self._zero_index + 1

    def quantile(self, q: float) -> float | None:
        """Return the ``q`` quantile, or ``None`` when no value was added.

        The ``q`` quantile of ``n`` values is the value of rank
        ``max(1, ceil(q * n))`` in ascending order, as numpy's
        ``quantile(method="inverted_cdf")`` defines it. Ranks 1 and ``n``
        return the exact minimum and maximum.

        Raises:
            ValueError: ``q`` is not between 0 and 1.
        """
        return self.quantiles([q])[0]

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Return several quantiles with one pass over the buckets.

        Raises:
            ValueError: A ``q`` is not between 0 and 1.
        """
        requested = list(qs)
        for q in requested:
            if not 0 <= q <= 1:
                raise ValueError(f"quantile {q!r} must be between 0 and 1")
        if self.count == 0:
            return [None] * len(requested)
        ranks = sorted(
            (max(1, math.ceil(q * self.count)), position)
            for position, q in enumerate(requested)
        )
        found: list[float | None] = [None] * len(requested)
        seen = 0
        pending = iter(ranks)
        rank, position = next(pending)
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            while seen >= rank:
                if rank == 1:
                    found[position] = self.min
                elif rank == self.count:
                    found[position] = self.max
                else:
                    found[position] = self._estimate(index)
                following = next(pending, None)
                if following is None:
                    return found
                rank, position = following
        return found  # Not reached: the last rank is at most the count.

    def _estimate(self, index: int) -> float:
        if index == self._zero_index:
            value = self.min
        else:
            value = 2 * self._gamma**index / (self._gamma + 1)
        # The exact extremes bound every estimate, which helps the end buckets.
        return min(max(value, self.min), self.max)
