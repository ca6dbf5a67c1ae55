"""A finished run leaves no file descriptors, threads or child processes behind.

Each test runs the backend once before it counts, because multiprocessing
starts its forkserver and resource tracker (with their pipes) once per
process. A leak then shows as growth over the runs that follow.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import batchtools
from tests.engine import tasks
from tests.engine.support import child_processes, threads_still_alive

RUNS = 3


@dataclass(frozen=True)
class Resources:
    """Counts of what a run could leak."""

    descriptors: int
    threads: int
    children: frozenset[int]


def open_descriptors() -> int:
    """Return how many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def measure(before_threads: set[threading.Thread]) -> Resources:
    """Count resources, after joining threads that are ending by themselves."""
    assert threads_still_alive(before_threads) == []
    return Resources(
        descriptors=open_descriptors(),
        threads=threading.active_count(),
        children=frozenset(child_processes()),
    )


async def double_async(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def double(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def fail_odd(x: int) -> int:
    """Return ``x``, or raise ValueError for odd ``x``."""
    if x % 2:
        raise ValueError(f"item {x} is odd")
    return x


def run_with_new_journal(directory: Path) -> batchtools.Report:
    """Run over a generator, read on a helper thread, with a new journal."""
    return batchtools.run(
        (x for x in range(200)),
        double,
        backend="thread",
        journal=directory / f"{uuid.uuid4().hex}.db",
    )


RUNS_BY_BACKEND: dict[str, Callable[[Path], Any]] = {
    "async": lambda _: batchtools.run(range(200), double_async, concurrency=8),
    "thread": lambda _: batchtools.run(
        range(200), double, backend="thread", concurrency=8
    ),
    "thread-failures": lambda _: batchtools.run(
        range(200), fail_odd, backend="thread", concurrency=8, retry=1
    ),
    "process": lambda _: batchtools.run(
        range(200), tasks.report_pid, backend="process", concurrency=2
    ),
    "process-lost-worker": lambda _: batchtools.run(
        [(x, 3) for x in range(8)],
        tasks.kill_own_worker,
        backend="process",
        concurrency=2,
    ),
    "subprocess": lambda _: batchtools.run(
        [str(x) for x in range(20)], ["true"], concurrency=4
    ),
    "subprocess-failures": lambda _: batchtools.run(
        [str(x) for x in range(20)], ["false"], concurrency=4
    ),
    "journal": lambda directory: run_with_new_journal(directory),
}


@pytest.mark.parametrize("kind", list(RUNS_BY_BACKEND))
def test_run_leaves_no_resources(kind: str, tmp_path: Path) -> None:
    start_run = RUNS_BY_BACKEND[kind]
    threads_before = set(threading.enumerate())
    warm_up = start_run(tmp_path)
    assert warm_up.total > 0
    before = measure(threads_before)

    for _ in range(RUNS):
        report = start_run(tmp_path)
        assert report.total > 0
    after = measure(threads_before)

    assert after.descriptors == before.descriptors
    assert after.threads == before.threads
    assert after.children == before.children
    assert after.children == frozenset()
