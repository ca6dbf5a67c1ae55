"""The audit log: one JSON line for each run start, run end and failed item.

Each record names the time, user, host, pid and run id, so that a file
shared by many runs still shows who ran what and what failed. The format
is described in docs/audit.md.

Written here rather than with `logging.handlers.RotatingFileHandler`,
because that handler writes on the caller's thread, opens the file with the
umask's mode, follows symbolic links, and rotates without a lock, so two
processes that share a file lose records at the rotation.

How records reach the file:

- The engine's callbacks only append a record to a buffer, under a lock
  that is never held during I/O, so a slow disk or a busy file lock cannot
  stall the engine, and no record is dropped for being late.
- A daemon thread writes the start record at once, then the buffer every
  ``flush_interval`` seconds. `AuditLog.on_finish` writes on the engine's
  thread, so that the end of a run is on disk before the run returns.
  `AuditLog.close`, also called at interpreter exit, writes what is left.
- Each write holds an exclusive ``flock`` on ``PATH.lock``, opens ``PATH``
  with ``O_APPEND | O_NOFOLLOW``, rotates it when it is full, and appends
  the whole buffer in one ``os.write`` call. After ``kill -9``, at most the
  records of the last interval are missing.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import pwd
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock

from batchtools._exceptions import (
    CommandFailedError,
    ConfigurationError,
    RemoteError,
    WorkerLostError,
)
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.policy._units import parse_duration, parse_size

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine

log = logging.getLogger("batchtools.audit")

# Read access too, to check that the file ends with a newline before appending.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_MODE = 0o600
_RECORD_START = b'{"event": '
# Longer error messages are cut, so that one record stays a readable line.
_MESSAGE_LIMIT = 8192
# Seconds a write waits for another process's lock on the file; the records
# stay buffered for the next write when it times out.
_LOCK_TIMEOUT = 10.0
# Fields that are never passed to the redaction function.
_NOT_REDACTED = frozenset({"event", "time"})
_REDACTION_FAILED = "<redaction failed>"


class AuditLog:
    """An engine observer that appends JSON lines about a run to a file.

    The file is created with mode 0600. An existing file that other users
    may read or write is changed to 0600, with a warning.

    Args:
        path: The audit log file. Its folder must exist.
        task: The command's words, or the function called as
            ``module:function``, for the start and finish records. ``None``
            takes the task's name from the run's journal, if it has one.
        redact: Applied to every text value of a record (error messages,
            the command line, keys) before it is written, to mask secrets.
            ``None`` writes text as it is.
        flush_interval: Seconds between writes of buffered records, or a
            duration such as ``"200ms"`` or a `timedelta`.
        max_bytes: Rotate the file before an append would make it larger
            than this, in bytes or as a size such as ``"10M"``. ``None``
            never rotates.
        backups: How many rotated files to keep: ``PATH.1`` is the newest,
            ``PATH.N`` the oldest. Zero deletes the full file instead.

    Raises:
        ConfigurationError: ``path`` is a symbolic link or not a regular
            file, its folder does not exist, it cannot be opened for
            appending, or an option is out of range.

    Example::

        from batchtools import run
        from batchtools.observe.audit import AuditLog

        with AuditLog("audit.jsonl", redact=mask_secrets) as audit:
            run(urls, fetch, observers=[audit])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        task: str | Sequence[str] | None = None,
        redact: Callable[[str], str] | None = None,
        flush_interval: float | str | timedelta = 1.0,
        max_bytes: int | str | None = None,
        backups: int = 5,
    ) -> None:
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.task: str | list[str] | None = (
            task if task is None or isinstance(task, str) else list(task)
        )
        self.redact = redact

        self.flush_interval = parse_duration(
            flush_interval, name="audit log flush interval"
        )
        self.max_bytes = (
            None if max_bytes is None else parse_size(max_bytes, name="audit log size")
        )
        if isinstance(backups, bool) or not isinstance(backups, int) or backups < 0:
            raise ConfigurationError(
                f"backups={backups!r} must be a whole number of rotated audit "
                "log files to keep, 0 or more"
            )
        self.backups = backups

        _check_log_file(self.path)
        self._file_lock = filelock.UnixFileLock(
            f"{self.path}.lock",
            mode=_FILE_MODE,
            timeout=_LOCK_TIMEOUT,
            thread_local=False,
            preserve_lock_file=True,
            fallback_to_soft=False,
        )
        self._check_lock_file()

        self._user, self._uid = _user()
        self._host = socket.gethostname()
        self._owner_pid = os.getpid()
        self._buffer: list[dict[str, Any]] = []
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._run_id: str | None = None
        self._finished = True
        self._at_exit_registered = False
        self._write_failures = 0

    def __repr__(self) -> str:
        return f"<AuditLog {str(self.path)!r} buffered={len(self._buffer)}>"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- engine events ----------------------------------------------------

    def on_start(self, engine: Engine) -> None:
        """Buffer the run's start record and start the writer thread."""
        self._engine = engine
        self._run_id = engine.run_id
        self._finished = False
        journal = engine.journal
        record = self._record("run_started")
        record["task"] = self._task_of(engine)
        record["argv"] = list(sys.argv)
        record["journal"] = None if journal is None else os.path.abspath(journal.path)
        record["session"] = getattr(journal, "session", None)
        self._append(record)
        if not self._at_exit_registered:
            atexit.register(self.close)
            self._at_exit_registered = True
        self._start_thread()

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        """Ignore a retry: only an item's final failure is recorded."""

    def on_outcome(self, outcome: Outcome) -> None:
        """Buffer a record for an item that failed in this session.

        Failures carried over from an earlier session of the run, which
        that session recorded, are not recorded again.
        """
        if outcome.state is not State.FAILED or outcome.source != "run":
            return
        record = self._record("item_failed")
        record["key"] = outcome.key
        record["seq"] = outcome.seq
        record["attempts"] = len(outcome.attempts)
        record["error"] = _error_fields(outcome.error)
        self._append(record)

    def on_finish(self, report: Report) -> None:
        """Write the run's finish record with its counts, and stop the writes."""
        self._append(self._finish_record(report, _status(report)))
        self._finished = True
        self._stop_thread()
        self.flush()

    # -- writing ----------------------------------------------------------

    def flush(self) -> bool:
        """Write the buffered records to the file now.

        Returns:
            Whether every buffered record was written. When a write fails,
            the error is logged and the records stay buffered for the next
            write.
        """
        with self._write_lock:
            with self._buffer_lock:
                records, self._buffer = self._buffer, []
            if not records:
                return True
            data = self._encode(records)
            try:
                with self._file_lock.acquire():
                    self._append_locked(data)
            except (OSError, filelock.Timeout) as error:
                with self._buffer_lock:
                    self._buffer[:0] = records
                self._log_write_failure(error, len(records))
                return False
            if self._write_failures:
                log.warning(
                    "audit log %s: writing works again after %d failed writes",
                    self.path,
                    self._write_failures,
                )
                self._write_failures = 0
            return True

    def close(self) -> None:
        """Write what is buffered and stop the periodic writes.

        A run that started but never finished (the engine raised, or the
        process is exiting) gets a finish record with status ``aborted``
        and the counts so far. Called at interpreter exit as well; calling
        it again does nothing.
        """
        if os.getpid() != self._owner_pid:
            return  # A forked child must not write its parent's records.
        if self._engine is not None and not self._finished:
            self._finished = True
            self._append(self._finish_record(self._engine.report, "aborted"))
        self._stop_thread()
        if not self.flush():
            log.error(
                "audit log %s: %d records could not be written",
                self.path,
                len(self._buffer),
            )
        if self._at_exit_registered:
            atexit.unregister(self.close)
            self._at_exit_registered = False

    def _append_locked(self, data: bytes) -> None:
        """Append ``data`` to the file, rotating it first when it is full.

        The file is opened anew for each write, so that a rotation by
        another process, or by logrotate, never leaves this one writing to
        a renamed file.
        """
        descriptor = _open_log(self.path)
        try:
            size = os.fstat(descriptor).st_size
            if self._is_full(size, len(data)):
                os.close(descriptor)
                descriptor = -1
                self._rotate()
                descriptor = _open_log(self.path)
                size = os.fstat(descriptor).st_size
            if size > 0 and os.pread(descriptor, 1, size - 1) != b"\n":
                # A writer killed during a write left a partial line. Starting
                # on a new line keeps every later record whole.
                data = b"\n" + data
            _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            if descriptor >= 0:
                os.close(descriptor)

    def _is_full(self, size: int, adding: int) -> bool:
        # An empty file takes the whole buffer even when it exceeds max_bytes,
        # because records are never split across files.
        return (
            self.max_bytes is not None and size > 0 and size + adding > self.max_bytes
        )

    def _rotate(self) -> None:
        """Rename PATH to PATH.1, PATH.1 to PATH.2 ..., dropping the oldest."""
        path = str(self.path)
        if self.backups == 0:
            os.unlink(path)
            return
        for number in range(self.backups - 1, 0, -1):
            try:
                os.replace(f"{path}.{number}", f"{path}.{number + 1}")
            except FileNotFoundError:
                pass
        os.replace(path, f"{path}.1")
        log.debug("audit log %s rotated, keeping %d files", path, self.backups)

    def _encode(self, records: list[dict[str, Any]]) -> bytes:
        lines = [
            json.dumps(self._redacted(record), ensure_ascii=False, allow_nan=False)
            for record in records
        ]
        # Lone surrogates (undecodable bytes of a file name) become \udcXX
        # escapes, which are valid JSON.
        return ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")

    def _redacted(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.redact is None:
            return record
        return {
            name: value if name in _NOT_REDACTED else self._redact_value(value)
            for name, value in record.items()
        }

    def _redact_value(self, value: Any) -> Any:
        assert self.redact is not None
        if isinstance(value, str):
            try:
                return self.redact(value)
            except Exception:
                # Writing the text unmasked could leak a secret, and dropping
                # the record would lose it, so the text alone is replaced.
                log.exception("audit log %s: the redaction function raised", self.path)
                return _REDACTION_FAILED
        if isinstance(value, list):
            return [self._redact_value(member) for member in value]
        if isinstance(value, dict):
            return {name: self._redact_value(member) for name, member in value.items()}
        return value

    def _log_write_failure(self, error: BaseException, count: int) -> None:
        self._write_failures += 1
        # The first failure and then every hundredth, so that a full disk
        # does not flood the log once a second.
        if self._write_failures % 100 == 1:
            log.error(
                "audit log %s: writing %d records failed (%s); they stay buffered "
                "and are written again in %.1f s",
                self.path,
                count,
                error,
                self.flush_interval,
            )

    # -- the writer thread ------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        # A daemon, so that a caller who never closes the log cannot keep the
        # interpreter alive; the exit handler writes what is left.
        self._thread = threading.Thread(
            target=self._write_periodically, name="batchtools-audit", daemon=True
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        if thread is not threading.current_thread():
            thread.join()
        self._thread = None

    def _write_periodically(self) -> None:
        # The first write, at once, carries the start record.
        while True:
            self.flush()
            if self._stop.wait(self.flush_interval):
                return

    # -- records ----------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        with self._buffer_lock:
            self._buffer.append(record)

    def _record(self, event: str) -> dict[str, Any]:
        now = time.time()
        return {
            "event": event,
            "time": datetime.fromtimestamp(now, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "epoch": now,
            "run_id": self._run_id,
            "user": self._user,
            "uid": self._uid,
            "host": self._host,
            "pid": os.getpid(),
        }

    def _finish_record(self, report: Report, status: str) -> dict[str, Any]:
        record = self._record("run_finished")
        record["task"] = self._task_of(self._engine)
        record["status"] = status
        record["halted"] = report.halted
        record["counts"] = {**report.counts, "total": report.total}
        record["carried"] = report.carried
        record["duration"] = round(report.duration, 6)
        return record

    def _task_of(self, engine: Engine | None) -> str | list[str] | None:
        if self.task is not None:
            return self.task
        if engine is None or engine.journal is None:
            return None
        name = engine.journal.run.spec.get("task")
        return name if isinstance(name, str) else None

    def _check_lock_file(self) -> None:
        """Create ``PATH.lock`` now, so that a problem with it stops the run early."""
        try:
            with self._file_lock.acquire():
                pass
        except filelock.Timeout:
            pass  # Another run is writing; the lock file is usable.
        except OSError as error:
            raise ConfigurationError(
                f"audit log {str(self.path)!r}: cannot create its lock file "
                f"{str(self.path) + '.lock'!r}: {error.strerror or error}"
            ) from None


def _check_log_file(path: Path) -> None:
    """Create ``path`` or check the existing file; tighten a wider mode to 0600.

    Raises:
        ConfigurationError: ``path`` cannot be an audit log.
    """
    shown = str(path)
    if not path.parent.is_dir():
        raise ConfigurationError(
            f"audit log {shown!r}: the folder {str(path.parent)!r} does not "
            "exist; create it first"
        )
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise ConfigurationError(_symlink_message(shown))
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise ConfigurationError(
            f"audit log {shown!r} is not a regular file; give the path of a file"
        )
    if found is not None:
        _check_existing_log(path, found)
    try:
        descriptor = _open_log(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigurationError(_symlink_message(shown)) from None
        raise ConfigurationError(
            f"audit log {shown!r} cannot be opened for appending: "
            f"{error.strerror or error}"
        ) from None
    os.close(descriptor)


def _check_existing_log(path: Path, found: os.stat_result) -> None:
    """Refuse an existing file that is not an audit log, before it is changed.

    An audit log is appended to and may have its mode tightened, so a
    mistyped path must not reach another file: one with more names, or one
    whose first line is not an audit record, is refused.
    """
    shown = str(path)
    if found.st_nlink > 1:
        raise ConfigurationError(
            f"audit log {shown!r} has {found.st_nlink} names (hard links), so "
            "records and a mode change would reach them all; give a new path"
        )
    if found.st_size == 0:
        return
    try:
        with open(path, "rb") as file:
            first = file.read(len(_RECORD_START))
    except OSError:
        first = b""
    # Records start with their event; the first may be cut short by a kill.
    if first != _RECORD_START:
        raise ConfigurationError(
            f"audit log {shown!r} already exists and does not start with an "
            "audit record, so it is some other file; give a new path, or the "
            "path of an earlier audit log"
        )


def _symlink_message(shown: str) -> str:
    return (
        f"audit log {shown!r} is a symbolic link, which could send the records "
        "to another file; give the path of the file itself"
    )


def _open_log(path: Path) -> int:
    """Open the audit log for appending, creating it with mode 0600.

    Raises:
        OSError: It cannot be opened, or it is not a regular file. A
            symbolic link fails with ``ELOOP``.
    """
    descriptor = os.open(path, _OPEN_FLAGS, _FILE_MODE)
    try:
        found = os.fstat(descriptor)
        if not stat.S_ISREG(found.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        mode = stat.S_IMODE(found.st_mode)
        if mode & 0o077:
            _tighten(descriptor, path, mode)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _tighten(descriptor: int, path: Path, mode: int) -> None:
    """Change a file that other users may read or write to mode 0600."""
    try:
        os.fchmod(descriptor, _FILE_MODE)
    except PermissionError:
        log.warning(
            "audit log %s has mode %04o, so other users may read or write it, "
            "and this process does not own it; ask its owner to run chmod 600",
            path,
            mode,
        )
        return
    log.warning(
        "audit log %s had mode %04o, so other users could read or write it; "
        "changed it to 0600",
        path,
        mode,
    )


def _write_all(descriptor: int, data: bytes) -> None:
    """Write ``data`` with one ``os.write`` call, and more only after a short write.

    A regular file takes the whole buffer at once unless the disk is full or
    a file size limit is reached.
    """
    # NOTE: when a short write is followed by an error (a full disk), the
    # records are buffered again whole, so the ones written before the
    # error appear twice once writing works again.
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _user() -> tuple[str, int]:
    """Return the name and id of the user this process runs as.

    The name comes from the password database, not from ``$USER``, which
    any process can set. A uid without an entry (in some containers) is
    named by its number.
    """
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:
        return str(uid), uid


def _status(report: Report) -> str:
    if report.halted is not None:
        return "halted"
    if report.interrupted:
        return "interrupted"
    return "completed"


def _error_fields(error: BaseException | None) -> dict[str, Any]:
    """Return the type, message and exit status of a failed item's last error."""
    if error is None:
        return {"type": None, "message": ""}
    if isinstance(error, RemoteError):
        type_name, message = error.type_name, error.message
    else:
        kind = type(error)
        type_name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        message = str(error)
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + "..."
    fields: dict[str, Any] = {"type": type_name, "message": message}
    if isinstance(error, CommandFailedError | WorkerLostError):
        fields["exit_status"] = error.exit_status
    return fields
