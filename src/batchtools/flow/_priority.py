"""Priorities: their checks and the heap that orders queued items by them.

`heapq` orders entries by ``(-rank, ticket)``: the ticket keeps first in,
first out among equal ranks, so items are never compared. An item waiting
since ``put_time`` has the priority ``priority + aging * (now -
put_time)``. Every item ages at the same rate, so the order is that of
``priority - aging * put_time``, a rank that does not change while the
item waits, and the heap never needs reordering.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

from batchtools._exceptions import ConfigurationError

T = TypeVar("T")
Clock = Callable[[], float]


DEFAULT_PRIORITY = 0.0
PRIORITIZED_MAXSIZE = 10_000
"""Default maximum of items that `prioritized` keeps read ahead, so
priorities order items within a window of this many. Their heap entries
take about 1.2 MB (tracemalloc, CPython 3.11), plus the items themselves."""


def check_priority(
    value: object, *, name: str = "priority", where: str = "", text: bool = False
) -> float:
    """Check a priority and return it as a float; a larger number runs first.

    Infinities are allowed: ``math.inf`` runs before any finite priority.

    Args:
        value: An int or a float; with ``text``, also a number as text.
        name: What the error calls the value: a parameter or an option.
        where: Appended to the name in the error, such as
            ``" for item 3 of the input"``.
        text: Accept numbers written as text (``"2.5"``), as a command
            line or a template renders them.

    Raises:
        ConfigurationError: The value is not a number, or it is NaN, which
            has no order.
    """
    number: float | None = None
    if text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ConfigurationError(
                f"{name}={value!r}{where} is too large for a float; "
                "give a smaller number"
            ) from None
    if number is None:
        kinds = "an int, a float or a number as text" if text else "an int or a float"
        raise ConfigurationError(
            f"{name}={value!r}{where} is not a number; give {kinds}"
        )
    if math.isnan(number):
        raise ConfigurationError(
            f"{name}={value!r}{where} is NaN, which has no order; give a number"
        )
    return number


def _aging_rate(aging: float | None) -> float:
    if aging is None:
        return 0.0
    if (
        isinstance(aging, bool)
        or not isinstance(aging, numbers.Real)
        or not math.isfinite(aging)
        or aging < 0
    ):
        raise ConfigurationError(
            f"aging={aging!r} must be priority points per second of waiting: "
            "a finite number of at least 0, or None for no aging"
        )
    return float(aging)


def _size_limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{name}={value!r} must be a whole number of at least 1, "
            "or None for no limit"
        )
    return value


def _check_clock(clock: Clock) -> Clock:
    if not callable(clock):
        raise ConfigurationError(
            f"clock={clock!r} must be a callable that returns seconds, "
            "such as time.monotonic"
        )
    return clock


def _item_text(item: Any) -> str:
    return f"{item!r:.60}"


def _set_result(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class _Heap:
    """Items by rank, largest first; first in, first out among equal ranks."""

    def __init__(self, aging: float, clock: Clock) -> None:
        self._entries: list[tuple[float, int, Any]] = []
        self._tickets = itertools.count()
        self._aging = aging
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: Any, priority: float) -> None:
        rank = priority
        if self._aging:
            # The aged priority at any later time t is rank + aging * t, so
            # ordering by rank is ordering by aged priority.
            rank -= self._aging * self._clock()
        heapq.heappush(self._entries, (-rank, next(self._tickets), item))

    def pop(self) -> Any:
        return heapq.heappop(self._entries)[2]

    def pop_all(self) -> list[Any]:
        """Remove every item; return them in the order they would have run."""
        entries, self._entries = sorted(self._entries), []
        return [item for _, _, item in entries]
