"""The shared state store: one SQLite file of key-value pairs per run.

A run's tasks read and write small values through `SharedState`, from
threads, coroutines and worker processes at once. Each key and value is
stored as the canonical text of `batchtools._codec.encode`. Values that the
codec could store only by pickling are rejected, so reading the store never
unpickles. `StateStore` contains the SQL and moves only text.

Several processes open the same file. WAL mode lets readers and one writer
work at once, and ``busy_timeout`` makes a writer wait for another instead
of failing. A read-modify-write is one ``BEGIN IMMEDIATE`` transaction, which
takes the write lock before it reads, so two processes can never both read
the old value and both write a new one.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

from batchtools import _codec
from batchtools._exceptions import ConfigurationError, JournalError
from batchtools.journal import _sqlite_file as sqlite_file

APPLICATION_ID = 0x62747373  # "btss": marks the file as a batchtools state store
SCHEMA_VERSION = 1

# synchronous=NORMAL skips the fsync at each commit in WAL mode. A power
# loss may drop the last writes, and the file stays consistent. The store
# contains scratch state of one run, which is not worth an fsync per write.
_WHAT = "shared state"  # how messages name the file

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA journal_size_limit=67108864",
)

CREATE = (
    f"PRAGMA application_id={APPLICATION_ID}",
    f"PRAGMA user_version={SCHEMA_VERSION}",
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)

COUNT_TABLES = "SELECT count(*) FROM sqlite_schema"
SELECT_VALUE = "SELECT value FROM state WHERE key = ?"
UPSERT_VALUE = """
    INSERT INTO state (key, value) VALUES (?, ?)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
DELETE_VALUE = "DELETE FROM state WHERE key = ?"
SELECT_ALL = "SELECT key, value FROM state ORDER BY key"

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds a write waits for another process's write transaction to end."""

# The codec writes a pickled value as the JSON array ["x","<base64>"]. A
# string payload cannot contain this text, because JSON escapes its quotes.
_PICKLE_NODE = '["x",'
_SCALAR_TYPES = frozenset({str, bytes, int, float, bool, type(None)})
_STORABLE_TYPES = (
    "str, bytes, int, float, bool, None, a path, or a tuple, list, dict, set "
    "or frozenset of them"
)


