"""The decisions of an adaptive concurrency limit, round by round.

The controller decides once per round. A round is at least
``round_samples`` finished attempts and at least as many as the limit,
about one turnover of the attempts in flight. While the standard error of
the round's median latency is above a quarter of ``latency_tolerance - 1``
times the median, the round goes on, up to eight times that size. At the
end of a round:

1. If more than ``failure_tolerance`` of the round's attempts signalled
   overload, the limit is multiplied by ``decrease_factor``.
2. Otherwise, if the round's median latency, less 2.5 standard errors, is
   more than ``latency_tolerance`` times the baseline, the limit is
   divided by the median's ratio to the baseline, but never multiplied by
   less than ``decrease_factor``. By Little's law, that is the limit at
   which the same throughput would see the baseline latency.
3. Otherwise, if the whole limit was in use at some moment of the round,
   the limit grows. It doubles each round at first (slow start). After
   the first cut, or once latency has risen halfway to the tolerance, it
   grows by its square root each round.

A single slow attempt barely moves a round's median, and so the limit.
The baseline is the lowest round median of the last ``baseline_rounds``
rounds, so a service that becomes slower for good sets a new baseline
after that many rounds. Measurement restarts when the limit changes and
again when the new limit is first filled: results of attempts that
started before the restart are left out, because they ran under another
load.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchtools.policy.concurrency import Concurrency

# Attempts that started within this many seconds after a restart of the
# measurement count as started before it.
_CLOCK_MARGIN = 1e-6

# How many times its basic size a round may grow while its latencies are
# too noisy for a precise median.
_ROUND_GROWTH_MAX = 8
# How many standard errors of its median a round's latency must clear the
# tolerance by before the limit is cut.
_CUT_CONFIDENCE = 2.5


class Controller:
    """Decisions of an adaptive limit, round by round.

    Not thread-safe: the limiter calls it under its lock.
    """

    def __init__(self, policy: Concurrency, start: int) -> None:
        self.policy = policy
        self.value = float(start)
        self.rounds = 0
        self.slow_start = True
        self.round_medians: collections.deque[float] = collections.deque(
            maxlen=policy.baseline_rounds
        )
        band = policy.latency_tolerance - 1
        # Slow start ends once latency is halfway to the tolerance.
        self.slow_start_exit = 1 + band / 2
        # The largest standard error of a round's median, as a share of the
        # median, that ends the round at its basic size.
        self.precision = band / 4
        # Results of attempts that started at or before `measured_since` are
        # skipped, up to `older_in_flight` of them. Measurement restarts at
        # each change of the limit and again when the limit is first filled
        # after it, since attempts started before then ran under another load.
        self.measured_since = -math.inf
        self.older_in_flight = 0
        self.awaiting_fill = True
        self._finished = 0
        self._overloads = 0
        self._latencies: list[float] = []
        self._peak = 0
        self._round_size = self._basic_round_size()

    @property
    def limit(self) -> int:
        """The limit as a whole number of slots."""
        return int(self.value)

    @property
    def baseline(self) -> float | None:
        """The estimated latency without load, or ``None`` before any round."""
        return min(self.round_medians) if self.round_medians else None

    def note_start(self, in_flight: int) -> None:
        """Note that an attempt started, leaving ``in_flight`` in flight."""
        self._peak = max(self._peak, in_flight)
        if self.awaiting_fill and in_flight >= self.limit:
            self.awaiting_fill = False
            self._restart_measurement(in_flight, self.policy.clock())

    def record(
        self,
        latency: float | None,
        failed: bool,
        overloaded: bool,
        in_flight: int,
        now: float,
    ) -> None:
        """Count one finished attempt, and decide the limit if a round ends."""
        if self.older_in_flight > 0 and self._is_older(latency, now):
            self.older_in_flight -= 1
            return
        if latency is None:
            return
        self._finished += 1
        if overloaded:
            self._overloads += 1
        if not failed:
            self._latencies.append(latency)
        if self._finished >= self._round_size:
            self._end_round_if_decided(in_flight, now)

    def _is_older(self, latency: float | None, now: float) -> bool:
        if latency is None:
            return True
        # An attempt that started in the same instant as the restart may
        # have been admitted before it, so it counts as older. The margin
        # covers the rounding of its latency.
        return now - latency <= self.measured_since + _CLOCK_MARGIN

    def _restart_measurement(self, in_flight: int, now: float) -> None:
        self.measured_since = now
        self.older_in_flight = in_flight
        self._begin_round(in_flight)

    def _basic_round_size(self) -> int:
        return max(self.policy.round_samples, self.limit)

    def _begin_round(self, in_flight: int) -> None:
        self._finished = 0
        self._overloads = 0
        self._latencies = []
        self._peak = in_flight
        self._round_size = self._basic_round_size()

    def _end_round_if_decided(self, in_flight: int, now: float) -> None:
        overloaded = self._overloads > self.policy.failure_tolerance * self._finished
        median, error = _median_and_error(self._latencies)
        noisy = median is not None and error > self.precision * median
        longest = self._basic_round_size() * _ROUND_GROWTH_MAX
        if noisy and not overloaded and self._finished < longest:
            self._round_size = math.ceil(self._finished * 1.25)
            return

        if median is not None:
            self.round_medians.append(median)
        self.rounds += 1
        old_limit = self.limit
        value = self._next_value(median, error, overloaded)
        self.value = max(float(self.policy.min), min(float(self.policy.max), value))
        if self.limit != old_limit:
            self.awaiting_fill = True
            self._restart_measurement(in_flight, now)
        else:
            self._begin_round(in_flight)

    def _next_value(
        self, median: float | None, error: float, overloaded: bool
    ) -> float:
        policy = self.policy
        if overloaded:
            self.slow_start = False
            return self.value * policy.decrease_factor
        baseline = self.baseline
        if median is None or baseline is None:
            return self.value

        ratio = _latency_ratio(median, baseline)
        # The baseline is the least of noisy medians, so it sits a little
        # low. Asking the median to clear the tolerance by a few standard
        # errors offsets that, so noise alone seldom cuts the limit.
        surely = _latency_ratio(median - _CUT_CONFIDENCE * error, baseline)
        if surely > policy.latency_tolerance:
            # Aim at the baseline rather than inside the tolerance: the next
            # rounds then run without a queue, which keeps the baseline from
            # creeping up with the very load it is meant to detect.
            self.slow_start = False
            return self.value * max(policy.decrease_factor, 1 / ratio)
        if self._peak < self.limit:
            # The caller did not fill the limit, so this latency cannot show
            # whether a higher limit would overload the service.
            return self.value
        if ratio > self.slow_start_exit:
            self.slow_start = False
        if self.slow_start:
            return self.value * 2
        return self.value + max(1.0, math.sqrt(self.value))


def _median_and_error(latencies: list[float]) -> tuple[float | None, float]:
    """Return the median of ``latencies`` and its approximate standard error."""
    if len(latencies) < 2:
        return (latencies[0] if latencies else None), 0.0
    first, median, third = statistics.quantiles(latencies, n=4)
    # For a normal distribution, sigma is the interquartile range over 1.349,
    # and the standard error of a sample median is 1.2533 sigma over the
    # square root of the sample size.
    return median, 0.929 * (third - first) / math.sqrt(len(latencies))


def _latency_ratio(latency: float, baseline: float) -> float:
    if latency <= baseline:
        return 1.0
    return latency / baseline if baseline > 0 else math.inf
