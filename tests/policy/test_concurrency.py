"""Concurrency limits: parsing, the adaptive controller, and the waiting helpers.

The controller is checked against a simulated service on a fake clock (see
`tests.policy._service`), so no result depends on the speed of the machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import itertools
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtools import ConfigurationError
from batchtools.policy.concurrency import (
    HISTORY_POINTS,
    Concurrency,
    ConcurrencyLimiter,
)
from batchtools.testing import ConcurrencyProbe, FakeClock
from tests.policy._service import LoadResult, SimulatedService, run_closed_loop

# Simulated seconds of each closed-loop run: 400 base latencies.
DURATION = 400.0
CAPACITIES = [8, 20, 50]


@functools.cache
def adaptive_run(capacity: int) -> LoadResult:
    """Run an adaptive limit from 1, with room far above the capacity."""
    policy = Concurrency.adaptive(1, 1000)
    return run_closed_loop(SimulatedService(capacity), policy, DURATION)


def best_fixed_successes(capacity: int) -> int:
    """Return the highest success count of a fixed limit up to 3 times ``capacity``.

    Limits are tried in steps of a tenth of the capacity. Throughput is flat
    from the capacity to twice it, so some of the steps always land there.
    """
    service = SimulatedService(capacity)
    limits = range(1, 3 * capacity + 1, max(1, capacity // 10))
    return max(
        run_closed_loop(service, Concurrency.fixed(limit), DURATION).successes
        for limit in limits
    )


class Driver:
    """Keeps a limiter full of attempts on a fake clock and finishes them.

    Attributes:
        clock: The clock of the limiter.
        limiter: The limiter under test.
        limits: The limit after each finished attempt.
    """

    def __init__(self, policy: Concurrency, *, max_in_flight: int | None = None):
        self.clock = FakeClock()
        self.limiter = dataclasses.replace(policy, clock=self.clock).limiter()
        self.limits: list[int] = []
        self._max_in_flight = max_in_flight
        self._order = itertools.count()
        # (finish time, tie-breaker, latency, failed), earliest first.
        self._pending: list[tuple[float, int, float, bool]] = []

    def run(
        self,
        attempts: int,
        latency: float | Callable[[int], float] = 1.0,
        *,
        failed: bool = False,
    ) -> None:
        """Finish ``attempts`` attempts, starting new ones whenever allowed.

        Args:
            attempts: How many attempts to finish.
            latency: The latency of each attempt started here, or a
                function from the attempt's number (from 0) to it.
            failed: Whether the attempts started here fail.
        """
        started = itertools.count()
        for _ in range(attempts):
            while self._may_start() and self.limiter.try_acquire():
                number = next(started)
                took = latency(number) if callable(latency) else latency
                finish = self.clock.now + took
                heapq.heappush(self._pending, (finish, next(self._order), took, failed))
            self.clock.now, _, took, did_fail = heapq.heappop(self._pending)
            self.limiter.release(took, failed=did_fail)
            self.limits.append(self.limiter.limit)

    def _may_start(self) -> bool:
        cap = self._max_in_flight
        return cap is None or self.limiter.in_flight < cap


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it is true, and fail after 10 seconds."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in 10 s"
        time.sleep(0.001)


# Policies and parsing


def test_fixed_limit_is_not_adaptive() -> None:
    policy = Concurrency.fixed(8)

    assert (policy.min, policy.max) == (8, 8)
    assert not policy.is_adaptive
    assert policy.limiter().limit == 8


def test_adaptive_limit_starts_at_min_or_initial() -> None:
    assert Concurrency.adaptive(2, 10).limiter().limit == 2
    assert Concurrency.adaptive(2, 10, initial=6).limiter().limit == 6
    assert Concurrency.adaptive(2, 10).is_adaptive


@pytest.mark.parametrize(
    ("text", "bounds"),
    [
        ("8", (8, 8)),
        (12, (12, 12)),
        ("auto", (1, 32)),
        (" AUTO ", (1, 32)),
        ("auto:4-64", (4, 64)),
        ("auto:3-3", (3, 3)),
    ],
)
def test_parse_reads_fixed_and_auto(text: str | int, bounds: tuple[int, int]) -> None:
    policy = Concurrency.parse(text, name="--jobs", auto_max=32)

    assert (policy.min, policy.max) == bounds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zero", r"invalid --jobs 'zero': use a number of job slots"),
        ("", r"invalid --jobs ''"),
        ("8.5", r"invalid --jobs '8.5'"),
        ("-3", r"invalid --jobs '-3'"),
        ("auto:4", r"invalid --jobs 'auto:4'"),
        ("0", r"invalid --jobs '0': the limit must be at least 1"),
        ("auto:0-4", r"invalid --jobs 'auto:0-4': the limit must be at least 1"),
        ("auto:8-4", r"invalid --jobs 'auto:8-4': the lowest limit 8 is above"),
    ],
)
def test_parse_rejects_other_forms(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Concurrency.parse(text, name="--jobs")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Concurrency.adaptive(0, 5), r"min=0 must be an integer of at least 1"),
        (lambda: Concurrency.adaptive(5, 2), r"max=2 must be at least min=5"),
        (lambda: Concurrency.fixed(0), r"limit=0 must be an integer of at least 1"),
        (lambda: Concurrency.fixed(True), r"limit=True must be an integer"),
        (lambda: Concurrency.adaptive(2, 8, initial=9), r"initial=9 must lie between"),
        (lambda: Concurrency(1, 8, latency_tolerance=1.0), r"latency_tolerance=1.0"),
        (lambda: Concurrency(1, 8, decrease_factor=1.0), r"decrease_factor=1.0"),
        (lambda: Concurrency(1, 8, failure_tolerance=-0.1), r"failure_tolerance=-0.1"),
        (lambda: Concurrency(1, 8, round_samples=0), r"round_samples=0"),
        (lambda: Concurrency.parse("auto", auto_max=0), r"auto_max=0"),
    ],
)
def test_invalid_policy_is_rejected(
    make: Callable[[], Concurrency], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()


# The adaptive limit against the simulated service


def test_service_throughput_peaks_from_capacity() -> None:
    service = SimulatedService(8)

    def successes(limit: int) -> int:
        return run_closed_loop(service, Concurrency.fixed(limit), DURATION).successes

    at_capacity = successes(8)

    assert successes(4) < 0.6 * at_capacity
    assert successes(16) > 0.95 * at_capacity
    assert successes(24) < 0.1 * at_capacity


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_adaptive_limit_settles_near_capacity(capacity: int) -> None:
    result = adaptive_run(capacity)
    settled = result.median_limit(DURATION / 2)

    assert result.limits[0] == (0.0, 1)
    assert 0.7 * capacity <= settled <= 2 * capacity
    assert result.failures <= 0.01 * result.successes


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_adaptive_throughput_near_best_fixed(capacity: int) -> None:
    best = best_fixed_successes(capacity)

    assert adaptive_run(capacity).successes >= 0.9 * best


# The controller, step by step


def test_steady_latency_grows_limit_to_max() -> None:
    driver = Driver(Concurrency.adaptive(1, 40))

    driver.run(1000)
    limits = [limit for _, limit in driver.limiter.history]

    assert limits[:6] == [1, 2, 4, 8, 16, 32]
    assert limits[-1] == 40
    assert limits == sorted(limits)


def test_failures_cut_limit() -> None:
    driver = Driver(Concurrency.adaptive(1, 32))
    driver.run(500)

    driver.run(64, failed=True)
    after_a_few = driver.limiter.limit
    driver.run(500, failed=True)

    assert driver.limits[499] == 32
    assert after_a_few <= 16
    assert driver.limiter.limit == 1


def test_failures_that_are_not_overload_keep_limit() -> None:
    driver = Driver(Concurrency.adaptive(1, 32))
    driver.run(500)
    limiter = driver.limiter

    for _ in range(100):
        assert limiter.try_acquire() or limiter.in_flight == limiter.limit
        limiter.release(1.0, failed=True, overloaded=False)

    assert limiter.limit == 32


def test_rising_latency_cuts_limit() -> None:
    driver = Driver(Concurrency.adaptive(1, 32))
    driver.run(500)

    driver.run(100, latency=2.0)

    assert min(driver.limits[500:]) <= 16
    assert driver.limiter.statistics().baseline_latency == pytest.approx(1.0)


def test_single_slow_attempt_keeps_limit() -> None:
    driver = Driver(Concurrency.adaptive(1, 16))
    driver.run(300)

    # 600 attempts take about 37 simulated seconds at 16 in flight, so the
    # slow one finishes well inside the run.
    driver.run(600, latency=lambda number: 20.0 if number == 0 else 1.0)

    assert driver.limits[299] == 16
    assert driver.clock.now > 300 / 16 + 20
    assert min(driver.limits[300:]) == 16


def test_limit_holds_while_caller_keeps_fewer_in_flight() -> None:
    driver = Driver(Concurrency.adaptive(1, 64, initial=4), max_in_flight=3)

    driver.run(1000)

    assert driver.limiter.limit == 4
    assert driver.limiter.statistics().rounds > 50


def test_fixed_limit_never_moves() -> None:
    driver = Driver(Concurrency.fixed(4))

    driver.run(100, failed=True)
    driver.run(100, latency=30.0)

    assert set(driver.limits) == {4}
    assert len(driver.limiter.history) == 1
    assert driver.limiter.statistics().baseline_latency is None


def test_history_stays_bounded_and_keeps_ends() -> None:
    driver = Driver(Concurrency(1, 2, round_samples=1))

    for _ in range(1200):
        driver.run(4)
        driver.run(4, failed=True)
    stats = driver.limiter.statistics()
    history = driver.limiter.history

    assert stats.increases + stats.decreases > HISTORY_POINTS
    assert len(history) <= HISTORY_POINTS
    assert history[0] == (0.0, 1)
    assert history[-1][1] == driver.limiter.limit
    assert [moment for moment, _ in history] == sorted(m for m, _ in history)


def test_release_rejects_misuse() -> None:
    limiter = Concurrency.fixed(2).limiter()

    with pytest.raises(RuntimeError, match="no slot taken"):
        limiter.release(1.0)
    assert limiter.try_acquire()
    with pytest.raises(ValueError, match=r"latency=-1\.0"):
        limiter.release(-1.0)
    with pytest.raises(ValueError, match="latency=nan"):
        limiter.release(float("nan"))
    assert limiter.in_flight == 1


def test_statistics_and_repr_show_live_counts() -> None:
    limiter = Concurrency.adaptive(2, 9).limiter()
    limiter.try_acquire()

    stats = limiter.statistics()

    assert (stats.limit, stats.in_flight, stats.waiting) == (2, 1, 0)
    assert stats.baseline_latency is None
    assert repr(limiter) == "<ConcurrencyLimiter limit=2 (2..9) in_flight=1 waiting=0>"


# (latency, failed, overloaded) of a finished attempt, or None to fill the limit.
STEPS = st.lists(
    st.one_of(
        st.none(),
        st.tuples(
            st.floats(min_value=0, max_value=1000),
            st.booleans(),
            st.sampled_from([None, True, False]),
        ),
    ),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(
    lowest=st.integers(min_value=1, max_value=20),
    room=st.integers(min_value=0, max_value=40),
    round_samples=st.integers(min_value=1, max_value=6),
    decrease_factor=st.floats(min_value=0.05, max_value=0.95),
    steps=STEPS,
)
def test_limit_stays_within_bounds(
    lowest: int,
    room: int,
    round_samples: int,
    decrease_factor: float,
    steps: list[tuple[float, bool, bool | None] | None],
) -> None:
    clock = FakeClock()
    highest = lowest + room
    policy = Concurrency(
        lowest,
        highest,
        round_samples=round_samples,
        decrease_factor=decrease_factor,
        clock=clock,
    )
    limiter = policy.limiter()

    for step in steps:
        clock.advance(0.5)
        if step is None or limiter.in_flight == 0:
            while limiter.try_acquire():
                pass
            assert limiter.in_flight >= limiter.limit
        else:
            latency, failed, overloaded = step
            limiter.release(latency, failed=failed, overloaded=overloaded)
        assert lowest <= limiter.limit <= highest

    assert all(lowest <= limit <= highest for _, limit in limiter.history)


# Waiting for slots: threads, coroutines and the decorator


def test_decorator_bounds_threads() -> None:
    limit, callers = 3, 8
    limiter = Concurrency.fixed(limit).limiter()
    probe = ConcurrencyProbe()
    entered = threading.Semaphore(0)
    gate = threading.Event()
    results: list[int] = []

    def body(number: int) -> int:
        entered.release()
        gate.wait(timeout=10)
        return number * 2

    task = limiter.wrap(probe.wrap(body))
    threads = [
        threading.Thread(target=lambda n=n: results.append(task(n)))
        for n in range(callers)
    ]
    for thread in threads:
        thread.start()
    for _ in range(limit):
        assert entered.acquire(timeout=10)
    wait_for(lambda: limiter.statistics().waiting == callers - limit)
    inside_while_others_wait = probe.in_flight
    gate.set()
    for thread in threads:
        thread.join(timeout=10)

    assert inside_while_others_wait == limit
    assert probe.max_in_flight == limit
    assert sorted(results) == [n * 2 for n in range(callers)]
    assert limiter.in_flight == 0


def test_decorator_wraps_sync_function() -> None:
    @Concurrency.fixed(2)
    def double(number: int) -> int:
        """Return twice the number."""
        return number * 2

    assert double(21) == 42
    assert double.__name__ == "double"
    assert double.__doc__ == "Return twice the number."


def test_decorator_bounds_coroutines() -> None:
    probe = ConcurrencyProbe()

    async def main() -> list[int]:
        gate = asyncio.Event()
        full = asyncio.Event()

        async def body(number: int) -> int:
            if probe.in_flight == 2:
                full.set()
            await gate.wait()
            return number * 2

        task = Concurrency.fixed(2)(probe.wrap(body))
        tasks = [asyncio.create_task(task(n)) for n in range(6)]
        # Every task has run up to its first wait once the event is seen.
        await full.wait()
        assert probe.in_flight == 2
        gate.set()
        return [await each for each in tasks]

    results = asyncio.run(main())

    assert probe.max_in_flight == 2
    assert probe.calls == 6
    assert results == [n * 2 for n in range(6)]


def test_decorated_failures_cut_adaptive_limit() -> None:
    limiter = Concurrency(1, 8, initial=8).limiter()

    @limiter.wrap
    def broken() -> None:
        raise OSError("service unavailable")

    for _ in range(8):
        with pytest.raises(OSError):
            broken()

    assert limiter.limit == 4
    assert limiter.in_flight == 0


def test_slot_blocking_releases_on_error() -> None:
    limiter = Concurrency.fixed(1).limiter()

    with pytest.raises(KeyError), limiter.slot_blocking():
        raise KeyError("missing")

    assert limiter.in_flight == 0
    assert limiter.try_acquire()


def test_cancelled_waiter_gives_back_granted_slot() -> None:
    async def main(let_grant_run: bool) -> ConcurrencyLimiter:
        limiter = Concurrency.fixed(1).limiter()
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        assert limiter.statistics().waiting == 1

        limiter.release(0.1)
        if let_grant_run:
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        return limiter

    for let_grant_run in (False, True):
        limiter = asyncio.run(main(let_grant_run))

        assert limiter.in_flight == 0
        assert limiter.statistics().waiting == 0


def test_coroutines_get_slots_in_order() -> None:
    async def main() -> list[int]:
        limiter = Concurrency.fixed(1).limiter()
        order: list[int] = []

        async def task(number: int) -> None:
            async with limiter.slot():
                order.append(number)
                await asyncio.sleep(0)

        await asyncio.gather(*(task(n) for n in range(5)))
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
