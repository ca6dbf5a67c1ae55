"""The journal: one SQLite file per run, written by one thread.

Data flow::

    engine (event loop) --ops--> queue --> writer thread --SQL--> journal.db
           ^                                   |
           +------ commit watermark, register results (call_soon_threadsafe)

The engine never touches SQLite. It posts operations (register items,
update an item's state, add a failed attempt) that return at once. The
writer thread applies them inside one open transaction and commits the
group every `COMMIT_INTERVAL` seconds or `COMMIT_OPS` operations. Then
it reports to the engine how many operations are durable. A new item is
staged until the commit, and its state updates are merged into it, so an
item read and finished between two commits costs one row insert. A crash
loses at most the uncommitted group: at-least-once, never a false success.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import queue
import resource
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil

from batchtools import _codec
from batchtools._exceptions import (
    ConfigurationError,
    JournalError,
    JournalLockedError,
    JournalMismatchError,
)
from batchtools.fs._atomic_io import sync_folder
from batchtools.journal import _schema as sql

log = logging.getLogger("batchtools.journal")

COMMIT_INTERVAL = 0.05
COMMIT_OPS = 4000
_NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "fuse.sshfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "fuse.s3fs",
    }
)


@dataclass(slots=True)
class RunRecord:
    """The run row of a journal.

    Attributes:
        run_id: The run's id.
        signature: What must match for a resume (task, template, options).
        spec: How to run it again: the task, input and options as JSON data.
        created: Creation time, seconds since the epoch.
        updated: Last change of the run's state.
        state: ``running``, ``interrupted`` or ``finished``.
        session: How many sessions (run, resume, retry) have opened it.
        input_complete: Whether a session read the whole input.
    """

    run_id: str
    signature: str
    spec: dict[str, Any]
    created: float
    updated: float
    state: str
    session: int
    input_complete: bool


@dataclass(slots=True)
class ItemRow:
    """An item as the journal stores it.

    Attributes:
        seq: The item's position in the input when first read.
        key: The item's key.
        state: Its state name.
        attempts: Attempts made so far.
        lost_workers: Worker processes it has killed so far.
        value: The value as JSON text, if stored.
        error: The last error as JSON text, if any.
        reason: Why it was skipped or cancelled.
        item: The item, decoded, where the query reads it.
        new: Whether this session registered it for the first time.
    """

    seq: int
    key: str
    state: str
    attempts: int = 0
    lost_workers: int = 0
    value: str | None = None
    error: str | None = None
    reason: str | None = None
    item: Any = None
    new: bool = True


def check_path(path: Path) -> None:
    """Reject journal paths that cannot be used safely.

    Raises:
        JournalError: The path contains a NUL character, is a symlink, or is
            on a network filesystem, where SQLite's WAL mode cannot share
            memory between processes.
    """
    if "\0" in str(path):
        raise JournalError(
            repr(str(path)), "a path cannot contain a NUL character; remove it"
        )
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise JournalError(
            str(path), "it is a symbolic link; give the real file's path instead"
        )
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise JournalError(
            str(path), "it is not a regular file; give the path of a journal file"
        )
    fstype = _filesystem_type(path.parent if info is None else path)
    if fstype in _NETWORK_FILESYSTEMS:
        raise JournalError(
            str(path),
            f"it is on a network filesystem ({fstype}), where SQLite's WAL mode "
            "does not work; put the journal on a local disk",
        )


def _filesystem_type(path: Path) -> str:
    resolved = str(path.resolve())
    best, fstype = "", ""
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, fstype = mount, partition.fstype
    return fstype


def _check_length(path: Path) -> None:
    """Reject a file shorter than the page count in its SQLite header.

    SQLite itself reads such a file until it reaches the missing part, and
    a writer may then extend it, so a journal cut short (a copy stopped
    early, a full disk) would be resumed and damaged further. A write-ahead
    log with frames may still hold the missing pages after a crash during
    a checkpoint; SQLite replays it, so the check is skipped then.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
            length = os.fstat(file.fileno()).st_size
        wal = os.stat(f"{path}-wal").st_size if os.path.exists(f"{path}-wal") else 0
    except OSError:
        return  # opening the database reports it
    if not header.startswith(b"SQLite format 3\0") or wal > 32:
        return
    if len(header) < 100:
        raise JournalError(
            str(path),
            f"it is {length:,} bytes long, shorter than an SQLite header, so it "
            "was cut short; its items cannot be resumed, so start the run again "
            "with another --journal path",
            resumable=False,
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid only when its version matches the change counter.
    if pages == 0 or header[92:96] != header[24:28]:
        return
    if length < pages * page_size:
        raise JournalError(
            str(path),
            f"it is {length:,} bytes long, but its header counts {pages:,} pages "
            f"of {page_size:,} bytes, so it was cut short; its items cannot be "
            "resumed, so start the run again with another --journal path",
            resumable=False,
        )


_DAMAGED_NEXT_STEP = (
    "start the run again with another --journal path, and keep this file to "
    "salvage what it holds (sqlite3 PATH .recover)"
)


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        uri = f"file:{path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    else:
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=5.0, check_same_thread=False
        )
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _io_error_hint(then: str) -> str:
    """Return the advice for SQLite's 'disk I/O error', naming a file size limit."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY:
        return (
            f"; this process may write files of at most {limit:,} bytes (File too "
            f"large: ulimit -f), so raise that limit, then {then}"
        )
    return f"; check the disk's free space and health, then {then}"


def _translate(path: Path, error: sqlite3.Error, doing: str) -> JournalError:
    text = str(error)
    hint = ""
    # Nothing is left to resume when the journal could not be created.
    then = (
        "run the command again"
        if doing == "creating"
        else "run 'batchtools resume' on it"
    )
    if "full" in text.lower():
        hint = f"; free disk space, then {then}"
    elif "disk i/o error" in text.lower():
        hint = _io_error_hint(then)
    elif (
        "not a database" in text
        or "malformed" in text
        # A damaged byte inside a text value, which no page check finds.
        or "Could not decode to UTF-8" in text
    ):
        hint = (
            "; the file is damaged or not a journal, and its items cannot be "
            f"resumed: {_DAMAGED_NEXT_STEP}"
        )
        return JournalError(str(path), f"{doing} failed: {text}{hint}", resumable=False)
    return JournalError(str(path), f"{doing} failed: {text}{hint}")


def check_existing_file(path: Path) -> None:
    """Reject a journal path that is missing or not a regular file.

    Raises:
        JournalError: Nothing is at ``path``, or a folder, a device or a
            pipe is.
    """
    if not path.exists():
        raise JournalError(str(path), "no such journal file")
    if not path.is_file():
        raise JournalError(
            str(path), "it is not a regular file; give the path of a journal file"
        )


def read_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read a journal's run record without taking its writer lock.

    Raises:
        JournalError: The file is missing, damaged or not a journal.
    """
    journal_path = Path(path)
    check_existing_file(journal_path)
    try:
        conn = _connect(journal_path, readonly=True)
    except sqlite3.Error as error:
        raise _translate(journal_path, error, "opening") from error
    try:
        _check_identity(journal_path, conn)
        row = conn.execute(sql.SELECT_RUN).fetchone()
    except sqlite3.Error as error:
        raise _translate(journal_path, error, "reading") from error
    finally:
        conn.close()
    if row is None:
        raise JournalError(str(journal_path), "it has no run record; it is damaged")
    try:
        spec = json.loads(row[2])
    except ValueError:
        raise JournalError(
            str(journal_path), "its run record is damaged: the spec is not JSON"
        ) from None
    return RunRecord(
        run_id=row[0],
        signature=row[1],
        spec=spec,
        created=row[3],
        updated=row[4],
        state=row[5],
        session=row[6],
        input_complete=bool(row[7]),
    )


