"""Failures that only a process backend has: stand-in errors and lost workers."""

from __future__ import annotations

import batchtools
from batchtools import RemoteError, Retry, State, WorkerLostError
from tests.engine import tasks
from tests.engine.support import child_processes


def test_unpicklable_exception_becomes_remote_error() -> None:
    report = batchtools.run(
        range(12), tasks.raise_code_and_reason, backend="process", concurrency=2
    )

    assert report.counts["succeeded"] == 11
    assert report.counts["failed"] == 1
    assert not report.interrupted
    (failed,) = report.failed()
    assert failed.item == 7
    error = failed.error
    assert isinstance(error, RemoteError)
    assert error.type_name == "tests.engine.tasks.CodeAndReasonError"
    assert error.message == "error 7: the quota is exhausted"
    assert "Traceback (most recent call last)" in error.traceback_text
    assert "raise_code_and_reason" in error.traceback_text
    assert "CodeAndReasonError" in error.traceback_text
    values = [outcome.value for outcome in report.outcomes if outcome.ok]
    assert values == [x for x in range(12) if x != 7]


def test_sigkill_fails_only_poison_item() -> None:
    poison = 5
    items = [(x, poison) for x in range(30)]

    report = batchtools.run(
        items, tasks.kill_own_worker, backend="process", concurrency=2
    )

    assert report.counts["succeeded"] == 29
    assert report.counts["failed"] == 1
    assert not report.interrupted
    (failed,) = report.failed()
    assert failed.item == (poison, poison)
    assert isinstance(failed.error, WorkerLostError)
    assert failed.error.exit_status == -9
    assert str(failed.error) == "worker process killed by SIGKILL"
    # The lost-worker budget is 2 by default: the item killed two workers.
    assert len(failed.attempts) == 2
    assert all(isinstance(a.error, WorkerLostError) for a in failed.attempts)
    assert report.workers_lost == 2
    values = sorted(outcome.value for outcome in report.outcomes if outcome.ok)
    assert values == [x for x in range(30) if x != poison]
    assert child_processes() == set()


def test_lost_worker_budget_from_policy() -> None:
    items = [(x, 1) for x in range(4)]

    report = batchtools.run(
        items,
        tasks.kill_own_worker,
        backend="process",
        concurrency=2,
        retry=Retry(attempts=1, lost_workers=0),
    )

    (failed,) = report.failed()
    assert failed.item == (1, 1)
    assert len(failed.attempts) == 1
    assert report.workers_lost == 1
    assert report.counts["succeeded"] == 3


def test_replacement_workers_finish_run() -> None:
    # Every item after the poison one must run somewhere, so the pool has to
    # replace the workers the poison item killed.
    items = [(x, 0) for x in range(10)]

    report = batchtools.run(
        items, tasks.kill_own_worker, backend="process", concurrency=1
    )

    assert report.counts["succeeded"] == 9
    first = report.outcomes[0]
    assert first.state is State.FAILED
    assert isinstance(first.error, WorkerLostError)
    assert report.workers_lost == 2
