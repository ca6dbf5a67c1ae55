"""Read-only queries over a journal for reports: items, attempts and their traces.

A `JournalReader` opens the file read-only, so it works while a run holds
the writer lock and writes: WAL mode lets it read the last committed state
without blocking the writer. Every query reads in blocks or aggregates in
SQL, so memory stays flat for a run of millions of items.

A successful attempt lives in its item's row, as the item's last attempt.
Failed attempts live in the attempts table, the last one of a failed item
included. So every attempt is read once from the attempts rows plus the
items rows of succeeded items.

A journal of schema version 1 has no trace columns. It reads with the
slot and worker unknown, and the duration of an item's last attempt taken
as ``ended - started``, which spans all its attempts and is known only for
items that were running when a group was committed.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from batchtools import _codec
from batchtools._exceptions import ConfigurationError, JournalError
from batchtools.journal import _schema as sql
from batchtools.journal._journal import (
    RunRecord,
    _check_identity,
    _connect,
    _translate,
    check_existing_file,
    digest_hash,
    read_run,
)


@dataclass(frozen=True, slots=True)
class _Columns:
    """The SQL expressions of the trace columns in one schema version."""

    duration: str
    slot: str
    worker: str
    attempt_slot: str
    attempt_worker: str


_COLUMNS = {
    1: _Columns("(ended - started)", "NULL", "NULL", "NULL", "NULL"),
    2: _Columns("duration", "slot", "worker", "a.slot", "a.worker"),
}


@dataclass(slots=True)
class ItemTrace:
    """An item with the trace of its last attempt.

    Attributes:
        seq: The item's position in the input when first read, from 0.
        key: The item's key.
        item: The item, decoded.
        state: Its state name.
        attempts: Attempts made so far.
        lost_workers: Worker processes it has killed so far.
        value: The value as JSON text, if stored.
        error: The last error as JSON text, if any.
        reason: Why it was skipped or cancelled.
        started: When its first recorded attempt started, if known.
        ended: When its last attempt ended, if it has ended.
        duration: Seconds its last attempt took, if known.
        slot: The job slot of its last attempt, if known.
        worker: The process of its last attempt (``pid N`` or a Dask
            worker's address), if known.
    """

    seq: int
    key: str
    item: Any
    state: str
    attempts: int
    lost_workers: int
    value: str | None
    error: str | None
    reason: str | None
    started: float | None
    ended: float | None
    duration: float | None
    slot: int | None
    worker: str | None


@dataclass(slots=True)
class AttemptTrace:
    """One attempt of an item.

    Attributes:
        seq: The item's position in the input, from 0.
        key: The item's key.
        number: The attempt number, from 1.
        started: When it started, seconds since the epoch.
        duration: Seconds it took.
        slot: Its job slot, if known.
        worker: Its process (``pid N`` or a Dask worker's address), if known.
        error: Its error as JSON text, or ``None`` if it succeeded.
        outcome: ``succeeded``; ``retried`` for a failed attempt that
            another followed; ``failed`` for the last attempt of a failed
            item.
    """

    seq: int
    key: str
    number: int
    started: float
    duration: float
    slot: int | None
    worker: str | None
    error: str | None
    outcome: str


@dataclass(slots=True)
class TimelineSample:
    """The attempts chosen for a timeline, and how they were chosen.

    Attributes:
        attempts: The chosen attempts, in order of start.
        total: How many attempts the journal records.
        failed_total: How many of them failed.
        failed_shown: How many failed attempts are among those chosen.
        every: Every this-many-th succeeded item is shown (1 for all).
    """

    attempts: list[AttemptTrace]
    total: int
    failed_total: int
    failed_shown: int
    every: int


class JournalReader:
    """Read-only access to one journal, for reports, `show` and `status`.

    Use it as a context manager. It never takes the writer lock, so it
    reads a journal that a live run is writing.

    Args:
        path: The journal file.

    Raises:
        JournalError: The file is missing, damaged, not a journal, or of
            a schema version newer than this batchtools supports.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

        check_existing_file(self.path)
        try:
            self._conn = _connect(self.path, readonly=True)
        except sqlite3.Error as error:
            raise _translate(self.path, error, "opening") from error
        try:
            _check_identity(self.path, self._conn)
            self.version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as error:
            self._conn.close()
            raise _translate(self.path, error, "reading") from error
        except BaseException:
            self._conn.close()
            raise

        columns = _COLUMNS.get(self.version)
        if columns is None:
            self._conn.close()
            raise JournalError(
                str(self.path), f"it has an unknown schema version {self.version}"
            )
        self._duration = columns.duration
        self._items = (
            "seq, key, item, state, attempts, lost_workers, value, error, reason, "
            f"started, ended, {columns.duration}, {columns.slot}, {columns.worker}"
        )
        self._trace = f"{columns.duration}, {columns.slot}, {columns.worker}"
        # Columns of attempts, read through the alias ``a``.
        self._attempts = (
            "a.seq, i.key, a.number, a.started, a.duration, "
            f"{columns.attempt_slot}, {columns.attempt_worker}, a.error"
        )
        self._has_log10 = False

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the run -----------------------------------------------------------

    def run(self) -> RunRecord:
        """Return the run record.

        Raises:
            JournalError: The journal cannot be read.
        """
        return read_run(self.path)

    def counts(self) -> dict[str, int]:
        """Return how many items are in each state.

        Raises:
            JournalError: The journal cannot be read.
        """
        return dict(self._query(sql.COUNT_STATES).fetchall())

    def span(self) -> tuple[float, float] | None:
        """Return when the first recorded attempt started and the last one ended.

        Returns:
            ``(start, end)`` in seconds since the epoch, or ``None`` when no
            attempt is recorded.

        Raises:
            JournalError: The journal cannot be read.
        """
        start, end = self._query(
            f"SELECT min(ended - {self._duration}), max(ended) FROM items "
            f"WHERE state = 'succeeded' AND {self._duration} IS NOT NULL"
        ).fetchone()
        failed_start, failed_end = self._query(
            "SELECT min(started), max(started + duration) FROM attempts"
        ).fetchone()
        starts = [value for value in (start, failed_start) if value is not None]
        ends = [value for value in (end, failed_end) if value is not None]
        if not starts or not ends:
            return None
        return min(starts), max(ends)

    def attempt_counts(self) -> tuple[int, int]:
        """Return how many attempts the journal records, and how many failed.

        Raises:
            JournalError: The journal cannot be read.
        """
        (succeeded,) = self._query(
            f"SELECT count(*) FROM items WHERE state = 'succeeded' "
            f"AND {self._duration} IS NOT NULL"
        ).fetchone()
        (failed,) = self._query("SELECT count(*) FROM attempts").fetchone()
        return succeeded + failed, failed

    # -- items -------------------------------------------------------------

    def iter_items(
        self, states: tuple[str, ...] | None = None, block: int = 500
    ) -> Iterator[ItemTrace]:
        """Yield items in input order, optionally only those in ``states``.

        Raises:
            JournalError: The journal cannot be read.
        """
        where = "seq > ?"
        if states is not None:
            marks = ", ".join("?" * len(states))
            where += f" AND state IN ({marks})"
        statement = (
            f"SELECT {self._items} FROM items WHERE {where} ORDER BY seq LIMIT ?"
        )
        last = -1
        while True:
            rows = self._query(statement, (last, *(states or ()), block)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _item_trace(row)
            last = rows[-1][0]

    def slowest(self, count: int) -> list[ItemTrace]:
        """Return the ``count`` items whose last attempt took longest, longest first.

        Raises:
            JournalError: The journal cannot be read.
        """
        rows = self._query(
            f"SELECT {self._items} FROM items WHERE {self._duration} IS NOT NULL "
            "AND state IN ('succeeded', 'failed', 'skipped', 'cancelled') "
            f"ORDER BY {self._duration} DESC, seq LIMIT ?",
            (count,),
        ).fetchall()
        return [_item_trace(row) for row in rows]

    def find(self, key: str) -> ItemTrace | None:
        """Return the item with ``key``, or with the only key that starts with it.

        Returns:
            The item, or ``None`` when no key matches.

        Raises:
            ConfigurationError: Several keys start with ``key``.
            JournalError: The journal cannot be read.
        """
        # A repeated item's key is its digest with "-N" appended.
        head, _, tail = key.rpartition("-")
        base = head if head and tail.isdigit() else key
        statement = f"SELECT {self._items} FROM items WHERE dhash = ? AND key = ?"
        for digest in dict.fromkeys((key, base)):
            row = self._query(statement, (digest_hash(digest), key)).fetchone()
            if row is not None:
                return _item_trace(row)
        # A scan, but only for a command a person types.
        pattern = key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._query(
            f"SELECT {self._items} FROM items WHERE key LIKE ? ESCAPE '\\' LIMIT 2",
            (pattern + "%",),
        ).fetchall()
        if len(rows) > 1:
            raise ConfigurationError(
                f"several items of journal {self.path} have keys that start with "
                f"{key!r}; give more of the key"
            )
        return _item_trace(rows[0]) if rows else None

    def history(self, item: ItemTrace) -> list[AttemptTrace]:
        """Return every recorded attempt of ``item``, oldest first.

        Raises:
            JournalError: The journal cannot be read.
        """
        rows = self._query(
            f"SELECT {self._attempts} FROM attempts AS a "
            "JOIN items AS i ON i.seq = a.seq WHERE a.seq = ? ORDER BY a.number",
            (item.seq,),
        ).fetchall()
        attempts = [
            _attempt_trace(row, item.state == "failed" and row[2] == item.attempts)
            for row in rows
        ]
        if (
            item.state == "succeeded"
            and item.ended is not None
            and item.duration is not None
        ):
            attempts.append(
                AttemptTrace(
                    item.seq,
                    item.key,
                    item.attempts,
                    item.ended - item.duration,
                    item.duration,
                    item.slot,
                    item.worker,
                    None,
                    "succeeded",
                )
            )
        return attempts

    # -- aggregates for charts ---------------------------------------------

    def duration_histogram(self, per_decade: int) -> dict[int, int]:
        """Count attempts by duration on a log scale.

        Bin ``k`` contains the durations ``d`` with
        ``10 ** (k / per_decade) <= d < 10 ** ((k + 1) / per_decade)``
        seconds; durations below a microsecond count in the bin of one
        microsecond.

        Raises:
            JournalError: The journal cannot be read.
        """
        self._ensure_log10()
        floor = 1e-6
        bins: dict[int, int] = {}
        for table, duration, where in (
            ("items", self._duration, "state = 'succeeded' AND "),
            ("attempts", "duration", ""),
        ):
            rows = self._query(
                f"SELECT CAST(floor(log10(max({duration}, ?)) * ?) AS INTEGER), "
                f"count(*) FROM {table} WHERE {where}{duration} IS NOT NULL "
                "GROUP BY 1",
                (floor, per_decade),
            ).fetchall()
            for index, count in rows:
                bins[index] = bins.get(index, 0) + count
        return bins

    def completions(self, start: float, width: float) -> dict[tuple[int, str], int]:
        """Count items that ended, by time bin and outcome.

        Returns:
            ``{(bin, state): count}`` for succeeded and failed items, where
            bin ``k`` covers ``start + k * width`` to ``start + (k + 1) * width``.

        Raises:
            JournalError: The journal cannot be read.
        """
        rows = self._query(
            "SELECT CAST((ended - ?) / ? AS INTEGER), state, count(*) FROM items "
            "WHERE ended IS NOT NULL AND state IN ('succeeded', 'failed') "
            "GROUP BY 1, 2",
            (start, width),
        ).fetchall()
        return {(index, state): count for index, state, count in rows}

    def timeline(self, limit: int) -> TimelineSample:
        """Choose at most ``limit`` attempts to draw on a timeline.

        Failed attempts come first, as they matter most, up to half of
        ``limit`` (or more when fewer succeeded). The rest are the
        successes of every ``k``-th item, with ``k`` as small as fits.

        Raises:
            JournalError: The journal cannot be read.
        """
        total, failed_total = self.attempt_counts()
        succeeded_total = total - failed_total
        failed_room = max(limit // 2, limit - succeeded_total)
        failed_rows = self._query(
            f"SELECT {self._attempts}, i.state = 'failed' AND a.number = i.attempts "
            "FROM attempts AS a JOIN items AS i ON i.seq = a.seq "
            "ORDER BY a.started LIMIT ?",
            (failed_room,),
        ).fetchall()
        attempts = [_attempt_trace(row[:8], bool(row[8])) for row in failed_rows]
        room = limit - len(attempts)
        every = max(1, math.ceil(succeeded_total / room)) if room > 0 else 0
        if every:
            rows = self._query(
                f"SELECT seq, key, attempts, ended, {self._trace} FROM items "
                f"WHERE state = 'succeeded' AND {self._duration} IS NOT NULL "
                "AND seq % ? = 0 ORDER BY seq LIMIT ?",
                (every, room),
            ).fetchall()
            for seq, key, number, ended, duration, slot, worker in rows:
                attempts.append(
                    AttemptTrace(
                        seq,
                        key,
                        number,
                        ended - duration,
                        duration,
                        slot,
                        worker,
                        None,
                        "succeeded",
                    )
                )
        attempts.sort(key=lambda attempt: attempt.started)
        return TimelineSample(
            attempts=attempts,
            total=total,
            failed_total=failed_total,
            failed_shown=len(failed_rows),
            every=every,
        )

    # -- helpers -------------------------------------------------------------

    def _query(
        self, statement: str, parameters: tuple[Any, ...] = ()
    ) -> sqlite3.Cursor:
        try:
            return self._conn.execute(statement, parameters)
        except sqlite3.Error as error:
            raise _translate(self.path, error, "reading") from error

    def _ensure_log10(self) -> None:
        """Provide SQL's log10 where SQLite was built without its math functions."""
        if self._has_log10:
            return
        try:
            self._conn.execute("SELECT log10(10)")
        except sqlite3.OperationalError:
            self._conn.create_function("log10", 1, math.log10, deterministic=True)
            self._conn.create_function("floor", 1, math.floor, deterministic=True)
        self._has_log10 = True


def _item_trace(row: tuple[Any, ...]) -> ItemTrace:
    return ItemTrace(
        seq=row[0],
        key=row[1],
        item=_codec.decode(row[2]),
        state=row[3],
        attempts=row[4],
        lost_workers=row[5],
        value=row[6],
        error=row[7],
        reason=row[8],
        started=row[9],
        ended=row[10],
        duration=row[11],
        slot=row[12],
        worker=row[13],
    )


def _attempt_trace(row: tuple[Any, ...], final: bool) -> AttemptTrace:
    """Build a failed attempt from a row of `JournalReader._attempts`."""
    return AttemptTrace(
        seq=row[0],
        key=row[1],
        number=row[2],
        started=row[3],
        duration=row[4],
        slot=row[5],
        worker=row[6],
        error=row[7],
        outcome="failed" if final else "retried",
    )