def _check_pages(path: Path) -> None:
    """Reject a journal whose pages SQLite finds damaged, before anything writes.

    A resume writes a session record first and reads the items later, so
    without this check a damaged page deep in the file would be found only
    after the file was changed. ``PRAGMA quick_check`` reads every page
    once: about 0.3 s for a journal of a million items (194 MiB) once the
    file is in the page cache.
    """
    try:
        conn = _connect(path, readonly=True)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise _translate(path, error, "checking") from error
    if problems != ["ok"]:
        lines = [
            line.strip()
            for problem in problems
            for line in str(problem).splitlines()
            if line.strip() and not line.startswith("***")
        ]
        raise JournalError(
            str(path),
            f"it is damaged ({'; '.join(lines)}), and its items cannot be "
            f"resumed: {_DAMAGED_NEXT_STEP}",
            resumable=False,
        )


def _check_identity(path: Path, conn: sqlite3.Connection) -> None:
    _check_length(path)
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if application_id != sql.APPLICATION_ID:
        raise JournalError(
            str(path),
            "it is an SQLite file but not a batchtools journal; give the path of "
            "a journal, or another --journal path for a new run",
        )
    if version > sql.SCHEMA_VERSION:
        raise JournalError(
            str(path),
            f"it has schema version {version}, newer than this batchtools "
            f"supports ({sql.SCHEMA_VERSION}); upgrade batchtools to use it",
        )


