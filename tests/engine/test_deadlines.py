"""Run and item deadlines: what stops, what fails, and what a resume runs."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

import batchtools
from batchtools import AttemptTimeoutError, ConfigurationError, Retry


def test_run_deadline_cancels_and_resume_finishes(tmp_path: Path) -> None:
    journal = tmp_path / "deadline.db"
    release = {"open": False}

    async def wait_for_release(item: int) -> int:
        while not release["open"]:
            await asyncio.sleep(0.01)
        return item

    first = batchtools.run(
        range(10), wait_for_release, concurrency=4, journal=journal, deadline=0.2
    )
    release["open"] = True
    second = batchtools.run(range(10), wait_for_release, concurrency=4, journal=journal)

    assert first.halted is not None
    assert "deadline" in first.halted
    assert first.counts["cancelled"] == 4
    assert first.counts["succeeded"] == 0
    assert second.counts["succeeded"] == 10
    assert second.carried == 0


def test_item_deadline_bounds_unlimited_retries() -> None:
    calls = itertools.count()

    def always_fails(item: int) -> None:
        next(calls)
        raise ConnectionError("down")

    policy = Retry(attempts=None, deadline=0.3, backoff=batchtools.Backoff(0.01, 0.02))
    report = batchtools.run([1], always_fails, retry=policy)

    outcome = report.outcomes[0]
    assert outcome.state is batchtools.State.FAILED
    assert len(outcome.attempts) > 1
    assert isinstance(outcome.error, ConnectionError)


def test_item_deadline_stops_a_running_attempt() -> None:
    async def never_returns(item: int) -> None:
        await asyncio.Event().wait()

    report = batchtools.run([1], never_returns, retry=Retry(attempts=3, deadline=0.2))

    outcome = report.outcomes[0]
    assert isinstance(outcome.error, AttemptTimeoutError)
    assert len(outcome.attempts) == 1


def test_unlimited_retries_need_a_deadline() -> None:
    with pytest.raises(ConfigurationError, match="needs a deadline"):
        Retry(attempts=None)


def test_invalid_run_deadline_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="deadline"):
        batchtools.run([1], lambda item: item, deadline="soon")
