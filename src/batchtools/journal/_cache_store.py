"""The disk side of the result cache: one SQLite file shared by runs and processes.

Each entry maps a key (the task's namespace digest and the item's key) to
the canonical text of a successful value, made by `batchtools._codec.encode`.
Besides the value, a row keeps the time it was stored (for the TTL), the
time it was last used (for LRU eviction) and its size in bytes. A one-row
table ``totals``, kept current by triggers, contains the sum of the sizes, so
checking the size bound costs one indexed read instead of a scan.

This module only moves text. It never decodes values, and the caller
(`batchtools.policy.cache`) keeps pickled values out of the file.

Several processes may open the same file. WAL mode lets readers and one
writer work at once, ``busy_timeout`` makes a writer wait for another
instead of failing, and every write is one short transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple

from batchtools._exceptions import CacheError
from batchtools.journal import _sqlite_file as sqlite_file
from batchtools.journal._schema import APPLICATION_ID as JOURNAL_APPLICATION_ID

APPLICATION_ID = 0x62746361  # "btca": marks the file as a batchtools result cache
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
USED_RESOLUTION = 60.0
"""Seconds by which an entry's ``used`` time may lag behind its last read.

Writing ``used`` on every hit would turn each read into a write
transaction. LRU eviction does not need finer times than this.
"""

# WAL lets processes read while another writes. synchronous=NORMAL skips
# the fsync at each commit: a power loss may drop the last entries, which
# only costs running those items again, and the file stays consistent.
_WHAT = "result cache"  # how messages name the file

PRAGMAS = (
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA journal_size_limit=67108864",
)

CREATE = (
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
    """CREATE TABLE entries (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        stored REAL NOT NULL,
        used REAL NOT NULL,
        size INTEGER NOT NULL
    )""",
    "CREATE INDEX entries_used ON entries (used)",
    """CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        bytes INTEGER NOT NULL
    )""",
    "INSERT INTO totals (id, bytes) VALUES (1, 0)",
    """CREATE TRIGGER entries_inserted AFTER INSERT ON entries BEGIN
        UPDATE totals SET bytes = bytes + new.size;
    END""",
    """CREATE TRIGGER entries_deleted AFTER DELETE ON entries BEGIN
        UPDATE totals SET bytes = bytes - old.size;
    END""",
    """CREATE TRIGGER entries_resized AFTER UPDATE OF size ON entries BEGIN
        UPDATE totals SET bytes = bytes - old.size + new.size;
    END""",
)

COUNT_TABLES = "SELECT count(*) FROM sqlite_schema"
SELECT_ENTRY = "SELECT value, stored, used FROM entries WHERE key = ?"
# An upsert, not INSERT OR REPLACE: a replace deletes the old row without
# firing the delete trigger, so ``totals`` would drift.
UPSERT_ENTRY = """
    INSERT INTO entries (key, value, stored, used, size) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET
        value = excluded.value,
        stored = excluded.stored,
        used = excluded.used,
        size = excluded.size