def _migrate(path: Path, conn: sqlite3.Connection) -> None:
    """Bring the journal's schema to the current version, inside the open transaction.

    A journal written by an earlier version gains the columns added since.
    Its rows get the durations that earlier readers computed, and null in
    the other new columns.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= sql.SCHEMA_VERSION:
        return
    for step in range(version, sql.SCHEMA_VERSION):
        for statement in sql.MIGRATIONS[step]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={sql.SCHEMA_VERSION}")
    log.info(
        "journal %s upgraded from schema version %d to %d",
        path,
        version,
        sql.SCHEMA_VERSION,
    )


def count_states(path: str | os.PathLike[str]) -> dict[str, int]:
    """Return how many items of the journal are in each state."""
    journal_path = Path(path)
    conn = _connect(journal_path, readonly=True)
    try:
        return dict(conn.execute(sql.COUNT_STATES).fetchall())
    except sqlite3.Error as error:
        raise _translate(journal_path, error, "reading") from error
    finally:
        conn.close()


def iter_items(
    path: str | os.PathLike[str], states: Sequence[str] | None = None, block: int = 500
) -> Iterator[ItemRow]:
    """Yield the journal's items in input order, optionally only in ``states``.

    Reads in blocks through a read-only connection, so memory stays flat
    and a live run's writer is not disturbed.
    """
    journal_path = Path(path)
    conn = _connect(journal_path, readonly=True)
    try:
        last = -1
        while True:
            if states is None:
                rows = conn.execute(sql.SELECT_ITEMS_FROM, (last, block)).fetchall()
            else:
                rows = conn.execute(
                    sql.SELECT_ITEMS_IN_STATES, (last, json.dumps(list(states)), block)
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _stored_item(row)
            last = rows[-1][0]
    except sqlite3.Error as error:
        raise _translate(journal_path, error, "reading") from error
    finally:
        conn.close()


def _stored_item(row: tuple[Any, ...]) -> ItemRow:
    """Build an item from a row of ``seq, key, item, state, attempts, ...``."""
    return ItemRow(
        seq=row[0],
        key=row[1],
        item=_codec.decode(row[2]),
        state=row[3],
        attempts=row[4],
        lost_workers=row[5],
        value=row[6],
        error=row[7],
        reason=row[8],
        new=False,
    )


def item_history(
    path: str | os.PathLike[str], key: str
) -> tuple[ItemRow, list[tuple[int, float, float, str]]] | None:
    """Return one item and its failed attempts, or ``None`` if the key is unknown.

    ``key`` may be the start of a key, as the summary prints it, when only
    one item's key starts with it.

    Raises:
        JournalError: The journal cannot be read, or the start of a key
            matches several items.
    """
    journal_path = Path(path)
    conn = _connect(journal_path, readonly=True)
    try:
        # A repeated item's key is its digest with "-N" appended.
        base = key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key
        row = None
        for digest in dict.fromkeys((key, base)):
            row = conn.execute(
                sql.SELECT_ITEM_BY_KEY, (digest_hash(digest), key)
            ).fetchone()
            if row is not None:
                break
        if row is None:
            # A scan, but only for a command a person types.
            pattern = key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = conn.execute(
                sql.SELECT_ITEMS_BY_KEY_START, (pattern + "%",)
            ).fetchall()
            if len(rows) > 1:
                raise ConfigurationError(
                    f"several items of journal {journal_path} have keys that "
                    f"start with {key!r}; give more of the key"
                )
            if not rows:
                return None
            row = rows[0]
        attempts = conn.execute(sql.SELECT_ATTEMPTS, (row[0],)).fetchall()
    finally:
        conn.close()
    return _stored_item(row), [tuple(a) for a in attempts]


class _Flush:
    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback


class _Register:
    __slots__ = ("callback", "rows")

    def __init__(
        self,
        rows: list[tuple[int, str, str]],
        callback: Callable[[list[ItemRow] | BaseException], None],
    ) -> None:
        self.rows = rows
        self.callback = callback


_CLOSE = object()


class Journal:
    """The writer side of one run's journal file.

    Use `create` for a new run or `open_existing` to resume one; both take
    the writer lock. Then `start` the writer thread on the engine's loop,
    post operations, and `close` at the end.
    """

    def __init__(self, path: Path, run: RunRecord, lock: filelock.BaseFileLock) -> None:
        self.path = path
        self.run = run
        self._lock = lock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_commit: Callable[[int], None] | None = None
        self._on_error: Callable[[JournalError], None] | None = None
        self.submitted = 0
        self.committed = 0
        self.error: JournalError | None = None
        self.session = run.session
        self._fresh = False
        self._replacement: tuple[str, dict[str, Any]] | None = None
        self._seen: _DigestFilter | None = None

    # -- opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        run_id: str,
        signature: str,
        spec: dict[str, Any],
    ) -> Journal:
        """Create a new journal file for a run and take its writer lock.

        Raises:
            JournalError: The file exists, or cannot be created.
        """
        journal_path = Path(path)
        check_path(journal_path)
        if journal_path.parent != Path() and not journal_path.parent.exists():
            journal_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = _take_lock(journal_path)
        try:
            if journal_path.exists():
                raise JournalError(
                    str(journal_path),
                    "it already exists; use 'batchtools resume' to continue that "
                    "run, or choose another path",
                )
            now = time.time()
            _create_file(journal_path, (run_id, signature, json.dumps(spec), now, now))
        except sqlite3.Error as error:
            lock.release()
            _remove_pid_file(journal_path)
            raise _translate(journal_path, error, "creating") from error
        except OSError as error:
            lock.release()
            _remove_pid_file(journal_path)
            raise JournalError(
                str(journal_path),
                f"creating failed: {error.strerror or error}; fix that (free disk "
                "space, say), then run the command again",
            ) from error
        except BaseException:
            lock.release()
            _remove_pid_file(journal_path)
            raise
        run = RunRecord(run_id, signature, spec, now, now, "running", 0, False)
        journal = cls(journal_path, run, lock)
        journal._fresh = True
        journal._seen = _DigestFilter()
        return journal

    @classmethod
    def open_existing(
        cls,
        path: str | os.PathLike[str],
        *,
        signature: str | None = None,
        force: bool = False,
        spec: dict[str, Any] | None = None,
    ) -> Journal:
        """Open a journal to resume or retry its run, taking the writer lock.

        Args:
            path: The journal file.
            signature: The signature of the run about to start; a journal
                with a different one is rejected unless ``force``.
            force: Accept a different signature; the journal then records
                ``signature`` and ``spec``, so that a later resume or retry
                runs the new task.
            spec: The description of the run about to start.

        Raises:
            JournalLockedError: Another live process holds the journal.
            JournalMismatchError: The journal belongs to a different run.
            JournalError: The file is missing, damaged or not a journal.
        """
        journal_path = Path(path)
        check_path(journal_path)
        run = read_run(journal_path)
        lock = _take_lock(journal_path)
        try:
            _check_pages(journal_path)
        except BaseException:
            lock.release()
            _remove_pid_file(journal_path)
            raise
        if signature is not None and run.signature != signature and not force:
            lock.release()
            _remove_pid_file(journal_path)
            raise JournalMismatchError(
                str(journal_path),
                "it records a different run (another command, task or options); "
                "use a new journal path, or pass --force to reuse it",
            )
        journal = cls(journal_path, run, lock)
        if signature is not None and run.signature != signature and spec is not None:
            journal._replacement = (signature, spec)
        return journal

    # -- the writer thread ---------------------------------------------

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_commit: Callable[[int], None] | None = None,
        on_error: Callable[[JournalError], None] | None = None,
    ) -> None:
        """Start the writer thread and a new session of the run.

        Raises:
            JournalError: The journal cannot be written.
        """
        self._loop = loop
        self._on_commit = on_commit
        self._on_error = on_error
        try:
            conn = _connect(self.path)
            for pragma in sql.PRAGMAS:
                conn.execute(pragma)
            conn.execute("BEGIN IMMEDIATE")
            _migrate(self.path, conn)
            self.session = conn.execute(sql.START_SESSION, (time.time(),)).fetchone()[0]
            if self._replacement is not None:
                signature, spec = self._replacement
                conn.execute(sql.REPLACE_SPEC, (signature, json.dumps(spec)))
                self.run.signature, self.run.spec = signature, spec
            conn.execute(
                sql.INSERT_EVENT,
                (
                    time.time(),
                    self.session,
                    "session-start",
                    json.dumps({"pid": os.getpid()}),
                ),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise _translate(self.path, error, "starting a session") from error
        self._thread = threading.Thread(
            target=self._write_loop,
            args=(conn,),
            name="batchtools-journal",
            daemon=True,
        )
        self._thread.start()

    def register(
        self,
        rows: list[tuple[int, str, str]],
        callback: Callable[[list[ItemRow] | BaseException], None],
    ) -> None:
        """Match items read from the input with the journal's rows.

        Args:
            rows: ``(seq, encoded item, digest)`` per item, in input order.
            callback: Called on the loop with one `ItemRow` per item (new
                items are inserted as pending), or with the error.
        """
        self._post(_Register(rows, callback))

    @property
    def fresh(self) -> bool:
        """Whether this session created the journal, so it has no earlier items."""
        return self._fresh

    def register_new(self, rows: list[tuple[int, str, str]]) -> list[str | None]:
        """Register, without a round trip, items certain not to repeat others.

        Works only for a journal this session created. A filter of the
        digests registered so far shows which items are certainly new, and
        those are posted as pending rows with the digest as their key.

        Args:
            rows: ``(seq, encoded item, digest)`` per item.

        Returns:
            Per item its key, or ``None`` where it may repeat an earlier
            item; those must go through `register`.
        """
        seen = self._seen
        if seen is None:
            return [None] * len(rows)
        keys: list[str | None] = []
        staged = []
        session = self.session
        for seq, text, digest in rows:
            if seen.add(digest):
                staged.append(_pending_row(seq, digest, text, session))
                keys.append(digest)
            else:
                keys.append(None)
        if staged:
            self._post(("n", staged))
        return keys

    def update(
        self,
        seq: int,
        state: str,
        *,
        attempts: int | None = None,
        lost_workers: int | None = None,
        value: str | None = None,
        error: str | None = None,
        reason: str | None = None,
        started: float | None = None,
        ended: float | None = None,
        duration: float | None = None,
        slot: int | None = None,
        worker: str | None = None,
    ) -> int:
        """Record an item's new state; return the operation's number.

        ``duration``, ``slot`` and ``worker`` describe the item's last
        attempt, which ended at ``ended``.
        """
        return self._post(
            (
                "u",
                [
                    seq,
                    state,
                    attempts,
                    lost_workers,
                    value,
                    error,
                    reason,
                    started,
                    ended,
                    duration,
                    slot,
                    worker,
                ],
            )
        )

    def add_attempt(
        self,
        seq: int,
        number: int,
        started: float,
        duration: float,
        error: str,
        *,
        slot: int | None = None,
        worker: str | None = None,
    ) -> int:
        """Record a failed attempt; return the operation's number."""
        return self._post(("a", [seq, number, started, duration, error, slot, worker]))

    def event(self, kind: str, detail: dict[str, Any]) -> int:
        """Record a run event (interruption, halt, end of input)."""
        return self._post(("e", kind, json.dumps(detail)))

    def mark_input_complete(self) -> int:
        """Record that this session read the whole input."""
        return self._post(("i",))

    def set_state(self, state: str) -> int:
        """Record the run's state: ``running``, ``interrupted`` or ``finished``."""
        return self._post(("r", state))

    def flush(self, callback: Callable[[], None]) -> None:
        """Commit what was posted so far; call ``callback`` on the loop after."""
        self._post(_Flush(callback))

    async def aflush(self) -> None:
        """Commit what was posted so far and wait for it."""
        assert self._loop is not None
        done = self._loop.create_future()
        self.flush(lambda: _resolve(done, None))
        await done

    def close(self) -> None:
        """Commit, stop the writer thread and release the lock."""
        if self._thread is not None:
            self._queue.put(_CLOSE)
            self._thread.join()
            self._thread = None
        if self._lock.is_locked:
            self._lock.release()
        _remove_pid_file(self.path)

    def _post(self, op: Any) -> int:
        self.submitted += 1
        self._queue.put(op)
        return self.submitted

    def _call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # The loop has closed, so no caller waits for this any more.

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        writer = _GroupWriter(conn, self.session, fresh=self._fresh)
        applied = 0
        flushes: list[Callable[[], None]] = []
        closing = False
        while not closing:
            timeout = writer.time_left()
            try:
                op = self._queue.get(timeout=timeout)
            except queue.Empty:
                op = None
            ops = [] if op is None else [op]
            while len(ops) < COMMIT_OPS:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for op in ops:
                    if op is _CLOSE:
                        closing = True
                        continue
                    # Count every posted operation, so that the number
                    # committed matches `submitted` once all are written.
                    applied += 1
                    if isinstance(op, _Flush):
                        flushes.append(op.callback)
                    elif isinstance(op, _Register):
                        self._call_soon(op.callback, writer.register(op.rows))
                    else:
                        writer.apply(op)
                if closing or flushes or writer.due():
                    writer.commit()
                    self.committed = applied
                    if self._on_commit is not None:
                        self._call_soon(self._on_commit, applied)
                    for callback in flushes:
                        self._call_soon(callback)
                    flushes.clear()
            except sqlite3.Error as error:
                self._fail(_translate(self.path, error, "writing"), conn, flushes)
                return
            except Exception as error:
                # A bug here would otherwise leave the run waiting for a
                # commit forever; it ends the run like a failed write.
                log.exception("journal %s: writing failed", self.path)
                failure = JournalError(
                    str(self.path),
                    f"writing failed: {type(error).__name__}: {error}; this is a "
                    "bug in batchtools, please report it. What was committed is "
                    "kept, so run 'batchtools resume' on it",
                )
                self._fail(failure, conn, flushes)
                return
        conn.close()

    def _fail(
        self,
        error: JournalError,
        conn: sqlite3.Connection,
        flushes: list[Callable[[], None]],
    ) -> None:
        # The run ends with this error, which its caller reports; a log line
        # at ERROR would show it twice.
        log.debug("%s", error)
        self.error = error
        try:
            conn.rollback()
            conn.close()
        except sqlite3.Error:
            pass
        if self._on_error is not None:
            self._call_soon(self._on_error, error)
        for callback in flushes:
            self._call_soon(callback)
        # Reply to what is still queued, so that no caller waits forever.
        while True:
            op = self._queue.get()
            if op is _CLOSE:
                return
            if isinstance(op, _Flush):
                self._call_soon(op.callback)
            elif isinstance(op, _Register):
                self._call_soon(op.callback, error)


