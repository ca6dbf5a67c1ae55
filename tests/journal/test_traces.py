"""Traces in the journal: slot, worker and timing of attempts, and schema upgrades.

Runs are real, on real backends; the journal of the previous schema is
built with that schema's own statements, then opened, resumed and read.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import batchtools
from batchtools import Backoff, Retry
from batchtools.journal import JournalReader
from batchtools.journal._schema import SCHEMA_VERSION
from batchtools.observe.report import read_report
from tests.backends import dask_tasks
from tests.cli.call_tasks import worker_pid
from tests.cli.support import wait_until
from tests.engine.tasks import fail_every_third

NO_WAIT = Backoff(initial=0, maximum=0)

# The statements of schema version 1, as journals were created before
# attempts recorded their job slot and worker.
VERSION_1_SCHEMA = (
    "PRAGMA application_id=1651794792",
    "PRAGMA user_version=1",
    """CREATE TABLE run (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        run_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        spec TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        state TEXT NOT NULL,
        session INTEGER NOT NULL DEFAULT 0,
        input_complete INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        digest TEXT NOT NULL,
        dhash INTEGER NOT NULL,
        item TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lost_workers INTEGER NOT NULL DEFAULT 0,
        value TEXT,
        error TEXT,
        reason TEXT,
        started REAL,
        ended REAL,
        claimed INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX items_dhash ON items (dhash)",
    """CREATE TABLE attempts (
        seq INTEGER NOT NULL,
        number INTEGER NOT NULL,
        started REAL NOT NULL,
        duration REAL NOT NULL,
        error TEXT NOT NULL,
        PRIMARY KEY (seq, number)
    ) WITHOUT ROWID""",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        session INTEGER NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    )""",
)
VERSION_1_ITEM_COLUMNS = (
    "seq, key, digest, dhash, item, state, attempts, lost_workers, value, error, "
    "reason, started, ended, claimed"
)


def _rows(journal: Path, statement: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return connection.execute(statement).fetchall()
    finally:
        connection.close()


class FlakyTask:
    """A thread task: item 2 fails once, item 5 always fails; it notes what ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[int, int] = {}

    def __call__(self, item: int) -> int:
        with self._lock:
            self.calls[item] = self.calls.get(item, 0) + 1
            count = self.calls[item]
        if item == 2 and count == 1:
            raise ValueError("item 2 fails once")
        if item == 5:
            raise KeyError("item 5 always fails")
        return item * 10


