"""Retries through `run`: how many attempts each kind of failure gets."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

import pytest

import batchtools
from batchtools import Backoff, ConfigurationError, Retry, State

NO_WAIT = Backoff(initial=0, maximum=0)


class CallCounter:
    """Counts calls per item from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: collections.Counter[int] = collections.Counter()

    def count(self, x: int) -> int:
        """Count a call for ``x``; return how many calls ``x`` has had."""
        with self._lock:
            self.calls[x] += 1
            return self.calls[x]


def fails_twice(counter: CallCounter) -> Callable[[int], int]:
    """Make a task that raises on the first two calls per item, then succeeds."""

    def task(x: int) -> int:
        if counter.count(x) <= 2:
            raise ConnectionError(f"attempt on item {x} failed")
        return x * 10

    return task


@pytest.mark.parametrize(
    "retry",
    [2, Retry(attempts=3, backoff=NO_WAIT)],
    ids=["retry=2", "Retry(attempts=3)"],
)
def test_third_attempt_succeeds(retry: int | Retry) -> None:
    counter = CallCounter()
    # A plain number uses the default backoff, whose first bounds are 0.1 s
    # and 0.2 s. The items wait them out in parallel.
    report = batchtools.run(
        range(5), fails_twice(counter), backend="thread", retry=retry
    )

    assert report.counts["succeeded"] == 5, list(report.failed())
    assert counter.calls == {x: 3 for x in range(5)}
    for outcome in report.outcomes:
        assert outcome.value == outcome.item * 10
        assert [attempt.number for attempt in outcome.attempts] == [1, 2, 3]
        errors = [attempt.error for attempt in outcome.attempts]
        assert all(isinstance(error, ConnectionError) for error in errors[:2])
        assert errors[2] is None


def test_failed_outcome_keeps_attempt_errors() -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        number = counter.count(x)
        raise RuntimeError(f"item {x} attempt {number}")

    report = batchtools.run(
        [7], task, backend="thread", retry=Retry(attempts=4, backoff=NO_WAIT)
    )

    (outcome,) = report.outcomes
    assert outcome.state is State.FAILED
    assert counter.calls[7] == 4
    messages = [str(attempt.error) for attempt in outcome.attempts]
    assert messages == [f"item 7 attempt {n}" for n in range(1, 5)]
    assert str(outcome.error) == "item 7 attempt 4"


def test_unlisted_error_not_retried() -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        counter.count(x)
        raise TypeError(f"item {x} has the wrong type")

    report = batchtools.run(
        range(3),
        task,
        backend="thread",
        retry=Retry(attempts=5, on=ValueError, backoff=NO_WAIT),
    )

    assert report.counts["failed"] == 3
    assert counter.calls == {0: 1, 1: 1, 2: 1}
    for outcome in report.outcomes:
        assert isinstance(outcome.error, TypeError)
        assert len(outcome.attempts) == 1


def test_listed_error_retried() -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        counter.count(x)
        raise ValueError(f"item {x} is invalid")

    report = batchtools.run(
        [1],
        task,
        backend="thread",
        retry=Retry(attempts=3, on=ValueError, backoff=NO_WAIT),
    )

    assert report.counts["failed"] == 1
    assert counter.calls[1] == 3


@pytest.mark.parametrize("error_type", [KeyboardInterrupt, SystemExit])
def test_thread_interrupt_never_retried(
    error_type: type[BaseException],
) -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        if counter.count(x) == 1 and x == 2:
            raise error_type()
        return x

    report = batchtools.run(
        range(4),
        task,
        backend="thread",
        retry=Retry(attempts=5, on=BaseException, backoff=NO_WAIT),
    )

    assert counter.calls[2] == 1
    failed = {outcome.item: outcome for outcome in report.failed()}
    assert list(failed) == [2]
    assert isinstance(failed[2].error, error_type)
    assert len(failed[2].attempts) == 1
    assert report.counts["succeeded"] == 3


def test_async_cancelled_error_never_retried() -> None:
    counter = CallCounter()

    async def task(x: int) -> int:
        if counter.count(x) == 1 and x == 1:
            # A cancellation the task did not get from the engine, such as
            # one from a library it awaits.
            raise asyncio.CancelledError()
        return x

    report = batchtools.run(range(3), task, retry=5)

    assert counter.calls[1] == 1
    failed = list(report.failed())
    assert [outcome.item for outcome in failed] == [1]
    assert isinstance(failed[0].error, asyncio.CancelledError)
    assert len(failed[0].attempts) == 1
    assert report.counts["succeeded"] == 2
    assert not report.interrupted


def test_succeeding_task_runs_exactly_once() -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        counter.count(x)
        return x

    report = batchtools.run(
        range(50), task, backend="thread", retry=Retry(attempts=5, backoff=NO_WAIT)
    )

    assert report.counts["succeeded"] == 50
    assert counter.calls == {x: 1 for x in range(50)}
    assert all(len(outcome.attempts) == 1 for outcome in report.outcomes)


def test_no_retry_by_default() -> None:
    counter = CallCounter()

    def task(x: int) -> int:
        counter.count(x)
        raise OSError("the disk is full")

    report = batchtools.run(range(3), task, backend="thread")

    assert report.counts["failed"] == 3
    assert counter.calls == {0: 1, 1: 1, 2: 1}


def test_zero_attempts_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"attempts=0 must be an integer"):
        Retry(attempts=0)


def test_negative_retry_rejected() -> None:
    def task(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=r"retry=-1 must be a number"):
        batchtools.run([1], task, backend="thread", retry=-1)


def test_unlimited_attempts_need_a_deadline() -> None:
    with pytest.raises(ConfigurationError, match=r"needs a deadline"):
        Retry(attempts=None)
