"""The transaction journal: a durable record of sagas, for recovery after a crash.

One SQLite file contains any number of transactions. Each transaction row
carries its status and whether recovery may roll it forward. Each of its
operations has a row with the step's importable name, the state given to
it, the state its prepare returned and the operation's status. Every
failed step call adds a row to ``errors``.

The flow layer (`batchtools.flow.transaction`) writes each change as one
short transaction, because each change is a point that recovery must be
able to see after a crash: the intent before any prepare, the prepared
states before the first commit, and each commit and rollback as it starts
and ends. With WAL and ``synchronous=FULL`` a change survives power loss
once `TransactionStore.update` returns.

The statuses form two state machines, `TRANSACTION_TRANSITIONS` and
`OPERATION_TRANSITIONS`, and the store rejects any change the tables do
not allow.

Processes share a journal through `JournalLock`: one process at a time
holds the file lock, and inside that process the lock counts its holders,
so several transactions may run at once on one journal, while recovery
leaves alone the transactions that are still live.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import filelock

from batchtools._exceptions import JournalError
from batchtools.journal._journal import _remove_pid_file, _take_lock, check_path
from batchtools.journal._schema import APPLICATION_ID as RUN_APPLICATION_ID

APPLICATION_ID = 0x6274786E  # "btxn": marks the file as a transaction journal
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
_store_numbers = itertools.count(1)

# In WAL mode a change is one append to the WAL file. synchronous=FULL
# fsyncs the WAL at every commit, so each recorded change (the intent, the
# prepared states, each commit and rollback) survives power loss. A
# transaction pays about one fsync per commit call, plus three.
PRAGMAS = (
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA journal_size_limit=67108864",
)

CREATE = (
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
    """CREATE TABLE transactions (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        roll_forward INTEGER NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        pid INTEGER NOT NULL
    )""",
    # Recovery looks only for unfinished transactions, and the partial index
    # keeps that lookup small however many finished ones the file keeps.
    """CREATE INDEX transactions_unfinished ON transactions (created)
        WHERE status NOT IN ('committed', 'rolled_back')""",
    """CREATE TABLE operations (
        txn TEXT NOT NULL,
        seq INTEGER NOT NULL,
        step TEXT NOT NULL,
        state TEXT NOT NULL,
        prepared TEXT,
        status TEXT NOT NULL,
        PRIMARY KEY (txn, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE errors (
        id INTEGER PRIMARY KEY,
        txn TEXT NOT NULL,
        seq INTEGER NOT NULL,
        phase TEXT NOT NULL,
        time REAL NOT NULL,
        type TEXT NOT NULL,
        message TEXT NOT NULL,
        traceback TEXT NOT NULL
    )""",
    "CREATE INDEX errors_txn ON errors (txn)",
)

COUNT_TABLES = "SELECT count(*) FROM sqlite_schema"
INSERT_TRANSACTION = """
    INSERT INTO transactions (id, status, roll_forward, created, updated, pid)
    VALUES (?, 'preparing', ?, ?, ?, ?)
"""
# Each row is [seq, step, state].
INSERT_OPERATIONS = """
    INSERT INTO operations (txn, seq, step, state, status)
    SELECT ?, j.value ->> 0, j.value ->> 1, j.value ->> 2, 'pending'
    FROM json_each(?) AS j
"""
SELECT_STATUS = "SELECT status FROM transactions WHERE id = ?"
SET_STATUS = "UPDATE transactions SET status = ?, updated = ? WHERE id = ?"
SELECT_OPERATION_STATUSES = """
    SELECT seq, status FROM operations
    WHERE txn = ? AND seq IN (SELECT value FROM json_each(?))
"""
# Each row is [seq, status].
SET_OPERATION_STATUSES = """
    UPDATE operations SET status = j.value ->> 1
    FROM json_each(?) AS j
    WHERE operations.txn = ? AND operations.seq = j.value ->> 0
"""
# Each row is [seq, prepared state].
SET_PREPARED = """
    UPDATE operations SET prepared = j.value ->> 1
    FROM json_each(?) AS j
    WHERE operations.txn = ? AND operations.seq = j.value ->> 0
"""
# Each row is [seq, phase, time, type, message, traceback].
INSERT_ERRORS = """
    INSERT INTO errors (txn, seq, phase, time, type, message, traceback)
    SELECT ?, j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3,
           j.value ->> 4, j.value ->> 5
    FROM json_each(?) AS j
"""
SELECT_UNFINISHED = """
    SELECT id, status, roll_forward, created, updated, pid FROM transactions
    WHERE status NOT IN ('committed', 'rolled_back') ORDER BY created, id
"""
SELECT_TRANSACTION = """
    SELECT id, status, roll_forward, created, updated, pid FROM transactions
    WHERE id = ?
"""
SELECT_OPERATIONS = """
    SELECT seq, step, state, prepared, status FROM operations
    WHERE txn = ? ORDER BY seq
"""
SELECT_ERRORS = """
    SELECT seq, phase, time, type, message, traceback FROM errors
    WHERE txn = ? ORDER BY id
"""


class TransactionStatus(enum.Enum):
    """The status of a transaction, with its changes in `TRANSACTION_TRANSITIONS`."""

    PREPARING = "preparing"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    """Some rollback failed, so recovery calls the failed rollbacks again."""

    @property
    def is_final(self) -> bool:
        """Whether recovery has nothing left to do for the transaction."""
        return self in (TransactionStatus.COMMITTED, TransactionStatus.ROLLED_BACK)


class OperationStatus(enum.Enum):
    """The status of an operation, with its changes in `OPERATION_TRANSITIONS`."""

    PENDING = "pending"
    """Recorded. Its prepare may not have run, or may not have finished."""
    PREPARED = "prepared"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    SKIPPED = "skipped"
    """Its prepare never started, because another operation's prepare failed."""


_S = TypeVar("_S", TransactionStatus, OperationStatus)
_T = TransactionStatus
_O = OperationStatus

TRANSACTION_TRANSITIONS: dict[TransactionStatus, frozenset[TransactionStatus]] = {
    _T.PREPARING: frozenset({_T.COMMITTING, _T.ROLLING_BACK}),
    _T.COMMITTING: frozenset({_T.COMMITTED, _T.ROLLING_BACK}),
    _T.ROLLING_BACK: frozenset({_T.ROLLED_BACK, _T.ROLLBACK_FAILED}),
    _T.ROLLBACK_FAILED: frozenset({_T.ROLLING_BACK}),
    _T.COMMITTED: frozenset(),
    _T.ROLLED_BACK: frozenset(),
}

# A rollback may follow any status but SKIPPED, because a rollback must
# undo whatever part of prepare or commit ran before a failure or a crash.
_UNDO = frozenset({_O.ROLLED_BACK, _O.ROLLBACK_FAILED})
OPERATION_TRANSITIONS: dict[OperationStatus, frozenset[OperationStatus]] = {
    _O.PENDING: frozenset({_O.PREPARED, _O.SKIPPED}) | _UNDO,
    _O.PREPARED: frozenset({_O.COMMITTING}) | _UNDO,
    _O.COMMITTING: frozenset({_O.COMMITTED}) | _UNDO,
    _O.COMMITTED: _UNDO,
    _O.ROLLBACK_FAILED: frozenset({_O.ROLLED_BACK}),
    _O.ROLLED_BACK: frozenset(),
    _O.SKIPPED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class StoredError:
    """A failed step call as the journal keeps it.

    Attributes:
        seq: The operation's position in the transaction, from 0.
        phase: ``prepare``, ``commit`` or ``rollback``.
        time: When the call failed, in seconds since the epoch.
        type_name: The exception's qualified type name.
        message: `str()` of the exception.
        traceback: The formatted traceback.
    """

    seq: int
    phase: str
    time: float
    type_name: str
    message: str
    traceback: str


@dataclass(frozen=True, slots=True)
class StoredOperation:
    """An operation row.

    Attributes:
        seq: Its position in the transaction, from 0.
        step: The step's importable name, ``package.module:Name``.
        state: The JSON text of the state given to `Transaction.add`.
        prepared: The JSON text of the state its prepare returned, or
            ``None`` before the transaction recorded it.
        status: Its status.
    """

    seq: int
    step: str
    state: str
    prepared: str | None
    status: OperationStatus


@dataclass(frozen=True, slots=True)
class StoredTransaction:
    """A transaction with its operations and errors, as read from the journal.

    Attributes:
        id: The transaction's id.
        status: Its status.
        roll_forward: Whether recovery finishes its commits once every
            prepare has succeeded, instead of rolling it back.
        created: When it began, in seconds since the epoch.
        updated: When its status last changed.
        pid: The process that began it.
        operations: Its operations in order.
        errors: Its failed step calls, oldest first.
    """

    id: str
    status: TransactionStatus
    roll_forward: bool
    created: float
    updated: float
    pid: int
    operations: tuple[StoredOperation, ...]
    errors: tuple[StoredError, ...]


class JournalLock:
    """The writer lock of a transaction journal, counted per holder in a process.

    The first holder in a process takes the file lock, and the last one to
    release it lets it go, so other processes fail at once with the
    holder's pid. Holders are names: a running transaction holds its id for
    as long as any call of its steps still runs, so that a recovery in the
    same process can tell it is live.
    """

    _registry: ClassVar[dict[str, JournalLock]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path, file_lock: filelock.BaseFileLock) -> None:
        self.path = path
        self._file_lock = file_lock
        self._holds: collections.Counter[str] = collections.Counter()
        # Changing the journal mode or creating the schema fails with
        # "database is locked" while another connection writes, so the
        # connections of this process open one at a time.
        self.opening = threading.Lock()

    def __repr__(self) -> str:
        return f"<JournalLock {str(self.path)!r} holders={dict(self._holds)}>"

    @classmethod
    def acquire(cls, path: Path, holder: str) -> JournalLock:
        """Add ``holder`` to the lock of ``path``, taking the file lock if needed.

        Raises:
            JournalLockedError: Another process holds the journal.
            JournalError: The lock file cannot be created.
        """
        key = os.path.realpath(path)
        with cls._registry_lock:
            lock = cls._registry.get(key)
            if lock is None:
                lock = cls(path, _take_lock(path))
                cls._registry[key] = lock
            lock._holds[holder] += 1
        return lock

    def hold(self, holder: str) -> None:
        """Add one more hold for ``holder``. The lock must be held already."""
        with self._registry_lock:
            if not self._holds:
                raise RuntimeError(f"{self!r} was released; acquire it again")
            self._holds[holder] += 1

    def claim(self, holder: str) -> bool:
        """Add ``holder`` if it does not hold the lock yet; return whether it did."""
        with self._registry_lock:
            if self._holds[holder] > 0:
                return False
            self._holds[holder] += 1
            return True

    def release(self, holder: str) -> None:
        """Drop one hold of ``holder``. The last hold to go releases the file lock."""
        with self._registry_lock:
            self._holds[holder] -= 1
            if self._holds[holder] <= 0:
                del self._holds[holder]
            if self._holds:
                return
            del self._registry[os.path.realpath(self.path)]
            self._file_lock.release()
            _remove_pid_file(self.path)


class TransactionStore:
    """One connection to a transaction journal, holding its `JournalLock`.

    Open one with `open`. A store is used by one task at a time. Its
    methods block on fsync, so async callers run them in a thread.
    """

    def __init__(
        self, path: Path, conn: sqlite3.Connection, lock: JournalLock, holder: str
    ) -> None:
        self.path = path
        self.lock = lock
        self._conn: sqlite3.Connection | None = conn
        self._holder = holder

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<TransactionStore {str(self.path)!r} {state}>"

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool) -> TransactionStore:
        """Open the journal at ``path`` and take its lock.

        A new file is private to the user (mode 0600), as is a folder made
        for it (0700).

        Args:
            path: The journal file.
            create: Create the file when it is missing; otherwise a missing
                file is an error.

        Raises:
            JournalLockedError: Another process holds the journal.
            JournalError: The path is a symbolic link, not a regular file, or
                on a network filesystem. Or the file is missing (without
                ``create``), damaged or another kind of file.
        """
        journal_path = Path(path)
        check_path(journal_path)
        if not create and not journal_path.exists():
            raise JournalError(str(journal_path), "no such transaction journal")
        try:
            journal_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise JournalError(
                str(journal_path), f"its folder cannot be created: {error}"
            ) from error
        holder = f"store-{next(_store_numbers)}"
        lock = JournalLock.acquire(journal_path, holder)
        try:
            with lock.opening:
                conn = _connect(journal_path, create=create)
        except BaseException:
            lock.release(holder)
            raise
        return cls(journal_path, conn, lock, holder)

    def close(self) -> None:
        """Close the connection and drop this store's hold on the lock."""
        if self._conn is None:
            return
        self._conn.close()
        self._conn = None
        self.lock.release(self._holder)

    def begin(
        self,
        transaction_id: str,
        roll_forward: bool,
        operations: Sequence[tuple[str, str]],
    ) -> None:
        """Record a new transaction, every operation pending.

        Args:
            transaction_id: The new transaction's id.
            roll_forward: Whether recovery may finish its commits.
            operations: ``(step name, state as JSON text)`` in order.

        Raises:
            JournalError: The journal cannot be written.
        """
        now = time.time()
        rows = json.dumps(
            [[seq, step, state] for seq, (step, state) in enumerate(operations)]
        )
        with self._writing(f"recording transaction {transaction_id}") as conn:
            conn.execute(
                INSERT_TRANSACTION,
                (transaction_id, int(roll_forward), now, now, os.getpid()),
            )
            conn.execute(INSERT_OPERATIONS, (transaction_id, rows))

    def update(
        self,
        transaction_id: str,
        *,
        status: TransactionStatus | None = None,
        operations: Mapping[int, OperationStatus] | None = None,
        prepared: Mapping[int, str] | None = None,
        errors: Sequence[StoredError] = (),
    ) -> None:
        """Record changes of one transaction at once, durably.

        Args:
            transaction_id: The transaction.
            status: Its new status, if it changes.
            operations: New statuses of operations, by position.
            prepared: The JSON text of prepared states, by position.
            errors: Failed step calls to add.

        Raises:
            JournalError: The journal cannot be written, or a status change
                is not in the transition tables.
        """
        with self._writing(f"updating transaction {transaction_id}") as conn:
            if status is not None:
                self._set_status(conn, transaction_id, status)
            if operations:
                self._set_operation_statuses(conn, transaction_id, operations)
            if prepared:
                rows = json.dumps(sorted(prepared.items()))
                conn.execute(SET_PREPARED, (rows, transaction_id))
            if errors:
                rows = json.dumps(
                    [
                        [e.seq, e.phase, e.time, e.type_name, e.message, e.traceback]
                        for e in errors
                    ]
                )
                conn.execute(INSERT_ERRORS, (transaction_id, rows))

    def unfinished(self) -> list[StoredTransaction]:
        """Return the transactions that are not committed or rolled back, oldest first.

        Raises:
            JournalError: The journal cannot be read or is damaged.
        """
        with self._reading("reading unfinished transactions") as conn:
            rows = conn.execute(SELECT_UNFINISHED).fetchall()
            return [self._transaction(conn, row) for row in rows]

    def load(self, transaction_id: str) -> StoredTransaction | None:
        """Return one transaction, or ``None`` when the journal has no such id.

        Raises:
            JournalError: The journal cannot be read or is damaged.
        """
        with self._reading(f"reading transaction {transaction_id}") as conn:
            row = conn.execute(SELECT_TRANSACTION, (transaction_id,)).fetchone()
            return None if row is None else self._transaction(conn, row)

    def _set_status(
        self, conn: sqlite3.Connection, transaction_id: str, status: TransactionStatus
    ) -> None:
        row = conn.execute(SELECT_STATUS, (transaction_id,)).fetchone()
        if row is None:
            raise JournalError(
                str(self.path), f"it has no transaction {transaction_id}"
            )
        current = self._decode(TransactionStatus, row[0])
        if status is not current and status not in TRANSACTION_TRANSITIONS[current]:
            raise JournalError(
                str(self.path),
                f"transaction {transaction_id} cannot change from {current.value} "
                f"to {status.value}",
            )
        conn.execute(SET_STATUS, (status.value, time.time(), transaction_id))

    def _set_operation_statuses(
        self,
        conn: sqlite3.Connection,
        transaction_id: str,
        changes: Mapping[int, OperationStatus],
    ) -> None:
        stored = dict(
            conn.execute(
                SELECT_OPERATION_STATUSES, (transaction_id, json.dumps(list(changes)))
            ).fetchall()
        )
        for seq, status in changes.items():
            if seq not in stored:
                raise JournalError(
                    str(self.path),
                    f"transaction {transaction_id} has no operation {seq}",
                )
            current = self._decode(OperationStatus, stored[seq])
            if status is not current and status not in OPERATION_TRANSITIONS[current]:
                raise JournalError(
                    str(self.path),
                    f"operation {seq} of transaction {transaction_id} cannot change "
                    f"from {current.value} to {status.value}",
                )
        rows = json.dumps([[seq, status.value] for seq, status in changes.items()])
        conn.execute(SET_OPERATION_STATUSES, (rows, transaction_id))

    def _transaction(
        self, conn: sqlite3.Connection, row: tuple[object, ...]
    ) -> StoredTransaction:
        transaction_id = str(row[0])
        operations = tuple(
            StoredOperation(
                seq, step, state, prepared, self._decode(OperationStatus, status)
            )
            for seq, step, state, prepared, status in conn.execute(
                SELECT_OPERATIONS, (transaction_id,)
            )
        )
        errors = tuple(
            StoredError(*error)
            for error in conn.execute(SELECT_ERRORS, (transaction_id,))
        )
        created, updated, pid = row[3], row[4], row[5]
        assert isinstance(created, float) and isinstance(updated, float)
        assert isinstance(pid, int)
        return StoredTransaction(
            id=transaction_id,
            status=self._decode(TransactionStatus, row[1]),
            roll_forward=bool(row[2]),
            created=created,
            updated=updated,
            pid=pid,
            operations=operations,
            errors=errors,
        )

    def _decode(self, kind: type[_S], value: object) -> _S:
        try:
            return kind(value)
        except ValueError:
            raise JournalError(
                str(self.path), f"it is damaged: unknown status {value!r}"
            ) from None

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        if self._conn is None:
            raise JournalError(str(self.path), f"{doing} failed: the store is closed")
        try:
            yield self._conn
        except sqlite3.Error as error:
            raise _journal_error(self.path, error, doing) from error

    @contextlib.contextmanager
    def _writing(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._reading(doing) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already, after a disk full error.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """Open the journal file, creating it and its schema when ``create`` allows."""
    created = False
    if create:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            os.close(os.open(path, flags, 0o600))
            created = True
        except FileExistsError:
            pass
        except OSError as error:
            raise JournalError(
                str(path), f"it cannot be created: {error.strerror}"
            ) from error
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=5.0, check_same_thread=False
        )
    except sqlite3.Error as error:
        raise _journal_error(path, error, "opening") from error
    try:
        _check_identity(path, conn, create=create)
        # Pragmas after the check, because journal_mode=WAL writes a header
        # into an empty file.
        for pragma in PRAGMAS:
            conn.execute(pragma)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute(COUNT_TABLES).fetchone()[0] == 0:
                for statement in CREATE:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as error:
        conn.close()
        raise _journal_error(path, error, "opening") from error
    except BaseException:
        conn.close()
        raise
    if created:
        _sync_folder(path)
    return conn


def _sync_folder(path: Path) -> None:
    """Fsync the folder of a new journal, so that its entry survives power loss."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise JournalError(
            str(path), f"syncing its folder failed: {error.strerror}"
        ) from error


def _check_identity(path: Path, conn: sqlite3.Connection, *, create: bool) -> None:
    """Check that the file is a transaction journal, or empty when ``create``."""
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == 0 and conn.execute(COUNT_TABLES).fetchone()[0] == 0:
        if not create:
            raise JournalError(str(path), "it is empty, not a transaction journal")
        return
    if application_id == RUN_APPLICATION_ID:
        raise JournalError(
            str(path),
            "it is a run journal, not a transaction journal; give the path that "
            "the transaction used",
        )
    if application_id != APPLICATION_ID:
        raise JournalError(
            str(path), "it is an SQLite file but not a batchtools transaction journal"
        )
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(
            str(path),
            f"it has schema version {version}, newer than this batchtools "
            f"supports ({SCHEMA_VERSION}); upgrade batchtools to use it",
        )


def _journal_error(path: Path, error: sqlite3.Error, doing: str) -> JournalError:
    text = str(error)
    hint = ""
    if "full" in text.lower():
        hint = "; free disk space, then run 'batchtools recover' on it"
    elif "not a database" in text or "malformed" in text:
        hint = "; the file is damaged or not a transaction journal"
    return JournalError(str(path), f"{doing} failed: {text}{hint}")
