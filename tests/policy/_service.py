"""A simulated service of fixed capacity, and a client that keeps it busy.

The simulation is discrete-event on a fake clock: nothing sleeps, and a run
depends only on its arguments and seed.

The service has a capacity C. A request that starts while n requests are
in flight, itself included, takes ``base_latency * max(1, n / C)``, fixed
when it starts. Beyond C, latency grows with load as a queue's wait does,
so throughput stays at C requests per ``base_latency``. A request that
starts while n is above 2C fails, and only after that same load-dependent
latency, as a server fails one that times out in its queue. So overload
costs as much time as useful work, and a client that keeps more than 2C
in flight gets almost nothing done. Every latency is multiplied by a
random factor in ``[1 - noise, 1 + noise]``, and a share
``outlier_share`` of requests also take ``outlier_factor`` times longer.

The client is a closed loop with unlimited items: it starts requests
whenever the limiter gives it a slot and releases each slot with the
request's latency and result.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from dataclasses import dataclass, field

from batchtools.policy.concurrency import Concurrency, ConcurrencyLimiter
from batchtools.testing import FakeClock


@dataclass(frozen=True, slots=True)
class SimulatedService:
    """The capacity and latency model that the module docstring describes."""

    capacity: int
    base_latency: float = 1.0
    noise: float = 0.1
    outlier_share: float = 0.01
    outlier_factor: float = 5.0

    def latency(self, in_flight: int, draws: random.Random) -> float:
        """Return the latency of a request that starts with ``in_flight`` running."""
        latency = self.base_latency * max(1.0, in_flight / self.capacity)
        latency *= draws.uniform(1 - self.noise, 1 + self.noise)
        if draws.random() < self.outlier_share:
            latency *= self.outlier_factor
        return latency

    def fails(self, in_flight: int) -> bool:
        """Return whether a request that starts with ``in_flight`` running fails."""
        return in_flight > 2 * self.capacity


@dataclass(slots=True)
class LoadResult:
    """What one closed-loop run did.

    Attributes:
        successes: Requests that succeeded before the end of the run.
        failures: Requests that failed before the end of the run.
        duration: The simulated length of the run, in seconds.
        limits: ``(time, limit)`` at the start and at every change of the
            limit, never thinned.
        limiter: The limiter, as it was at the end.
    """

    successes: int
    failures: int
    duration: float
    limits: list[tuple[float, int]]
    limiter: ConcurrencyLimiter = field(repr=False)

    def median_limit(self, start: float) -> int:
        """Return the median limit over time from ``start`` to the end of the run."""
        ends = [moment for moment, _ in self.limits[1:]] + [self.duration]
        spans: list[tuple[int, float]] = []
        for (begin, limit), end in zip(self.limits, ends, strict=True):
            length = min(end, self.duration) - max(begin, start)
            if length > 0:
                spans.append((limit, length))
        spans.sort()
        half = sum(length for _, length in spans) / 2
        covered = 0.0
        for limit, length in spans:
            covered += length
            if covered >= half:
                return limit
        raise ValueError(f"no time between {start} and {self.duration}")


def run_closed_loop(
    service: SimulatedService, policy: Concurrency, duration: float, *, seed: int = 0
) -> LoadResult:
    """Keep ``service`` as busy as ``policy`` allows for ``duration`` seconds.

    Requests still in flight at the end are counted neither as successes
    nor as failures.
    """
    clock = FakeClock()
    limiter = dataclasses.replace(policy, clock=clock).limiter()
    draws = random.Random(seed)
    order = itertools.count()
    # (finish time, tie-breaker, latency, failed), earliest first.
    pending: list[tuple[float, int, float, bool]] = []
    result = LoadResult(0, 0, duration, [(0.0, limiter.limit)], limiter)

    def start_requests() -> None:
        while limiter.try_acquire():
            running = len(pending) + 1
            latency = service.latency(running, draws)
            failed = service.fails(running)
            heapq.heappush(pending, (clock.now + latency, next(order), latency, failed))

    start_requests()
    while pending and pending[0][0] <= duration:
        clock.now, _, latency, failed = heapq.heappop(pending)
        limiter.release(latency, failed=failed)
        if failed:
            result.failures += 1
        else:
            result.successes += 1
        if limiter.limit != result.limits[-1][1]:
            result.limits.append((clock.now, limiter.limit))
        start_requests()
    return result