"""
# The conditions keep a row that another process replaced in the meantime.
DELETE_EXPIRED_ENTRY = "DELETE FROM entries WHERE key = ? AND stored = ?"
TOUCH_ENTRY = "UPDATE entries SET used = ? WHERE key = ? AND used < ?"
DELETE_STORED_BEFORE = "DELETE FROM entries WHERE stored <= ?"
SELECT_TOTAL = "SELECT bytes FROM totals"
SELECT_LEAST_RECENTLY_USED = "SELECT key, size FROM entries ORDER BY used, key"
DELETE_KEYS = "DELETE FROM entries WHERE key IN (SELECT value FROM json_each(?))"
COUNT_ENTRIES = "SELECT count(*) FROM entries"


class StoredEntry(NamedTuple):
    """An entry read from the store.

    Attributes:
        text: The value's canonical text.
        stored: When the value was stored, in seconds since the epoch.
    """

    text: str
    stored: float


class CacheStore:
    """A result cache file: value texts by key, with TTL checks and LRU eviction.

    Open one with `open`. The methods are not thread-safe. The engine is
    meant to call them from its event loop thread only, and
    `batchtools.policy.cache.ResultCache` serializes its calls with a lock.
    Each call is one short transaction, so its effect is visible to other
    processes at once.

    Times are passed in by the caller, in seconds since the epoch, because
    entries are compared across processes; a monotonic clock would not do.
    """

    used_resolution: ClassVar[float] = USED_RESOLUTION

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<CacheStore {str(self.path)!r} {state}>"

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CacheStore:
        """Open the cache file at ``path``, creating it and its folder if missing.

        A new file is private to the user (mode 0600), as is a folder made
        for it (0700).

        Raises:
            ConfigurationError: The path cannot hold a cache. It is a
                directory, a symbolic link or another non-regular file. Or
                its folder cannot be created, it is not writable, it is on
                a network filesystem, or it is an SQLite file of another kind.
        """
        cache_path = Path(path).expanduser()
        sqlite_file.check_path(cache_path, _WHAT, "cache.db")
        sqlite_file.create_file(cache_path, _WHAT, make_folder=True)
        try:
            conn = sqlite3.connect(
                cache_path, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise sqlite_file.open_error(cache_path, _WHAT, error) from error
        try:
            sqlite_file.prepare(cache_path, conn, _WHAT, PRAGMAS, _check_identity)
        except BaseException:
            conn.close()
            raise
        return cls(cache_path, conn)

    def get(self, key: str, now: float, ttl: float | None) -> StoredEntry | None:
        """Read the entry of ``key`` if it was stored less than ``ttl`` seconds ago.

        An expired entry counts as missing and is deleted. A hit updates
        the entry's ``used`` time when it is more than `USED_RESOLUTION`
        seconds old.

        Args:
            key: The entry's key.
            now: The current time, in seconds since the epoch.
            ttl: How long an entry stays valid, in seconds; ``None`` for ever.

        Returns:
            The value's text and the time it was stored, or ``None``.

        Raises:
            JournalError: SQLite failed to read or write the file.
        """
        with self._translating("reading an entry") as conn:
            row = conn.execute(SELECT_ENTRY, (key,)).fetchone()
            if row is None:
                return None
            text, stored, used = row
            if ttl is not None and not now < stored + ttl:
                conn.execute(DELETE_EXPIRED_ENTRY, (key, stored))
                return None
            if now - used > USED_RESOLUTION:
                conn.execute(TOUCH_ENTRY, (now, key, now - USED_RESOLUTION))
        return StoredEntry(text, stored)

    def touch(self, key: str, now: float) -> None:
        """Set the ``used`` time of ``key`` to ``now``, for a hit served from memory.

        Nothing changes when the entry is missing or its ``used`` time is
        less than `USED_RESOLUTION` seconds old. Each call is a write
        transaction even then, so `ResultCache` calls it at most once per
        entry every `USED_RESOLUTION` seconds.

        Raises:
            JournalError: SQLite failed to write the file.
        """
        with self._translating("marking an entry as used") as conn:
            conn.execute(TOUCH_ENTRY, (now, key, now - USED_RESOLUTION))

    def put(self, key: str, text: str, now: float) -> None:
        """Store ``text`` as the value of ``key``, replacing any earlier entry.

        Args:
            key: The entry's key.
            text: The value's canonical text. It must be valid UTF-8 text
                (no lone surrogates), and the caller must leave out values
                that need pickle.
            now: The current time, in seconds since the epoch; it becomes
                the entry's stored and used time.

        Raises:
            JournalError: SQLite failed to write the file.
        """
        size = len(key) + len(text.encode("utf-8"))
        with self._translating("storing an entry") as conn:
            conn.execute(UPSERT_ENTRY, (key, text, now, now, size))

    def expire(self, now: float, ttl: float) -> int:
        """Delete every entry stored ``ttl`` or more seconds before ``now``.

        Returns:
            How many entries were deleted.

        Raises:
            JournalError: SQLite failed to write the file.
        """
        with self._translating("deleting expired entries") as conn:
            return conn.execute(DELETE_STORED_BEFORE, (now - ttl,)).rowcount

    def evict(self, max_bytes: int) -> int:
        """Delete the least recently used entries until the sizes sum to ``max_bytes``.

        The sizes are the bytes of each entry's key and value text, so the
        file itself is somewhat larger.

        Returns:
            How many entries were deleted; 0 when the entries already fit.

        Raises:
            JournalError: SQLite failed to read or write the file.
        """
        with self._translating("evicting entries") as conn:
            # A read outside a transaction first, so that the common case,
            # where everything fits, takes no write lock.
            if conn.execute(SELECT_TOTAL).fetchone()[0] <= max_bytes:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                victims = self._least_recently_used(conn, max_bytes)
                conn.execute(DELETE_KEYS, (json.dumps(victims),))
                conn.execute("COMMIT")
            except BaseException:
                sqlite_file.roll_back(conn)
                raise
        return len(victims)

    def total_size(self) -> int:
        """Return the sum of the entries' sizes in bytes.

        Raises:
            JournalError: SQLite failed to read the file.
        """
        with self._translating("reading the total size") as conn:
            total: int = conn.execute(SELECT_TOTAL).fetchone()[0]
        return total

    def __len__(self) -> int:
        with self._translating("counting entries") as conn:
            count: int = conn.execute(COUNT_ENTRIES).fetchone()[0]
        return count

    def close(self) -> None:
        """Close the file. Closing twice is allowed."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def _least_recently_used(conn: sqlite3.Connection, max_bytes: int) -> list[str]:
        excess = conn.execute(SELECT_TOTAL).fetchone()[0] - max_bytes
        victims: list[str] = []
        cursor = conn.execute(SELECT_LEAST_RECENTLY_USED)
        while excess > 0:
            row = cursor.fetchone()
            if row is None:
                break
            victims.append(row[0])
            excess -= row[1]
        cursor.close()
        return victims

    @contextlib.contextmanager
    def _translating(self, doing: str) -> Iterator[sqlite3.Connection]:
        if self._conn is None:
            raise CacheError(str(self.path), f"{doing} failed: the cache is closed")
        try:
            yield self._conn
        except sqlite3.Error as error:
            text = str(error).lower()
            hint = ""
            if "full" in text:
                hint = "; free disk space, or give the cache a max_size"
            elif "locked" in text or "busy" in text:
                hint = (
                    "; another process holds the file, so wait for it or give "
                    "this run another cache file"
                )
            elif "malformed" in text or "not a database" in text:
                hint = "; the file is damaged, so delete it and the run fills it again"
            raise CacheError(
                str(self.path), f"{doing} failed: {error}{hint}"
            ) from error


def _check_identity(path: Path, conn: sqlite3.Connection) -> None:
    """Create the schema in an empty file, or check that the file is a cache."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == 0 and conn.execute(COUNT_TABLES).fetchone()[0] == 0:
        for statement in CREATE:
            conn.execute(statement)
        return
    if application_id == JOURNAL_APPLICATION_ID:
        raise sqlite_file.path_error(
            path, _WHAT, "it is a run journal, not a result cache; give another path"
        )
    if application_id != APPLICATION_ID:
        raise sqlite_file.path_error(
            path,
            _WHAT,
            "it is an SQLite file but not a batchtools result cache; give another path",
        )
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite_file.path_error(
            path,
            _WHAT,
            f"it has schema version {version}, newer than this batchtools "
            f"supports ({SCHEMA_VERSION}); upgrade batchtools or give another path",
        )
