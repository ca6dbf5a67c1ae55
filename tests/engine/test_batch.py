"""Batches: the task gets lists of items, and outcomes stay per item."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import batchtools
from batchtools import State


class BatchRecorder:
    """A batch task that records the lists it receives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches: list[list[int]] = []

    def task(self, batch: list[int]) -> list[Any]:
        with self._lock:
            self.batches.append(list(batch))
        return [ValueError(f"item {x} is bad") if x == 4 else x * 3 for x in batch]


def test_batch_task_gets_lists() -> None:
    recorder = BatchRecorder()

    report = batchtools.run(
        range(10), recorder.task, backend="thread", concurrency=2, batch_size=3
    )

    assert all(isinstance(batch, list) for batch in recorder.batches)
    assert all(1 <= len(batch) <= 3 for batch in recorder.batches)
    assert sorted(x for batch in recorder.batches for x in batch) == list(range(10))
    assert len(recorder.batches) == 4
    assert len(report.outcomes) == 10
    assert [outcome.item for outcome in report.outcomes] == list(range(10))


def test_exception_element_fails_its_item() -> None:
    recorder = BatchRecorder()

    report = batchtools.run(
        range(10), recorder.task, backend="thread", concurrency=2, batch_size=3
    )

    assert report.counts["failed"] == 1
    assert report.counts["succeeded"] == 9
    for outcome in report.outcomes:
        if outcome.item == 4:
            assert outcome.state is State.FAILED
            assert isinstance(outcome.error, ValueError)
            assert str(outcome.error) == "item 4 is bad"
        else:
            assert outcome.state is State.SUCCEEDED
            assert outcome.value == outcome.item * 3
    # The neighbours of item 4 shared its batch and still succeeded.
    batch_of_four = next(batch for batch in recorder.batches if 4 in batch)
    assert len(batch_of_four) == 3


def test_raising_batch_fails_all_items() -> None:
    def task(batch: list[int]) -> list[int]:
        if 7 in batch:
            raise RuntimeError(f"batch {batch} failed")
        return batch

    report = batchtools.run(range(9), task, backend="thread", batch_size=3)

    failed = sorted(outcome.item for outcome in report.failed())
    assert failed == [6, 7, 8]
    assert report.counts["succeeded"] == 6


def test_wrong_result_length_fails_batch() -> None:
    def task(batch: list[int]) -> list[int]:
        return batch[:1]

    report = batchtools.run(range(4), task, backend="thread", batch_size=2)

    assert report.counts["failed"] == 4
    error = report.outcomes[0].error
    assert isinstance(error, TypeError)
    assert "must return None or a list of 2 values" in str(error)


@pytest.mark.parametrize("size", [0, -2, True])
def test_invalid_batch_size_is_rejected(size: int) -> None:
    with pytest.raises(
        batchtools.ConfigurationError, match=r"batch_size=.* must be a whole number"
    ):
        batchtools.run(range(3), BatchRecorder().task, batch_size=size)


async def double_batch(batch: list[int]) -> list[int]:
    """Return every item of the batch doubled."""
    return [x * 2 for x in batch]


def test_async_batch_outcomes_per_item() -> None:
    report = batchtools.run(range(7), double_batch, batch_size=3)

    assert [outcome.value for outcome in report.outcomes] == [x * 2 for x in range(7)]
    assert len({outcome.key for outcome in report.outcomes}) == 7


def test_command_batches_keep_outcomes_per_item() -> None:
    # One command runs per batch, and its result belongs to every item of it.
    report = batchtools.run(["a", "b", "c", "d", "e"], ["true"], batch_size=2)

    assert [outcome.item for outcome in report.outcomes] == ["a", "b", "c", "d", "e"]
    assert report.counts["succeeded"] == 5, list(report.failed())
