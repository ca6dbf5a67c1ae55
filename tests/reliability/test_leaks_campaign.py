"""Library runs that fail, stop or are cut short leave no resources behind.

Each scenario runs the library in this process: resumes of a journal,
halts, lost worker processes, streams closed while attempts run, command
trees killed by a timeout, and runs stopped by their deadline. Before the
first measurement every scenario runs once, because multiprocessing starts
its forkserver and resource tracker, with their pipes, once per process.
Then each scenario must leave this process with as many open file
descriptors, threads and child processes as it found. The subset runs every
scenario once; the whole campaign runs 100 drawn from the campaign seed.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import batchtools
from batchtools import Context, State
from tests.engine import tasks
from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord
from tests.reliability.leftovers import ResourceCheck, describe, marked_processes

RUNS = CAMPAIGN.size(0, 100)
"""Scenarios drawn at random in the whole campaign; 0 runs each once."""


def fail_every_third(item: int) -> int:
    """Return ``item``, or raise `ValueError` when it is a multiple of three."""
    if item % 3 == 0:
        raise ValueError(f"item {item} is a multiple of three")
    return item


async def double_async(item: int) -> int:
    """Return ``2 * item`` after giving way to the event loop."""
    await asyncio.sleep(0)
    return 2 * item


def wait_until_cancelled(item: int, context: Context) -> int:
    """Wait until the engine gives up on the attempt, at most 30 s; return ``item``."""
    assert context.cancelled is not None
    context.cancelled.wait(30)
    return item


def _journal_resumed(folder: Path) -> None:
    journal = folder / f"{uuid.uuid4().hex}.db"
    first = batchtools.run(
        range(300), fail_every_third, backend="thread", journal=journal, retry=1
    )
    again = batchtools.run(
        range(300), fail_every_third, backend="thread", journal=journal
    )
    assert first.counts["failed"] == 100
    assert again.from_journal == 200


def _thread_halt(folder: Path) -> None:
    report = batchtools.run(
        range(200), fail_every_third, backend="thread", concurrency=8, halt="now,fail=1"
    )
    assert report.halted is not None


def _process_lost_worker(folder: Path) -> None:
    report = batchtools.run(
        [(x, 3) for x in range(8)],
        tasks.kill_own_worker,
        backend="process",
        concurrency=2,
    )
    assert report.workers_lost > 0
    assert report.counts["failed"] == 1


def _process_stream_closed(folder: Path) -> None:
    # Item 0 returns at once; the others wait for a file that never appears,
    # so closing the stream must kill their workers.
    items = [(str(folder), x) for x in range(20)]
    with batchtools.stream(
        items, tasks.wait_for_file, backend="process", concurrency=2
    ) as stream:
        first = next(iter(stream))
    assert first.state is State.SUCCEEDED


def _async_stream_closed(folder: Path) -> None:
    journal = folder / f"{uuid.uuid4().hex}.db"
    with batchtools.stream(range(20_000), double_async, journal=journal) as stream:
        for number, _ in enumerate(stream, 1):
            if number == 100:
                break
    resumed = batchtools.run(range(20_000), double_async, journal=journal)
    assert resumed.counts["succeeded"] == 20_000


def _command_trees_timed_out(folder: Path) -> None:
    marker = f"batchtools-leak-{uuid.uuid4().hex}"
    command = ["sh", "-c", "sleep 30 & sleep 30 & wait", marker, "{}"]
    report = batchtools.run(
        [str(x) for x in range(4)], command, concurrency=4, timeout=0.5
    )
    assert report.counts["failed"] == 4
    left = marked_processes(marker)
    assert left == [], f"commands left after their timeout: {describe(left)}"


def _threads_past_deadline(folder: Path) -> None:
    journal = folder / f"{uuid.uuid4().hex}.db"
    stopped = batchtools.run(
        range(40),
        wait_until_cancelled,
        backend="thread",
        concurrency=4,
        deadline=0.3,
        journal=journal,
    )
    assert stopped.counts["succeeded"] < 40
    # The resume's threads must be cancelled too: a deadline again.
    again = batchtools.run(
        range(40),
        wait_until_cancelled,
        backend="thread",
        concurrency=4,
        deadline=0.3,
        journal=journal,
    )
    assert again.total > 0


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "journal-resumed": _journal_resumed,
    "thread-halt": _thread_halt,
    "process-lost-worker": _process_lost_worker,
    "process-stream-closed": _process_stream_closed,
    "async-stream-closed": _async_stream_closed,
    "command-trees-timed-out": _command_trees_timed_out,
    "threads-past-deadline": _threads_past_deadline,
}


def _order(campaign: Campaign) -> list[str]:
    names = list(SCENARIOS)
    if not RUNS:
        return names
    generator = campaign.random("leaks")
    return [generator.choice(names) for _ in range(RUNS)]


@pytest.mark.timeout(CAMPAIGN.size(120, 1800))
def test_library_scenarios_leave_nothing(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    for name, run in SCENARIOS.items():
        folder = tmp_path / f"warm-up-{name}"
        folder.mkdir()
        run(folder)
    leaking: dict[str, dict[str, int]] = {}
    threads_before = threading.active_count()
    for number, name in enumerate(_order(campaign), 1):
        folder = tmp_path / f"{number}-{name}"
        folder.mkdir()
        check = ResourceCheck.start()
        SCENARIOS[name](folder)
        scenario.tried += 1
        scenario.faults_injected += 1
        leaks = check.leaks()
        if any(leaks.values()):
            leaking[f"{number}-{name}"] = leaks
    scenario.notes["leaking"] = leaking

    assert leaking == {}
    assert threading.active_count() == threads_before