class _GroupWriter:
    """Applies operations inside one open transaction; runs on the writer thread.

    New items are staged in memory until the group commits, and state
    updates of staged items are merged into them, so an item registered and
    finished within one group costs one INSERT and no UPDATE.
    """

    def __init__(self, conn: sqlite3.Connection, session: int, fresh: bool) -> None:
        self.conn = conn
        self.session = session
        # A journal made by this session has no rows from earlier sessions
        # to match, so registering skips that lookup.
        self.fresh = fresh
        self.staged: dict[int, list[Any]] = {}
        self.staged_keys: set[str] = set()
        self.updates: dict[int, list[Any]] = {}
        self.attempts: list[list[Any]] = []
        self.opened: float | None = None
        self.pending_ops = 0

    def time_left(self) -> float | None:
        if self.opened is None:
            return None
        return max(0.0, self.opened + COMMIT_INTERVAL - time.monotonic())

    def due(self) -> bool:
        if self.opened is None:
            return False
        return (
            self.pending_ops >= COMMIT_OPS
            or time.monotonic() - self.opened >= COMMIT_INTERVAL
        )

    def _begin(self) -> None:
        if self.opened is None:
            self.conn.execute("BEGIN IMMEDIATE")
            self.opened = time.monotonic()

    def apply(self, op: Any) -> None:
        self._begin()
        self.pending_ops += 1
        kind = op[0]
        if kind == "u":
            self._update(op[1])
        elif kind == "n":
            for row in op[1]:
                self.staged[row[0]] = row
                self.staged_keys.add(row[1])
        elif kind == "a":
            self.attempts.append(op[1])
        elif kind == "e":
            self.conn.execute(
                sql.INSERT_EVENT, (time.time(), self.session, op[1], op[2])
            )
        elif kind == "i":
            self.conn.execute(sql.SET_INPUT_COMPLETE)
        elif kind == "r":
            self.conn.execute(sql.SET_RUN_STATE, (op[1], time.time()))

    def _update(self, row: list[Any]) -> None:
        seq, state = row[0], row[1]
        staged = self.staged.get(seq)
        if staged is not None:
            # Staged row: [seq, key, digest, item, claimed, state, attempts,
            # lost_workers, value, error, reason, started, ended, duration,
            # slot, worker].
            staged[5] = state
            for offset in range(2, 12):
                if row[offset] is not None:
                    staged[offset + 4] = row[offset]
            if state == "succeeded":
                staged[9] = None
            return
        earlier = self.updates.get(seq)
        if earlier is not None:
            row = [
                new if new is not None else old
                for new, old in zip(row, earlier, strict=True)
            ]
            if state == "succeeded":
                row[5] = None
        self.updates[seq] = row

    def _write_staged(self) -> None:
        if not self.staged:
            return
        rows = list(self.staged.values())
        size = sql.STAGED_ROWS_PER_STATEMENT
        start = 0
        while start < len(rows):
            # Full statements, then the rest in powers of two: sqlite3 keeps
            # each statement text it has seen, with its last bound values, so
            # a statement per group size would hold a group's items for each
            # of up to 1,900 sizes.
            left = len(rows) - start
            count = size if left >= size else 1 << (left.bit_length() - 1)
            chunk = rows[start : start + count]
            values = [v for row in chunk for v in (*row, digest_hash(row[2]))]
            self.conn.execute(sql.insert_staged(count), values)
            start += count
        self.staged.clear()
        self.staged_keys.clear()

    def _write_updates(self) -> None:
        if self.updates:
            rows = json.dumps(list(self.updates.values()))
            self.conn.execute(sql.UPDATE_ITEMS, (rows,))
            self.updates.clear()

    def commit(self) -> None:
        if self.opened is None:
            return
        self._write_staged()
        self._write_updates()
        if self.attempts:
            self.conn.execute(sql.INSERT_ATTEMPTS, (json.dumps(self.attempts),))
            self.attempts.clear()
        self.conn.execute("COMMIT")
        self.opened = None
        self.pending_ops = 0

    def register(
        self, rows: list[tuple[int, str, str]]
    ) -> list[ItemRow] | BaseException:
        self._begin()
        try:
            return self._register(rows)
        except sqlite3.Error:
            raise
        except Exception as error:
            return error

    def _register(self, rows: list[tuple[int, str, str]]) -> list[ItemRow]:
        result: list[ItemRow | None] = [None] * len(rows)
        if self.fresh:
            self._stage_new(rows, list(range(len(rows))), result)
            return [row for row in result if row is not None]
        # Updates may concern rows that this lookup reads: write them first.
        self._write_staged()
        self._write_updates()
        session = self.session
        payload = json.dumps([[seq, digest] for seq, _, digest in rows])
        stored = self.conn.execute(sql.MATCH_BY_SEQ, (payload,)).fetchall()
        claimed: list[int] = []
        new: list[int] = []
        moved: list[int] = []
        for index, (row, match) in enumerate(zip(rows, stored, strict=True)):
            if match[1] is None:
                new.append(index)
            elif match[1] == row[2] and match[9] != session:
                claimed.append(row[0])
                result[index] = ItemRow(
                    seq=row[0],
                    key=match[2],
                    state=match[3],
                    attempts=match[4],
                    lost_workers=match[5],
                    value=match[6],
                    error=match[7],
                    reason=match[8],
                    new=False,
                )
            else:
                moved.append(index)
        if claimed:
            self.conn.execute(sql.CLAIM_SEQS, (session, json.dumps(claimed)))
        if new:
            self._stage_new(rows, new, result)
        if moved:
            # Moved items are matched and numbered by queries, which must
            # see the rows just staged.
            self._write_staged()
        for index in moved:
            result[index] = self._match_moved(rows[index])
        return [row for row in result if row is not None]

    def _stage_new(
        self,
        rows: list[tuple[int, str, str]],
        indexes: list[int],
        result: list[ItemRow | None],
    ) -> None:
        wanted = json.dumps([[digest_hash(rows[i][2]), rows[i][2]] for i in indexes])
        taken = {
            digest for (digest,) in self.conn.execute(sql.EXISTING_DIGESTS, (wanted,))
        }
        for i in indexes:
            seq, text, digest = rows[i]
            if digest in taken or digest in self.staged_keys:
                # A repeated item, or on resume an item that moved past the
                # rows read before. Both are rare, so take the slow, exact
                # path, which claims an unclaimed row or numbers a new copy.
                # Writing the staged rows clears `staged_keys`, so `taken`
                # keeps their keys for the later items of this block.
                taken |= self.staged_keys
                self._write_staged()
                result[i] = self._match_moved(rows[i])
                continue
            self.staged_keys.add(digest)
            self.staged[seq] = _pending_row(seq, digest, text, self.session)
            result[i] = ItemRow(seq=seq, key=digest, state="pending")

    def _insert_duplicate(self, seq: int, text: str, digest: str) -> ItemRow:
        if self.conn.execute(sql.SEQ_EXISTS, (seq,)).fetchone() is not None:
            # The input changed order, so this position belongs to another
            # item already: give this one the next free position.
            (last,) = self.conn.execute(sql.MAX_SEQ).fetchone()
            seq = last + 1
        dhash = digest_hash(digest)
        (count,) = self.conn.execute(sql.COUNT_DIGEST, (dhash, digest)).fetchone()
        key = f"{digest}-{count}" if count else digest
        self.conn.execute(
            sql.INSERT_ITEM, (seq, key, digest, dhash, text, self.session)
        )
        return ItemRow(seq=seq, key=key, state="pending")

    def _match_moved(self, row: tuple[int, str, str]) -> ItemRow:
        seq, text, digest = row
        found = self.conn.execute(
            sql.FIND_UNCLAIMED, (digest_hash(digest), digest, self.session)
        ).fetchone()
        if found is None:
            return self._insert_duplicate(seq, text, digest)
        self.conn.execute(sql.CLAIM_SEQ, (self.session, found[0]))
        return ItemRow(
            seq=found[0],
            key=found[1],
            state=found[2],
            attempts=found[3],
            lost_workers=found[4],
            value=found[5],
            error=found[6],
            reason=found[7],
            new=False,
        )


