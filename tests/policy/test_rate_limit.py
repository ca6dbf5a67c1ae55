"""The rate limit: parsing, the window invariant, keys, and its use in a run."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchtools
from batchtools import ConfigurationError, RateLimit


class FakeClock:
    """A clock that moves only when the test sets it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(policy: RateLimit, clock: FakeClock, arrivals: list[float]) -> list[float]:
    """Return the start times of requests arriving at ``arrivals``.

    A request that is told to wait asks again after the delay it was given,
    as the engine does.
    """
    limiter = policy.limiter()
    pending = [(arrival, order) for order, arrival in enumerate(arrivals)]
    heapq.heapify(pending)
    starts = []
    while pending:
        when, order = heapq.heappop(pending)
        clock.now = when
        delay = limiter.try_start()
        if delay == 0.0:
            starts.append(when)
        else:
            heapq.heappush(pending, (when + delay, order))
    return starts


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("20/s", 20.0), ("100/m", 100 / 60), ("5/10s", 0.5), ("2/250ms", 8.0)],
)
def test_parse_reads_count_per_period(text: str, per_second: float) -> None:
    assert RateLimit.parse(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["20", "fast", "0/s", "5/0s", "-1/s", "3/y"])
def test_parse_rejects_other_forms(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate"):
        RateLimit.parse(text)


@pytest.mark.parametrize(
    "arguments",
    [{"per_second": 0}, {"per_second": -2}, {"per_second": 1, "burst": 0}],
)
def test_invalid_policy_is_rejected(arguments: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="RateLimit"):
        RateLimit(**arguments)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=1000),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=60),
    window=st.floats(min_value=0.001, max_value=20),
)
def test_starts_in_any_window_stay_under_limit(
    rate: float, burst: int, gaps: list[float], window: float
) -> None:
    clock = FakeClock()
    arrivals = []
    moment = 0.0
    for gap in gaps:
        moment += gap
        arrivals.append(moment)

    starts = simulate(RateLimit(rate, burst=burst, clock=clock), clock, arrivals)

    assert len(starts) == len(arrivals)
    for first, opened in enumerate(starts):
        inside = sum(1 for start in starts[first:] if start < opened + window)
        # A small allowance for floating-point rounding of the start times.
        assert inside <= rate * window + burst + 1e-6


def test_two_per_ten_seconds_timeline() -> None:
    arrivals = [0.00, 0.01, 0.02, 0.03, 0.04]

    clock = FakeClock()
    smooth = simulate(RateLimit.parse("2/10s", burst=1, clock=clock), clock, arrivals)
    clock = FakeClock()
    bursty = simulate(RateLimit.parse("2/10s", burst=2, clock=clock), clock, arrivals)

    assert smooth == pytest.approx([0.0, 5.0, 10.0, 15.0, 20.0])
    assert bursty == pytest.approx([0.0, 0.01, 5.0, 10.0, 15.0])


def test_keys_have_their_own_limits() -> None:
    clock = FakeClock()
    limiter = RateLimit(1.0, key=lambda item: item[0], clock=clock).limiter()

    first_a = limiter.try_start(limiter.key_of("a1"))
    first_b = limiter.try_start(limiter.key_of("b1"))
    second_a = limiter.try_start(limiter.key_of("a2"))

    assert first_a == 0.0
    assert first_b == 0.0
    assert second_a == pytest.approx(1.0)


def test_keyed_state_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimit(1.0, key=str, max_keys=100, clock=clock).limiter()

    for number in range(10_000):
        limiter.try_start(limiter.key_of(number))

    assert "keys=100" in repr(limiter)


def test_decorator_limits_async_function() -> None:
    clock = FakeClock()
    calls = []

    @RateLimit(1000.0, burst=3, clock=clock)
    async def call(value: int) -> int:
        calls.append(value)
        return value * 2

    async def three() -> list[int]:
        return [await call(n) for n in range(3)]

    assert asyncio.run(three()) == [0, 2, 4]
    assert calls == [0, 1, 2]


def test_run_waits_for_the_rate_limit() -> None:
    rate = 100.0
    count = 20

    async def task(item: int) -> int:
        return item

    started = time.monotonic()
    report = batchtools.run(
        range(count), task, concurrency=8, policies=[RateLimit(rate, burst=1)]
    )
    elapsed = time.monotonic() - started

    assert report.counts["succeeded"] == count
    assert report.rate_limited > 0
    # The limiter cannot allow 20 starts in less than 19 intervals.
    assert elapsed >= (count - 1) / rate * 0.99


def test_run_rejects_unknown_policy() -> None:
    with pytest.raises(ConfigurationError, match="supported policies"):
        batchtools.run([1], lambda item: item, policies=[object()])


def test_leaving_stream_ends_a_long_rate_wait() -> None:
    async def task(item: int) -> int:
        return item

    started = time.monotonic()
    with batchtools.stream(
        range(10), task, concurrency=4, policies=[RateLimit.parse("1/m")]
    ) as outcomes:
        first = next(iter(outcomes))
    elapsed = time.monotonic() - started

    assert first.ok
    # The next start would be a minute away; leaving must not wait for it.
    assert elapsed < 30


def test_thread_backend_counts_starts_when_they_happen() -> None:
    starts: list[float] = []

    def task(item: int) -> int:
        starts.append(time.monotonic())
        if item % 4 == 0:
            time.sleep(0.3)
        return item

    report = batchtools.run(
        range(9), task, concurrency=1, backend="thread", policies=[RateLimit(10.0)]
    )

    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert report.counts["succeeded"] == 9
    # The limit spaces starts 0.1 s apart; attempts queued ahead of the
    # thread would start back to back after each slow one. Half the spacing
    # leaves room for a late thread wakeup.
    assert min(gaps) >= 0.05
    assert report.rate_limited <= 9


def test_failing_key_function_fails_only_its_item() -> None:
    def key(item: int) -> int:
        if item == 2:
            raise LookupError("no host for item 2")
        return item

    async def task(item: int) -> int:
        return item

    report = batchtools.run([1, 2, 3], task, policies=[RateLimit(1000.0, key=key)])

    assert report.counts["succeeded"] == 2
    assert isinstance(report.outcomes[1].error, LookupError)


@pytest.mark.parametrize("text", ["20/.s", "٢٠/s", "1" + "0" * 400 + "/s", ""])
def test_parse_rejects_malformed_numbers(text: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid rate"):
        RateLimit.parse(text)
