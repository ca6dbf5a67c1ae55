"""The keyed lock and shared state that every task context carries."""

from __future__ import annotations

import os

import pytest

import batchtools
from tests.engine import tasks


async def count_async(item: int, context: batchtools.Context) -> int:
    async with context.lock.hold_async("counter"):
        value = await context.shared.aget("counter", 0) + 1
        await context.shared.aset("counter", value)
    return int(value)


@pytest.mark.parametrize("backend", ["thread", "process", "async"])
def test_locked_increments_add_up(backend: str) -> None:
    task = count_async if backend == "async" else tasks.count_under_lock

    report = batchtools.run(range(100), task, backend=backend, concurrency=8)

    assert report.ok
    assert sorted(report.values()) == list(range(1, 101))


def test_atomic_update_needs_no_lock() -> None:
    def bump(item: int, context: batchtools.Context) -> int:
        return int(context.shared.update("hits", lambda value: value + 1, 0))

    report = batchtools.run(range(50), bump, backend="thread", concurrency=16)

    assert sorted(report.values()) == list(range(1, 51))


def test_run_removes_its_lock_and_state_files() -> None:
    folders: list[str] = []

    def where(item: int, context: batchtools.Context) -> None:
        folders.append(str(context.lock.directory))

    batchtools.run(range(3), where, backend="thread")

    assert folders
    assert not any(os.path.exists(folder) for folder in folders)