def digest_hash(digest: str) -> int:
    """Return the signed 64-bit hash of a digest that the journal indexes."""
    if len(digest) >= 16:
        try:
            return int(digest[:16], 16) - (1 << 63)
        except ValueError:
            pass  # A key function's text: hash it like any other text.
    raw = hashlib.blake2b(digest.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(raw.digest(), "big") - (1 << 63)


def _pending_row(seq: int, key: str, text: str, session: int) -> list[Any]:
    """Return a staged row of a new item, as `sql.STAGED_COLUMNS` orders them.

    The last column, the digest hash, is added when the row is written.
    """
    # seq, key, digest, item, claimed, state, attempts, lost_workers, value,
    # error, reason, started, ended, duration, slot, worker
    return [seq, key, key, text, session, "pending", 0, 0] + [None] * 8


class _DigestFilter:
    """A Bloom filter of digests that grows in layers as items arrive.

    It returns "certainly not seen" or "maybe seen" in about ten bits per
    item, so a fresh run learns that an item repeats none before it without
    keeping every digest in memory or asking the journal.
    """

    _HASHES = 4
    _BITS_PER_ITEM = 10

    def __init__(self, first_capacity: int = 65536) -> None:
        self._layers: list[bytearray] = []
        self._capacity = first_capacity
        self._count = 0
        self._limit = 0
        self._grow()

    def _grow(self) -> None:
        self._capacity *= 2 if self._layers else 1
        self._layers.append(bytearray(self._capacity * self._BITS_PER_ITEM // 8))
        self._limit += self._capacity

    def add(self, digest: str) -> bool:
        """Add ``digest``; return whether it was certainly not there before."""
        first = hash(digest)
        step = (first >> 32) | 1
        for layer in self._layers:
            bits = len(layer) * 8
            for i in range(self._HASHES):
                position = (first + i * step) % bits
                if not layer[position >> 3] & (1 << (position & 7)):
                    break
            else:
                return False
        if self._count >= self._limit:
            self._grow()
        layer = self._layers[-1]
        bits = len(layer) * 8
        for i in range(self._HASHES):
            position = (first + i * step) % bits
            layer[position >> 3] |= 1 << (position & 7)
        self._count += 1
        return True


def _create_file(path: Path, run_row: tuple[Any, ...]) -> None:
    """Write a new journal with its schema and run record, then put it at ``path``.

    The file is built under a temporary name in the same folder and linked
    to ``path`` only when complete, so a process killed or a disk filled
    while creating it never leaves a half-made journal at ``path``. A
    temporary file left by a killed process is removed by the next
    creation of that journal: the caller holds the journal's lock, so no
    live process is creating it.
    """
    prefix = f".{path.name}.creating-"
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        with contextlib.suppress(OSError):
            stale.unlink()
    temporary = path.with_name(f"{prefix}{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        conn = _connect(temporary)
        try:
            # With a rollback journal, a full disk fails the commit itself,
            # not a silent checkpoint at close. The first session enables WAL.
            conn.execute("PRAGMA journal_mode=DELETE")
            for pragma in sql.PRAGMAS:
                if not pragma.startswith("PRAGMA journal_mode"):
                    conn.execute(pragma)
            conn.execute("BEGIN IMMEDIATE")
            for statement in sql.CREATE:
                conn.execute(statement)
            conn.execute(sql.INSERT_RUN, run_row)
            conn.execute("COMMIT")
        finally:
            conn.close()
        _check_created(temporary)
        _link_new(temporary, path)
    finally:
        for leftover in (
            temporary,
            Path(f"{temporary}-journal"),
            Path(f"{temporary}-wal"),
            Path(f"{temporary}-shm"),
        ):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    with contextlib.suppress(OSError):
        sync_folder(str(path.parent))  # the journal is complete without it


def _check_created(path: Path) -> None:
    """Read back a journal just made, so that a short write is found now.

    Raises:
        sqlite3.Error: The file is damaged or lacks its run record.
    """
    conn = _connect(path, readonly=True)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"] or conn.execute(sql.SELECT_RUN).fetchone() is None:
            raise sqlite3.DatabaseError("database disk image is malformed")
    finally:
        conn.close()


def _link_new(temporary: Path, path: Path) -> None:
    """Give ``temporary`` the name ``path``, which must not exist yet."""
    try:
        # A link, unlike a rename, fails if another file took the name.
        os.link(temporary, path)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # The filesystem has no hard links (FAT, some network mounts). The
        # caller holds the journal's lock, so only another program could
        # take the name between this check and the rename.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        os.rename(temporary, path)


def _pid_file(path: Path) -> Path:
    return path.with_name(path.name + ".pid")


def _remove_pid_file(path: Path) -> None:
    try:
        _pid_file(path).unlink()
    except FileNotFoundError:
        pass


def _take_lock(path: Path) -> filelock.BaseFileLock:
    """Take the journal's writer lock; the holder's pid goes to a sidecar file."""
    lock = filelock.FileLock(
        str(path) + ".lock", timeout=0, mode=0o600, thread_local=False
    )
    try:
        lock.acquire()
    except filelock.Timeout:
        holder: int | None
        try:
            holder = int(_pid_file(path).read_text().strip())
        except (OSError, ValueError):
            holder = None
        raise JournalLockedError(str(path), holder) from None
    except OSError as error:
        raise JournalError(
            str(path), f"cannot create its lock file: {error}"
        ) from error
    try:
        _pid_file(path).write_text(f"{os.getpid()}\n")
    except OSError:
        pass  # The pid only improves the message of a second run.
    return lock


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
