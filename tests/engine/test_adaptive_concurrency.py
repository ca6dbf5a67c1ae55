"""Adaptive concurrency inside a run: the limit grows, shrinks and bounds attempts.

How well the limit settles against an overloaded service is tested on a
simulated service in tests/policy/test_concurrency.py. These tests check
the engine's side: attempts wait for a slot of the current limit, every
slot comes back, and the limit over time reaches the report.
"""

from __future__ import annotations

import asyncio

import pytest

import batchtools
from batchtools import Concurrency, ConfigurationError
from batchtools.testing import ConcurrencyProbe, FakeClock, fast_retries


async def quick(item: int) -> int:
    await asyncio.sleep(0)
    return item


async def always_fails(item: int) -> int:
    await asyncio.sleep(0)
    raise ConnectionError(f"service refused item {item}")


def test_steady_latency_grows_the_limit_to_max() -> None:
    # The fake clock never moves, so every attempt takes no time: the
    # service never slows down and the limit doubles up to max.
    probe = ConcurrencyProbe()
    policy = Concurrency.adaptive(1, 16, clock=FakeClock())

    report = batchtools.run(range(2000), probe.wrap(quick), concurrency=policy)

    assert report.ok
    limits = [limit for _, limit in report.concurrency_limits]
    assert limits[0] == 1
    assert limits[-1] == 16
    assert limits == sorted(limits)
    assert probe.max_in_flight <= 16


def test_failures_keep_the_limit_at_min() -> None:
    probe = ConcurrencyProbe()
    policy = Concurrency.adaptive(2, 32, clock=FakeClock())

    report = batchtools.run(range(300), probe.wrap(always_fails), concurrency=policy)

    assert report.counts["failed"] == 300
    assert max(limit for _, limit in report.concurrency_limits) == 2
    assert probe.max_in_flight <= 2


def test_retries_wait_for_adaptive_slot() -> None:
    # Every attempt fails, so the limit stays at 1 and retries queue for it.
    probe = ConcurrencyProbe()
    policy = Concurrency(min=1, max=8, initial=1, clock=FakeClock())

    with fast_retries():
        report = batchtools.run(
            range(50), probe.wrap(always_fails), concurrency=policy, retry=2
        )

    assert report.counts["failed"] == 50
    assert probe.max_in_flight == 1
    assert probe.calls == 150


def test_auto_range_is_four_times_default() -> None:
    from batchtools.engine._api import prepare

    job = prepare(quick, concurrency="auto")
    limiter = job.settings.concurrency_limiter

    assert limiter is not None
    assert limiter.policy.min == 1
    assert limiter.policy.max == 400
    assert job.backend.concurrency == 400


def test_fixed_text_is_a_fixed_limit() -> None:
    from batchtools.engine._api import prepare

    job = prepare(quick, concurrency="12")

    assert job.settings.concurrency_limiter is None
    assert job.backend.concurrency == 12


def test_invalid_text_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="'sometimes'"):
        batchtools.run([1], quick, concurrency="sometimes")


def test_stop_cancels_slot_waiters() -> None:
    async def main() -> batchtools.Report:
        from batchtools.engine._api import build_engine, prepare

        started = asyncio.Event()

        async def hang(item: int) -> int:
            started.set()
            await asyncio.Event().wait()
            return item

        policy = Concurrency(min=1, max=4, initial=1, clock=FakeClock())
        job = prepare(hang, concurrency=policy, collect=True)
        engine = build_engine(range(3), job, None)
        running = asyncio.ensure_future(engine.run())
        await started.wait()
        engine.stop("received SIGINT", cancel=True)
        report = await running
        limiter = job.settings.concurrency_limiter
        assert limiter is not None
        assert limiter.in_flight == 0
        return report

    report = asyncio.run(main())

    assert report.counts["cancelled"] == 3


def test_thread_tasks_adapt_too() -> None:
    probe = ConcurrencyProbe()
    policy = Concurrency.adaptive(1, 6, clock=FakeClock())

    report = batchtools.run(
        range(500), probe.wrap(lambda item: item), backend="thread", concurrency=policy
    )

    assert report.ok
    assert probe.max_in_flight <= 6
    assert report.concurrency_limits[-1][1] == 6