def test_thread_attempts_record_slot_and_timing(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    report = batchtools.run(
        range(20),
        FlakyTask(),
        backend="thread",
        concurrency=3,
        journal=journal,
        retry=Retry(attempts=3, backoff=NO_WAIT),
    )

    assert report.counts["failed"] == 1
    items = _rows(journal, "SELECT seq, ended, duration, slot, worker FROM items")
    assert len(items) == 20
    for seq, ended, duration, slot, worker in items:
        assert slot in (1, 2, 3), f"item {seq} has slot {slot!r}"
        assert worker is None
        assert ended is not None
        assert duration is not None and 0 <= duration < 60
    failed = _rows(journal, "SELECT seq, number, slot FROM attempts ORDER BY seq")
    assert [(seq, number) for seq, number, _ in failed] == [
        (2, 1),
        (5, 1),
        (5, 2),
        (5, 3),
    ]
    assert all(slot in (1, 2, 3) for _, _, slot in failed)


def test_process_attempts_record_worker_pid(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    report = batchtools.run(
        [str(n) for n in range(8)],
        worker_pid,
        backend="process",
        concurrency=2,
        journal=journal,
    )
    assert report.ok

    rows = _rows(journal, "SELECT value, slot, worker FROM items")

    assert len(rows) == 8
    for value, slot, worker in rows:
        assert worker == f"pid {json.loads(value)}"
        assert slot in (1, 2)


def test_process_failures_record_worker_pid(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run(
        range(6), fail_every_third, backend="process", concurrency=2, journal=journal
    )

    rows = _rows(journal, "SELECT seq, slot, worker FROM attempts ORDER BY seq")

    assert [seq for seq, _, _ in rows] == [0, 3]
    for _, slot, worker in rows:
        assert slot in (1, 2)
        assert worker is not None and worker.startswith("pid ")
        assert int(worker.removeprefix("pid ")) != os.getpid()


def test_command_failure_keeps_exit_status_and_stderr(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    script = "import sys; print('disk is full', file=sys.stderr); sys.exit(4)"
    batchtools.run(
        ["x"],
        [sys.executable, "-c", script, "{}"],
        journal=journal,
        concurrency=1,
    )

    with JournalReader(journal) as reader:
        item = next(reader.iter_items())
        history = reader.history(item)

    assert len(history) == 1
    attempt = history[0]
    assert attempt.outcome == "failed"
    assert attempt.slot == 1
    assert attempt.worker is not None and attempt.worker.startswith("pid ")
    record = json.loads(attempt.error or "")
    assert record["exit_status"] == 4
    assert "disk is full" in record["stderr_tail"]


def test_history_lists_failed_then_successful_attempt(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run(
        range(4),
        FlakyTask(),
        backend="thread",
        concurrency=2,
        journal=journal,
        retry=Retry(attempts=2, backoff=NO_WAIT),
    )

    with JournalReader(journal) as reader:
        item = next(row for row in reader.iter_items() if row.item == 2)
        history = reader.history(item)

    assert [a.number for a in history] == [1, 2]
    assert [a.outcome for a in history] == ["retried", "succeeded"]
    assert json.loads(history[0].error or "")["message"] == "item 2 fails once"
    assert history[1].error is None
    assert history[0].started <= history[1].started


def _version_1_copy(source: Path, target: Path, pending_from: int) -> None:
    """Write ``target`` with the version 1 schema and the rows of ``source``.

    Items from seq ``pending_from`` on are stored as pending, without
    attempts, so that a resume runs them.
    """
    old = sqlite3.connect(target)
    old.execute("PRAGMA journal_mode=WAL")
    for statement in VERSION_1_SCHEMA:
        old.execute(statement)
    new = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    (run,) = new.execute(
        "SELECT id, run_id, signature, spec, created, updated, state, session, "
        "input_complete FROM run"
    ).fetchall()
    old.execute("INSERT INTO run VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", run)
    for row in new.execute(f"SELECT {VERSION_1_ITEM_COLUMNS} FROM items"):
        values = list(row)
        if values[0] >= pending_from:
            # state, attempts, value, error, started, ended
            values[5], values[6], values[8], values[9] = "pending", 0, None, None
            values[11], values[12] = None, None
        marks = ", ".join("?" * len(values))
        old.execute(
            f"INSERT INTO items ({VERSION_1_ITEM_COLUMNS}) VALUES ({marks})", values
        )
    for row in new.execute(
        "SELECT seq, number, started, duration, error FROM attempts WHERE seq < ?",
        (pending_from,),
    ):
        old.execute("INSERT INTO attempts VALUES (?, ?, ?, ?, ?)", row)
    old.commit()
    old.close()
    new.close()


def test_version_1_journal_reads_before_upgrade(tmp_path: Path) -> None:
    current = tmp_path / "current.db"
    batchtools.run(
        range(8), FlakyTask(), backend="thread", concurrency=2, journal=current
    )
    journal = tmp_path / "old.db"
    _version_1_copy(current, journal, pending_from=8)

    with JournalReader(journal) as reader:
        version = reader.version
        slowest = reader.slowest(3)
        timeline = reader.timeline(100)
    report = read_report(journal)

    assert version == 1
    assert report.counts["succeeded"] == 6
    assert report.counts["failed"] == 2
    assert [group.count for group in report.failures.most_common()] == [1, 1]
    assert all(item.slot is None for item in slowest)
    assert timeline.failed_total == 2
    assert all(attempt.slot is None for attempt in timeline.attempts)


def test_version_1_journal_upgrades_on_resume(tmp_path: Path) -> None:
    current = tmp_path / "current.db"
    batchtools.run(
        range(10), FlakyTask(), backend="thread", concurrency=2, journal=current
    )
    journal = tmp_path / "old.db"
    _version_1_copy(current, journal, pending_from=6)
    task = FlakyTask()

    report = batchtools.run(
        range(10), task, backend="thread", concurrency=2, journal=journal
    )

    assert sorted(task.calls) == [6, 7, 8, 9]
    assert report.counts["succeeded"] == 8
    assert report.counts["failed"] == 2
    assert _rows(journal, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    slots = dict(_rows(journal, "SELECT seq, slot FROM items"))
    assert [slots[seq] for seq in range(6)] == [None] * 6
    assert all(slots[seq] in (1, 2) for seq in range(6, 10))
    after = read_report(journal)
    assert after.counts["succeeded"] == 8
    assert after.slowest, "the upgraded journal lists its slowest items"


def test_newer_schema_is_rejected_by_reader(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run(range(2), FlakyTask(), backend="thread", journal=journal)
    connection = sqlite3.connect(journal)
    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    connection.commit()
    connection.close()

    with pytest.raises(batchtools.JournalError, match="newer than this batchtools"):
        JournalReader(journal)


def test_live_journal_is_readable(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    release = threading.Event()
    started = threading.Event()

    def task(item: int) -> int:
        if item == 9:
            started.set()
            if not release.wait(60):
                raise TimeoutError("the test did not release item 9")
        return item

    runner = threading.Thread(
        target=batchtools.run,
        args=(range(10), task),
        kwargs={"backend": "thread", "concurrency": 2, "journal": journal},
    )
    runner.start()
    try:
        assert started.wait(60), "item 9 did not start"
        wait_until(
            lambda: read_report(journal).counts["succeeded"] == 9,
            "nine items committed as succeeded",
        )
        with JournalReader(journal) as reader:
            first = next(reader.iter_items())
            item = reader.find(first.key)
        report = read_report(journal)
    finally:
        release.set()
        runner.join(60)

    assert item is not None
    assert item.state == "succeeded"
    assert report.state == "running"
    assert report.counts["succeeded"] == 9


def test_dask_attempts_record_worker_address(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    report = batchtools.run(
        range(6),
        dask_tasks.double,
        backend=batchtools.DaskCluster(local_cluster=1),
        concurrency=2,
        journal=journal,
    )
    assert report.ok

    workers = {worker for (worker,) in _rows(journal, "SELECT worker FROM items")}

    assert len(workers) == 1
    (address,) = workers
    assert address.startswith("tcp://127.0.0.1:")


CLOCK_SLACK = 0.001
"""Seconds by which two clocks of one host may disagree over a short interval."""


@pytest.mark.parametrize("backend", ["process", "dask"])
def test_queued_attempts_start_when_a_worker_takes_them(
    tmp_path: Path, backend: str
) -> None:
    # Attempts wait in the backend's queue ahead of each worker. Their trace
    # must cover what the task itself saw, and the next attempt of the same
    # worker must start after the previous one ended, not at hand-over.
    journal = tmp_path / "run.db"
    chosen = (
        backend if backend == "process" else batchtools.DaskCluster(local_cluster=1)
    )
    report = batchtools.run(
        range(12), dask_tasks.own_times, backend=chosen, concurrency=2, journal=journal
    )
    assert report.ok

    rows = _rows(journal, "SELECT started, ended, duration, value FROM items")
    by_worker: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    for started, ended, duration, value in rows:
        pid, thread, own_start, own_end = json.loads(value)
        assert started == pytest.approx(ended - duration, abs=1e-6)
        assert started <= own_start + CLOCK_SLACK
        assert ended >= own_end - CLOCK_SLACK
        by_worker.setdefault((pid, thread), []).append((own_start, own_end, started))
    for attempts in by_worker.values():
        attempts.sort()
        for (_, previous_end, _), (_, _, started) in itertools.pairwise(attempts):
            assert started >= previous_end - CLOCK_SLACK