class StateStore:
    """An open state store file: value texts by key text.

    Open one with `open`. The methods are not thread-safe; the caller
    serializes calls on one instance. Each call is one short transaction,
    so its effect is visible to other processes when it returns.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<StateStore {str(self.path)!r} {state}>"

    @classmethod
    def open(cls, path: Path, *, busy_timeout: float) -> StateStore:
        """Open the store file at ``path``, creating it if missing.

        A new file is private to the user (mode 0600). Its folder must exist.

        Args:
            path: The file.
            busy_timeout: Seconds a write waits for another process's write
                transaction before it fails.

        Raises:
            ConfigurationError: The path cannot hold a store. It is a
                symbolic link, a directory or another non-regular file, it is
                on a network filesystem, it cannot be opened for writing, or
                it is an SQLite file of another kind or a newer version.
        """
        sqlite_file.check_path(path, _WHAT, "shared.db")
        sqlite_file.create_file(path, _WHAT, make_folder=False)
        try:
            conn = sqlite3.connect(
                path,
                isolation_level=None,
                timeout=busy_timeout,
                check_same_thread=False,
            )
        except sqlite3.Error as error:
            raise sqlite_file.open_error(path, _WHAT, error) from error
        try:
            sqlite_file.prepare(path, conn, _WHAT, PRAGMAS, _check_identity)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    def get(self, key: str) -> str | None:
        """Return the value text stored under ``key``, or ``None`` if there is none.

        Raises:
            JournalError: SQLite failed to read the file.
        """
        with self._translating("reading a value") as conn:
            row = conn.execute(SELECT_VALUE, (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, text: str) -> None:
        """Store ``text`` under ``key``, replacing any earlier value.

        Raises:
            JournalError: SQLite failed to write the file.
        """
        with self._translating("storing a value") as conn:
            conn.execute(UPSERT_VALUE, (key, text))

    def delete(self, key: str) -> bool:
        """Delete the value under ``key``.

        Returns:
            Whether there was a value to delete.

        Raises:
            JournalError: SQLite failed to write the file.
        """
        with self._translating("deleting a value") as conn:
            deleted: int = conn.execute(DELETE_VALUE, (key,)).rowcount
        return deleted > 0

    def update(self, key: str, compute: Callable[[str | None], str]) -> None:
        """Replace the value under ``key`` with ``compute(old)``, atomically.

        The read, ``compute`` and the write run in one ``BEGIN IMMEDIATE``
        transaction, so no other connection writes in between. ``compute``
        receives the stored text, or ``None`` when the key has no value,
        and returns the new text. When it raises, the transaction is rolled
        back and the error propagates.

        Raises:
            JournalError: SQLite failed to read or write the file, or another
                process held the write lock for longer than the busy timeout.
        """
        with self._translating("updating a value") as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(SELECT_VALUE, (key,)).fetchone()
                text = compute(None if row is None else str(row[0]))
                conn.execute(UPSERT_VALUE, (key, text))
                conn.execute("COMMIT")
            except BaseException:
                sqlite_file.roll_back(conn)
                raise

    def items(self) -> list[tuple[str, str]]:
        """Return every key text and value text, ordered by key text.

        Raises:
            JournalError: SQLite failed to read the file.
        """
        with self._translating("reading all values") as conn:
            rows = conn.execute(SELECT_ALL).fetchall()
        return [(str(key), str(value)) for key, value in rows]

    def close(self) -> None:
        """Close the file. Closing twice is allowed."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def _translating(self, doing: str) -> Iterator[sqlite3.Connection]:
        if self._conn is None:
            raise JournalError(
                str(self.path), f"{doing} failed: the shared state store is closed"
            )
        try:
            yield self._conn
        except sqlite3.Error as error:
            hint = ""
            text = str(error).lower()
            if "locked" in text or "busy" in text:
                hint = (
                    "; another process held its write lock for longer than the "
                    "busy timeout"
                )
            elif "full" in text:
                hint = "; free disk space"
            raise JournalError(
                str(self.path),
                f"{doing} in the shared state store failed: {error}{hint}",
            ) from error


class _Connection:
    """One process's open store for a path, with the mutex that serializes its use."""

    __slots__ = ("mutex", "owner", "store")

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.mutex = threading.Lock()
        self.owner: int | None = None  # the thread using the store now


# Every SharedState of one path in this process shares one connection.
_connections_lock = threading.Lock()
_connections: dict[tuple[Path, float], _Connection] = {}
_inherited: list[_Connection] = []


def _forget_after_fork() -> None:
    global _connections_lock, _connections
    # SQLite's documentation says not to use a connection in a child after
    # fork, so the child keeps the parent's connections without touching
    # them, not even to close them.
    _inherited.extend(_connections.values())
    _connections_lock = threading.Lock()
    _connections = {}


os.register_at_fork(after_in_child=_forget_after_fork)


