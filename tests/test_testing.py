"""The helpers of batchtools.testing and the pytest fixtures of its plugin."""

from __future__ import annotations

import asyncio
import time

import pytest

import batchtools
from batchtools import Backoff, CircuitBreaker, RateLimit, Retry
from batchtools.testing import ConcurrencyProbe, FakeClock, fast_retries, flaky


def test_flaky_fails_first_calls_per_item() -> None:
    task = flaky(lambda item: item * 2, fail_first=2, error=TimeoutError)

    report = batchtools.run(
        [1, 2, 3], task, retry=Retry(attempts=3, backoff=Backoff(0, 0))
    )

    assert report.counts["succeeded"] == 3
    assert [len(o.attempts) for o in report.outcomes] == [3, 3, 3]
    assert isinstance(report.outcomes[0].attempts[0].error, TimeoutError)


def test_flaky_share_is_repeatable() -> None:
    first = flaky(lambda item: item, share=0.5, seed=7)
    second = flaky(lambda item: item, share=0.5, seed=7)

    def outcomes(task: object) -> list[bool]:
        results = []
        for item in range(40):
            try:
                task(item)  # type: ignore[operator]
            except ConnectionError:
                results.append(False)
            else:
                results.append(True)
        return results

    assert outcomes(first) == outcomes(second)
    assert 5 < outcomes(first).count(False) < 35


def test_flaky_rejects_invalid_share() -> None:
    with pytest.raises(ValueError, match="share"):
        flaky(lambda item: item, share=2.0)


def test_fast_retries_removes_waits_and_caps_attempts() -> None:
    slow = Retry(attempts=5, backoff=Backoff(initial=30, maximum=30, jitter=False))
    task = flaky(lambda item: item, fail_first=10)

    started = time.monotonic()
    with fast_retries(max_attempts=2):
        report = batchtools.run([1], task, retry=slow)
    elapsed = time.monotonic() - started

    assert len(report.outcomes[0].attempts) == 2
    # Without the switch the one backoff alone would wait 30 s.
    assert elapsed < 25


def test_probe_sees_the_concurrency_bound() -> None:
    probe = ConcurrencyProbe()

    async def task(item: int) -> int:
        await asyncio.sleep(0.001)
        return item

    batchtools.run(range(50), probe.wrap(task), concurrency=5)

    assert probe.calls == 50
    assert probe.max_in_flight <= 5
    assert probe.in_flight == 0


def test_fake_clock_refuses_to_go_back() -> None:
    clock = FakeClock(10.0)
    clock.advance(5)

    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)
    assert clock() == 15.0


def test_plugin_fixtures_drive_policies(
    batchtools_fake_clock: FakeClock,
    batchtools_fast_retries: None,
    batchtools_probe: ConcurrencyProbe,
) -> None:
    limiter = RateLimit(1.0, clock=batchtools_fake_clock).limiter()
    breakers = CircuitBreaker(
        consecutive_failures=1, reset_timeout=10, clock=batchtools_fake_clock
    ).breakers()

    first = limiter.try_start()
    waiting = limiter.try_start()
    batchtools_fake_clock.advance(1.0)
    later = limiter.try_start()
    breakers.wait_time(None)
    breakers.record(None, ConnectionError())
    open_wait = breakers.wait_time(None)

    assert (first, later) == (0.0, 0.0)
    assert waiting == pytest.approx(1.0)
    assert open_wait == pytest.approx(10.0)
    assert batchtools_probe.max_in_flight == 0
