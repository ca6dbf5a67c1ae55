"""A lock file that excludes processes, threads and coroutines: `FileLock`.

The lock is an ``flock`` on one file, taken through `filelock.UnixFileLock`.
Around it, this module adds what a batch tool needs:

- No stale locks. The kernel drops an ``flock`` when its process dies, even
  by SIGKILL, so a crashed holder never blocks the next process.
- The lock file is never removed. A waiter that opened the old file would
  otherwise lock a new inode at the same path while the old holder still
  holds the old one, and two processes would both be inside.
- Symbolic links are rejected. A link planted at the lock path must not make
  the lock create, open or change the file it points to. The constructor
  rejects a link with a clear error, and filelock 3.20.1 and later open the
  path with ``O_NOFOLLOW``, so a link planted after the check fails the
  acquisition instead of being followed.
- The holder's pid. filelock keeps the lock file to itself, so the holder
  records its pid and start time in a sidecar file, ``<lock>.pid``, written
  under a temporary name and renamed into place (a rename replaces a planted
  link, never writes through it). The holder removes the sidecar before it
  releases. A sidecar left by a killed holder names a dead process, which is
  ignored. The start time tells a reused pid apart from the holder.
- Threads and coroutines. One `FileLock` shared by threads would let them all
  in, because filelock counts re-entries on its one descriptor. A gate
  (a `threading.Lock`) therefore lets one holder of the object at a time
  near the file. Coroutines try the gate and the file without blocking and
  sleep between tries, so they never block their event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import math
import os
import stat
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import filelock
import psutil

from batchtools._exceptions import ConfigurationError, LockTimeoutError
from batchtools.policy._units import parse_duration

__all__ = ["DEFAULT_POLL_INTERVAL", "FileLock", "LockTimeoutError"]

log = logging.getLogger("batchtools.fs")

DEFAULT_POLL_INTERVAL = 0.05
"""Seconds between two tries of a lock that another holder has."""
PID_SUFFIX = ".pid"
"""Appended to the lock file's name to get the sidecar file with the holder's pid."""

_PID_RECORD_MAX_BYTES = 128
# Two processes with one pid that started less than this many seconds apart
# would be taken for one. That needs the whole pid range to wrap around.
_START_TIME_TOLERANCE = 0.01


class _Default(enum.Enum):
    TIMEOUT = "the lock's timeout"


Duration = float | str | timedelta | None


class FileLock:
    """A mutual exclusion lock for processes, threads and coroutines, kept in a file.

    Every `FileLock` on the same path, in any process on this host, excludes
    the others. The lock is not reentrant: acquiring it again before the
    release waits, and without a timeout waits for ever. Any thread may
    release it. A process made by ``fork`` does not hold its parent's lock,
    and a pickled copy (for a worker process) arrives released.

    Example::

        lock = FileLock("/var/tmp/thumbs.lock", timeout="10s")
        with lock:
            ...
        async with lock:
            ...

    Args:
        path: The lock file, created if missing (mode 0600, with missing
            folders made with mode 0700). It must not be a symbolic link and
            should be on a local disk: ``flock`` on a network filesystem may
            lock only within one host.
        timeout: How long an acquisition waits at most, in seconds, as a
            `timedelta` or as text such as ``"30s"``. ``0`` tries once.
            ``None`` waits for ever.
        poll_interval: Seconds between two tries while another process, or
            a coroutine, holds the lock.

    Raises:
        ConfigurationError: ``timeout`` or ``poll_interval`` is invalid, or
            the path is a symbolic link, a folder, another kind of special
            file, or a file with other hard links, or its folder cannot be
            created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: Duration = None,
        poll_interval: float | str | timedelta = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.path = canonical_path(path)
        self.pid_path = self.path.with_name(self.path.name + PID_SUFFIX)
        self.timeout = _seconds_or_none(timeout, "timeout")
        self.poll_interval = parse_duration(poll_interval, name="poll_interval")
        _check_lock_path(self.path)
        make_private_directory(self.path.parent, "lock file folder")
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._mutex = threading.Lock()  # guards _held
        self._gate = threading.Lock()  # held while this object holds the lock
        self._held = False
        # thread_local=False because any thread may release. blocking=False
        # because every wait here is a loop of single tries.
        # preserve_lock_file keeps the file, and rules out filelock's
        # fallback to a lock file that a dead process would leave behind.
        self._file_lock = filelock.UnixFileLock(
            self.path,
            mode=0o600,
            thread_local=False,
            blocking=False,
            preserve_lock_file=True,
            fallback_to_soft=False,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self.path), self.timeout, self.poll_interval))

    def __repr__(self) -> str:
        state = "held" if self.is_locked else "not held"
        return f"<FileLock '{self.path}' {state} by this object>"

    @property
    def is_locked(self) -> bool:
        """Whether this object holds the lock, in this process."""
        self._check_fork()
        return self._held

    def acquire(
        self, timeout: Duration | Literal[_Default.TIMEOUT] = _Default.TIMEOUT
    ) -> None:
        """Acquire the lock, waiting for it if needed.

        For threads; a coroutine uses `acquire_async` or ``async with``.

        Args:
            timeout: Overrides the lock's ``timeout`` for this call.

        Raises:
            LockTimeoutError: The lock was not free within the timeout.
            ConfigurationError: The timeout is invalid, or the lock path
                has become a symbolic link.
            RuntimeError: The calling thread runs an event loop, which a
                wait would block (a timeout of 0 never waits and is allowed).
            OSError: The lock file cannot be created or opened.
        """
        wait = self._wait_of(timeout)
        if wait != 0:
            _reject_running_loop()
        self._check_fork()
        deadline = None if wait is None else time.monotonic() + wait
        if not self._gate.acquire(timeout=_remaining_or_forever(deadline)):
            raise self._timed_out(wait)
        try:
            while not self._lock_file_once():
                time.sleep(self._pause(deadline, wait))
        except BaseException:
            self._gate.release()
            raise
        self._on_acquired()

    async def acquire_async(
        self, timeout: Duration | Literal[_Default.TIMEOUT] = _Default.TIMEOUT
    ) -> None:
        """Acquire the lock without blocking the event loop.

        Each try is a non-blocking ``flock`` on a local file, quick enough to
        run on the loop, with an `asyncio.sleep` between tries. Cancelling
        the waiting task leaves the lock as it was.

        Args:
            timeout: Overrides the lock's ``timeout`` for this call.

        Raises:
            LockTimeoutError: The lock was not free within the timeout.
            ConfigurationError: The timeout is invalid, or the lock path
                has become a symbolic link.
            OSError: The lock file cannot be created or opened.
        """
        wait = self._wait_of(timeout)
        self._check_fork()
        deadline = None if wait is None else time.monotonic() + wait
        while not self._try_gate_and_file():
            await asyncio.sleep(self._pause(deadline, wait))
        self._on_acquired()

    def release(self) -> None:
        """Release the lock.

        Raises:
            RuntimeError: This object does not hold the lock.
        """
        self._check_fork()
        with self._mutex:
            if not self._held:
                raise RuntimeError(
                    f"release() of the lock '{self.path}', which this object does "
                    "not hold; call acquire() first"
                )
            self._held = False
        try:
            self._remove_holder_record()
            self._file_lock.release()
        finally:
            self._gate.release()

    def holder_pid(self) -> int | None:
        """Return the pid that the sidecar file names, if that process still runs.

        The pid is a hint, because the process may release the lock right after.
        It is ``None`` when no holder recorded its pid, when the recorded
        process has died, or when the sidecar cannot be read.
        """
        record = _read_small_file(self.pid_path)
        try:
            pid_text, start_text = record.split()
            pid, started = int(pid_text), float(start_text)
        except ValueError:
            return None
        return pid if _is_running(pid, started) else None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> FileLock:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _wait_of(self, timeout: Duration | Literal[_Default.TIMEOUT]) -> float | None:
        if timeout is _Default.TIMEOUT:
            return self.timeout
        return _seconds_or_none(timeout, "timeout")

    def _check_fork(self) -> None:
        # A child made by fork shares the parent's open file description, so
        # it must neither release nor reuse the parent's hold.
        if self._pid != os.getpid():
            self._reset()

    def _try_gate_and_file(self) -> bool:
        if not self._gate.acquire(blocking=False):
            return False
        try:
            locked = self._lock_file_once()
        except BaseException:
            self._gate.release()
            raise
        if not locked:
            self._gate.release()
        return locked

    def _lock_file_once(self) -> bool:
        # NOTE: filelock before 3.20.1 opens the path without O_NOFOLLOW, so
        # there a link planted after the constructor's check is followed.
        try:
            self._file_lock.acquire(blocking=False)
        except filelock.Timeout:
            return False
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise _invalid_path(self.path, "it is a symbolic link") from error
            raise
        return True

    def _pause(self, deadline: float | None, wait: float | None) -> float:
        """Return how long to sleep before the next try, or raise at the deadline."""
        if deadline is None:
            return self.poll_interval
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out(wait)
        return min(self.poll_interval, remaining)

    def _timed_out(self, wait: float | None) -> LockTimeoutError:
        return LockTimeoutError(str(self.path), wait or 0.0, self.holder_pid())

    def _on_acquired(self) -> None:
        with self._mutex:
            self._held = True
        try:
            self._write_holder_record()
        except (OSError, psutil.Error) as error:
            # The pid is only for diagnostics; the lock itself is held.
            log.warning(
                "could not record the holder of the lock %s in %s: %s",
                self.path,
                self.pid_path,
                error,
            )

    def _write_holder_record(self) -> None:
        pid = os.getpid()
        record = f"{pid} {_start_time(pid)!r}\n".encode()
        descriptor, temporary = tempfile.mkstemp(
            dir=self.pid_path.parent, prefix=f".{self.pid_path.name}.", suffix=".tmp"
        )
        try:
            with open(descriptor, "wb") as file:
                file.write(record)
            os.replace(temporary, self.pid_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _remove_holder_record(self) -> None:
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not remove %s: %s", self.pid_path, error)


def _reopen(path: str, timeout: float | None, poll_interval: float) -> FileLock:
    return FileLock(path, timeout=timeout, poll_interval=poll_interval)


# -- paths, shared with batchtools.flow.locks ----------------------------


def canonical_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` made absolute with its folders resolved, so it has one spelling.

    The last component is kept as it is, so that a symbolic link there is
    rejected instead of followed.
    """
    absolute = Path(path).absolute()
    return absolute.parent.resolve() / absolute.name


def make_private_directory(directory: Path, label: str) -> None:
    """Create ``directory`` with mode 0700 if missing, or check that it is a folder.

    Args:
        directory: A path from `canonical_path`.
        label: What the folder is, for error messages.

    Raises:
        ConfigurationError: The path is a symbolic link or not a folder, or
            it cannot be read or created.
    """
    try:
        info = directory.lstat()
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise ConfigurationError(
            f"invalid {label} '{directory}': it cannot be read ({error.strerror})"
        ) from error
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise ConfigurationError(
            f"invalid {label} '{directory}': it is a symbolic link; give the real "
            "directory's path instead"
        )
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(
            f"invalid {label} '{directory}': it is not a directory; give a "
            "directory path"
        )
    if info is None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(
                f"invalid {label} '{directory}': it cannot be created "
                f"({error.strerror}); give a path in a folder you can write to"
            ) from error


def _check_lock_path(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as error:
        raise _invalid_path(path, f"it cannot be read ({error.strerror})") from error
    if stat.S_ISLNK(info.st_mode):
        raise _invalid_path(path, "it is a symbolic link")
    if stat.S_ISDIR(info.st_mode):
        raise _invalid_path(path, "it is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise _invalid_path(path, "it is not a regular file")
    if info.st_nlink > 1:
        raise _invalid_path(path, f"it has {info.st_nlink - 1} other hard links")


def _invalid_path(path: Path, reason: str) -> ConfigurationError:
    return ConfigurationError(
        f"invalid lock file '{path}': {reason}; remove it if you did not make "
        "it, or give a path to a regular file or to a new one"
    )


# -- times and processes -------------------------------------------------


def _seconds_or_none(value: Duration, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and value.strip() in ("0", "0s", "0ms"):
        return 0.0
    seconds = parse_duration(value, name=name)
    if seconds > threading.TIMEOUT_MAX:
        raise ConfigurationError(
            f"{name}={value!r} is longer than this system can wait "
            f"({threading.TIMEOUT_MAX:.3g} s); give None to wait without limit"
        )
    return seconds


def _remaining_or_forever(deadline: float | None) -> float:
    """Return the seconds left for `threading.Lock.acquire`; -1 means no limit."""
    if deadline is None:
        return -1
    return max(0.0, deadline - time.monotonic())


def _reject_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "FileLock.acquire() would block the running event loop; use "
        "'async with lock' or 'await lock.acquire_async()' in a coroutine"
    )


def _start_time(pid: int) -> float:
    """Return when process ``pid`` started, in a form stable for its lifetime.

    On Linux this is the start time in clock ticks since boot from
    ``/proc/PID/stat``. psutil's wall-clock time adds the boot time, which
    the kernel derives from the current clock and which can move by a
    second between two readings on a busy virtual machine.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat_line = file.read()
    except OSError:
        started: float = psutil.Process(pid).create_time()
        return started
    # The command name in parentheses may hold spaces; fields follow it.
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()
    return float(fields[19])


def _is_running(pid: int, started: float) -> bool:
    """Return whether ``pid`` is a live process that started at ``started``."""
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # it has exited, so the kernel dropped its locks
        return math.isclose(
            _start_time(pid), started, rel_tol=0, abs_tol=_START_TIME_TOLERANCE
        )
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return False
    except psutil.AccessDenied:
        return True  # it exists; the start time is all that could not be read


def _read_small_file(path: Path) -> str:
    """Return the start of a regular file as text, or ``""`` if it cannot be read.

    A symbolic link, a FIFO or another special file planted there is not
    followed or read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return ""
        return file.read(_PID_RECORD_MAX_BYTES).decode("ascii", "replace")