class SharedState:
    """A small key-value store shared by the threads, tasks and processes of a run.

    Every `SharedState` of one file, in any process, reads and writes the
    same values. Each call is a transaction of its own, so a value written
    is visible to every other process when the call returns. For a
    read-modify-write use `update`, which is atomic; a `get` followed by a
    `set` is not, unless a `KeyedLock` holds the key around both.

    Keys are hashable values: str, int, bytes, or tuples of them. Values
    may be str, bytes, int, float, bool, None, paths, and tuples, lists,
    dicts, sets and frozensets of them. Both are stored as batchtools'
    type-tagged JSON, so a value comes back with its type (a tuple stays a
    tuple), and keys match by type and value. Anything else is rejected,
    because storing it would need pickle, and unpickling runs code.

    Each async method runs its blocking twin on a thread of the default
    executor, so the event loop never blocks. A cancelled call may still
    complete on that thread.

    Args:
        path: The SQLite file, created private (mode 0600) if missing. Its
            folder must exist.
        busy_timeout: Seconds a write waits for another process's write.

    Raises:
        ConfigurationError: ``busy_timeout`` is not a positive number, or the
            file cannot hold a store: it is a symbolic link or not a regular
            file, it is on a network filesystem, it cannot be opened for
            writing, or it is an SQLite file of another kind.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if not isinstance(busy_timeout, int | float) or not (
            0 < busy_timeout < math.inf
        ):
            raise ConfigurationError(
                f"busy_timeout={busy_timeout!r} is invalid; give a positive number "
                "of seconds"
            )
        self.path = Path(path).absolute()
        self.busy_timeout = float(busy_timeout)
        self._connection()  # opens the file now, so a bad path fails here

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_state, (str(self.path), self.busy_timeout))

    def __repr__(self) -> str:
        return f"<SharedState {str(self.path)!r}>"

    def get(self, key: Any, default: Any = None) -> Any:
        """Return the value stored under ``key``, or ``default`` if there is none.

        Raises:
            TypeError: The key is not hashable or would need pickle.
            JournalError: SQLite failed to read the file, or the stored
                value cannot be decoded.
        """
        key_text = key_text_of(key)
        with self._using() as store:
            text = store.get(key_text)
        return default if text is None else self._decode(key, text)

    def set(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any earlier value.

        Raises:
            TypeError: The key or the value would need pickle.
            ValueError: A str in the value contains a lone surrogate.
            JournalError: SQLite failed to write the file.
        """
        key_text = key_text_of(key)
        text = encode_storable(value, "the value")
        with self._using() as store:
            store.put(key_text, text)

    def update(self, key: Any, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Replace the value under ``key`` with ``fn(value)`` in one transaction.

        ``fn`` receives the stored value, or ``default`` when there is none,
        and returns the new value. Other processes' writes wait until the
        new value is committed, so ``fn`` should be quick, and it must not
        call this store. When ``fn`` raises, nothing changes and its error
        propagates.

        Example::

            total = shared.update("count", lambda n: n + 1, 0)

        Returns:
            The new value.

        Raises:
            TypeError: The key or the new value would need pickle.
            ValueError: A str in the new value contains a lone surrogate.
            RuntimeError: ``fn`` called this store.
            JournalError: SQLite failed to read or write the file, or another
                process held the write lock for longer than ``busy_timeout``.
        """
        key_text = key_text_of(key)
        results: list[Any] = []

        def compute(old_text: str | None) -> str:
            old = default if old_text is None else self._decode(key, old_text)
            new = fn(old)
            text = encode_storable(new, f"the value that fn returned for key {key!r}")
            results.append(new)
            return text

        with self._using() as store:
            store.update(key_text, compute)
        return results[-1]

    def delete(self, key: Any) -> bool:
        """Delete the value under ``key``.

        Returns:
            Whether there was a value to delete.

        Raises:
            TypeError: The key is not hashable or would need pickle.
            JournalError: SQLite failed to write the file.
        """
        key_text = key_text_of(key)
        with self._using() as store:
            return store.delete(key_text)

    def items(self) -> dict[Any, Any]:
        """Return a copy of every key and value in the store.

        Raises:
            JournalError: SQLite failed to read the file, or a stored key or
                value cannot be decoded.
        """
        with self._using() as store:
            rows = store.items()
        return {
            self._decode("<key>", key_text): self._decode(key_text, text)
            for key_text, text in rows
        }

    async def aget(self, key: Any, default: Any = None) -> Any:
        """Run `get` on a thread; see there."""
        return await asyncio.to_thread(self.get, key, default)

    async def aset(self, key: Any, value: Any) -> None:
        """Run `set` on a thread; see there."""
        await asyncio.to_thread(self.set, key, value)

    async def aupdate(
        self, key: Any, fn: Callable[[Any], Any], default: Any = None
    ) -> Any:
        """Run `update` on a thread, where ``fn`` runs too; see there."""
        return await asyncio.to_thread(self.update, key, fn, default)

    async def adelete(self, key: Any) -> bool:
        """Run `delete` on a thread; see there."""
        return await asyncio.to_thread(self.delete, key)

    async def aitems(self) -> dict[Any, Any]:
        """Run `items` on a thread; see there."""
        return await asyncio.to_thread(self.items)

    def close(self) -> None:
        """Close this process's connection to the file.

        Every `SharedState` of the file in this process shares that
        connection, and the next call of any of them opens it again.
        """
        with _connections_lock:
            connection = _connections.pop((self.path, self.busy_timeout), None)
        if connection is not None:
            with connection.mutex:
                connection.store.close()

    def _connection(self) -> _Connection:
        address = (self.path, self.busy_timeout)
        with _connections_lock:
            connection = _connections.get(address)
            if connection is None:
                store = StateStore.open(self.path, busy_timeout=self.busy_timeout)
                connection = _connections[address] = _Connection(store)
        return connection

    @contextmanager
    def _using(self) -> Iterator[StateStore]:
        connection = self._connection()
        me = threading.get_ident()
        if connection.owner == me:
            raise RuntimeError(
                f"the fn given to SharedState.update on '{self.path}' called the "
                "store, which would deadlock; compute the new value from fn's "
                "argument only"
            )
        with connection.mutex:
            connection.owner = me
            try:
                yield connection.store
            finally:
                connection.owner = None

    def _decode(self, key: Any, text: str) -> Any:
        if _PICKLE_NODE in text:
            raise JournalError(
                str(self.path),
                f"the value of key {key!r} contains a pickled object, which the "
                "shared state never unpickles; delete the key",
            )
        try:
            return _codec.decode(text)
        except (ValueError, TypeError) as error:
            raise JournalError(
                str(self.path),
                f"the value of key {key!r} cannot be decoded ({error}); the file "
                "is damaged or was written by other software",
            ) from error


def _reopen_state(path: str, busy_timeout: float) -> SharedState:
    return SharedState(path, busy_timeout=busy_timeout)


def check_storable(value: Any, label: str) -> None:
    """Raise TypeError if the codec could store ``value`` only by pickling it.

    The checks mirror the type table of `batchtools._codec`. Only the exact
    built-in types count, so a subclass such as an enum member is rejected.

    Args:
        value: The value to check.
        label: How the error names the value, such as ``"the value"``.

    Raises:
        TypeError: ``value`` or a part of it needs pickle; the message
            names that part and its type.
    """
    pending: list[tuple[Any, str]] = [(value, label)]
    while pending:
        current, where = pending.pop()
        kind = type(current)
        if kind in _SCALAR_TYPES or isinstance(current, PurePath):
            continue
        if kind is tuple or kind is list:
            pending.extend((v, f"{where}[{i}]") for i, v in enumerate(current))
        elif kind is dict:
            for k, v in current.items():
                pending.append((k, f"a key of {where}"))
                pending.append((v, f"{where}[{k!r}]"))
        elif kind is set or kind is frozenset:
            pending.extend((v, f"a member of {where}") for v in current)
        else:
            raise TypeError(
                f"{where} has type {kind.__module__}.{kind.__qualname__}, which the "
                f"shared state cannot store without pickle; use {_STORABLE_TYPES}"
            )


def encode_storable(value: Any, label: str) -> str:
    """Return the canonical text of ``value``, rejecting values that need pickle.

    Raises:
        TypeError: ``value`` or a part of it needs pickle.
        ValueError: A str in ``value`` contains a lone surrogate.
    """
    check_storable(value, label)
    text = _codec.encode(value)
    try:
        # A str with lone surrogates encodes to JSON, but SQLite takes UTF-8.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{label} contains a str with a lone surrogate, which is not valid "
            "UTF-8; store it as bytes instead"
        ) from None
    return text


def key_text_of(key: Any) -> str:
    """Return the canonical text of a lock or state key.

    Raises:
        TypeError: The key is not hashable or would need pickle.
        ValueError: The key contains a str with a lone surrogate.
    """
    if type(key) is not str:
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"key {key!r} is not hashable; use a str, int, bytes or a tuple of them"
            ) from None
    return encode_storable(key, f"key {key!r}")


def _check_identity(path: Path, conn: sqlite3.Connection) -> None:
    """Create the schema in an empty file, or check that the file is a store."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if application_id == 0 and conn.execute(COUNT_TABLES).fetchone()[0] == 0:
        for statement in CREATE:
            conn.execute(statement)
        return
    if application_id != APPLICATION_ID:
        raise sqlite_file.path_error(
            path,
            _WHAT,
            "it is an SQLite file but not a batchtools shared state store; "
            "give another path",
        )
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite_file.path_error(
            path,
            _WHAT,
            f"it has schema version {version}, newer than this batchtools "
            f"supports ({SCHEMA_VERSION}); upgrade batchtools or give another path",
        )
