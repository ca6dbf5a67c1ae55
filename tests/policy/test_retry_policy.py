"""Retry policy decisions on their own, without running anything."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from batchtools import (
    CommandFailedError,
    ConfigurationError,
    Retry,
    WorkerLostError,
)
from batchtools.policy import NO_RETRY


@pytest.mark.parametrize(
    "error",
    [
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(1),
        GeneratorExit(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_cancellation_is_never_retryable(error: BaseException) -> None:
    policy = Retry(attempts=10, on=BaseException)

    assert not policy.is_retryable(error)
    assert not policy.allows(error, attempt=1, lost_workers=0)


def test_predicate_decides_retry() -> None:
    policy = Retry(attempts=3, on=lambda error: "again" in str(error))

    assert policy.allows(RuntimeError("try again"), attempt=1, lost_workers=0)
    assert not policy.allows(RuntimeError("give up"), attempt=1, lost_workers=0)


def test_attempts_count_includes_first() -> None:
    policy = Retry(attempts=3)
    error = ValueError("invalid")

    assert policy.allows(error, attempt=1, lost_workers=0)
    assert policy.allows(error, attempt=2, lost_workers=0)
    assert not policy.allows(error, attempt=3, lost_workers=0)


def test_lost_worker_budget_separate() -> None:
    error = WorkerLostError(-9)

    assert NO_RETRY.allows(error, attempt=1, lost_workers=1)
    assert not NO_RETRY.allows(error, attempt=1, lost_workers=2)
    assert not Retry(attempts=5, lost_workers=0).allows(error, 1, lost_workers=0)


def test_exit_codes_narrow_command_failures() -> None:
    policy = Retry(attempts=3, exit_codes=frozenset({75}))

    assert policy.allows(CommandFailedError(75), attempt=1, lost_workers=0)
    assert not policy.allows(CommandFailedError(1), attempt=1, lost_workers=0)


@pytest.mark.parametrize(("value", "attempts"), [(None, 1), (0, 1), (1, 2), (4, 5)])
def test_plain_number_counts_retries(value: int | None, attempts: int) -> None:
    assert Retry.coerce(value).attempts == attempts


def test_deadline_accepts_timedelta() -> None:
    assert Retry(attempts=None, deadline=120).deadline_seconds == 120.0
    assert Retry(attempts=None, deadline=timedelta(seconds=3)).deadline_seconds == 3.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Retry(attempts=0), r"attempts=0 must be an integer of at least 1"),
        (lambda: Retry(attempts=True), r"attempts=True must be an integer"),
        (lambda: Retry(on=42), r"on=42 must be exception types or a predicate"),  # type: ignore[arg-type]
        (lambda: Retry(lost_workers=-1), r"lost_workers=-1 must be 0 or more"),
        (lambda: Retry.coerce(-1), r"retry=-1 must be a number of retries"),
        (lambda: Retry.coerce(True), r"retry=True must be a number of retries"),
        (lambda: Retry.coerce(1.5), r"retry=1\.5 must be a number of retries"),  # type: ignore[arg-type]
    ],
)
def test_invalid_retry_rejected(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()
