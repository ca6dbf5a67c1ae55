"""Per-attempt timeouts on the async and thread backends."""

from __future__ import annotations

import asyncio
import threading

import batchtools
from batchtools import AttemptTimeoutError, Retry, State
from tests.engine.support import threads_still_alive

TIMEOUT = 0.2


def test_async_timeout_fails_attempt() -> None:
    cancelled: list[int] = []

    async def task(x: int) -> int:
        if x == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
        return x

    report = batchtools.run(range(3), task, timeout=TIMEOUT)

    assert report.counts["succeeded"] == 2
    (failed,) = report.failed()
    assert failed.item == 1
    assert isinstance(failed.error, AttemptTimeoutError)
    assert failed.error.timeout == TIMEOUT
    assert str(failed.error) == "timed out after 0.2 s"
    assert cancelled == [1]
    assert not report.interrupted


def test_async_timeout_retried() -> None:
    attempts: list[int] = []

    async def task(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            await asyncio.Event().wait()
        return x

    report = batchtools.run([5], task, timeout=TIMEOUT, retry=Retry(attempts=2))

    (outcome,) = report.outcomes
    assert outcome.state is State.SUCCEEDED
    assert attempts == [5, 5]
    assert isinstance(outcome.attempts[0].error, AttemptTimeoutError)


def test_thread_timeout_abandons_thread() -> None:
    before = set(threading.enumerate())
    release = threading.Event()
    finished: list[int] = []

    def task(x: int) -> int:
        if x == 1:
            release.wait(60)
            finished.append(x)
        return x

    # Without the release the thread waits 60 s, so a run that waited for
    # it would show in `finished_during_run`.
    report = batchtools.run(
        range(4), task, backend="thread", concurrency=2, timeout=TIMEOUT
    )
    finished_during_run = list(finished)
    release.set()

    assert finished_during_run == []
    assert report.counts["succeeded"] == 3
    (failed,) = report.failed()
    assert failed.item == 1
    assert isinstance(failed.error, AttemptTimeoutError)
    assert report.abandoned_threads == 1
    assert threads_still_alive(before) == []
    assert finished == [1]


def test_thread_timeout_sets_cancelled_flag() -> None:
    saw_flag = threading.Event()

    def task(x: int, context: batchtools.Context) -> int:
        assert context.cancelled is not None
        if context.cancelled.wait(60):
            saw_flag.set()
        return x

    report = batchtools.run([1], task, backend="thread", timeout=TIMEOUT)

    assert isinstance(report.outcomes[0].error, AttemptTimeoutError)
    assert saw_flag.wait(60)
