"""A run with failing items completes, and reports each failure as data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import batchtools
from tests.engine import tasks

ITEMS = 300


async def fail_every_third_async(x: int) -> int:
    """Return ``x + 1000``, or raise ValueError when ``x`` is a multiple of 3."""
    return tasks.fail_every_third(x)


BACKEND_TASKS: dict[str, Callable[..., Any]] = {
    "async": fail_every_third_async,
    "thread": tasks.fail_every_third,
    "process": tasks.fail_every_third,
}


@pytest.mark.parametrize("backend", sorted(BACKEND_TASKS))
def test_partial_failure_completes_run(backend: str) -> None:
    report = batchtools.run(
        range(ITEMS), BACKEND_TASKS[backend], backend=backend, concurrency=4
    )

    assert report.counts == {
        "succeeded": 200,
        "failed": 100,
        "skipped": 0,
        "cancelled": 0,
    }
    assert not report.interrupted
    outcomes = report.outcomes
    assert [outcome.item for outcome in outcomes] == list(range(ITEMS))
    for outcome in outcomes:
        x = outcome.item
        if x % 3 == 0:
            assert outcome.state is batchtools.State.FAILED, outcome
            assert isinstance(outcome.error, ValueError), outcome
            assert str(outcome.error) == f"item {x} is a multiple of 3"
            assert len(outcome.attempts) == 1
        else:
            assert outcome.state is batchtools.State.SUCCEEDED, outcome
            assert outcome.value == x + 1000
            assert outcome.error is None


@pytest.mark.parametrize("backend", sorted(BACKEND_TASKS))
def test_failed_outcomes_have_distinct_keys(backend: str) -> None:
    report = batchtools.run(
        range(ITEMS), BACKEND_TASKS[backend], backend=backend, concurrency=4
    )

    failed = list(report.failed())
    assert [outcome.item for outcome in failed] == list(range(0, ITEMS, 3))
    keys = {outcome.key for outcome in failed}
    assert len(keys) == 100
    assert all(len(key) == 32 for key in keys)
    groups = report.failures.most_common()
    assert len(groups) == 1
    assert groups[0].count == 100
    assert groups[0].cause == "ValueError: item N is a multiple of N"
