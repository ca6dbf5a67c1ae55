"""The subprocess backend: one command per attempt, started with posix_spawn.

Commands are spawned with `os.posix_spawn` and watched from the event loop
(`loop.add_reader` on the output pipes and on a pidfd) rather than through
asyncio's subprocess transport, which costs much of the throughput on short
commands: 2,000 ``true`` commands, two at a time, with stdout and stderr
piped, ran at about 68% of this backend's rate with
`asyncio.create_subprocess_exec` (median of 5 runs, Python 3.11, 2-CPU
Linux VM).

Each command runs in its own process group, so a Ctrl-C on the terminal
reaches batchtools only and the engine decides what to stop. Its stdin is
``/dev/null``.

Output rules:

* stdout and stderr are captured byte for byte, each up to 8 MiB in memory
  and beyond that in a temporary file (see `CapturedOutput`). With a
  `SecretStore`, each stream passes through a `StreamRedactor` as it is
  read, so secret values are stored as ``***`` even when a read splits one.
* After the command's process exits, its pipes are read until end of file,
  or until no data has arrived for 100 ms, and for about 1 s at most. A
  background process that still has a pipe open therefore delays the
  result by 100 ms (1 s if it keeps writing), and what it writes after the
  pipes are closed is lost.

Stopping (`SubprocessBackend.cancel`):

* The descendants of the command are collected with psutil first, then
  SIGTERM goes to the command's process group and to each descendant, so
  processes that left the group with setsid are reached too.
* After ``kill_grace`` seconds, SIGKILL goes to whatever is still alive.
* `execute` raises the cancel error as soon as the command has exited and
  every collected descendant is gone: right away for commands that obey
  SIGTERM, about ``kill_grace`` seconds later otherwise. The pipes are then
  drained of what is buffered and closed, without waiting for end of file.
* A process still alive 1 s after SIGKILL is logged and given up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import psutil

from batchtools._exceptions import CommandFailedError, RunAbortedError
from batchtools.backends._base import Backend, Call
from batchtools.backends._command import CommandTemplate

if TYPE_CHECKING:
    from batchtools.secrets import SecretStore, StreamRedactor

logger = logging.getLogger(__name__)

MEMORY_LIMIT = 8 * 1024 * 1024
"""Bytes of one output stream kept in memory before it spills to a file."""

STDERR_TAIL_SIZE = 4096
"""Bytes of stderr that `CommandFailedError.stderr_tail` keeps."""

_READ_SIZE = 65536
_READS_PER_WAKEUP = 16  # limits how long one busy pipe keeps the loop busy
_LINGER_IDLE = 0.1  # seconds without output, after exit, before closing pipes
_LINGER_MAX = 1.0  # seconds after exit after which pipes are closed anyway
_POLL_INTERVAL = 0.02  # seconds between checks of a tree being stopped
_KILL_WAIT = 1.0  # seconds after SIGKILL before giving up on a process
_SHELL = b"/bin/sh"

# Python ignores these two signals, and an ignored signal stays ignored
# across exec; subprocess resets them in the child for the same reason.
_RESET_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)
)


class CapturedOutput:
    """One captured output stream: in memory, or spilled to a temporary file.

    The first `MEMORY_LIMIT` bytes are kept in memory. When the stream grows
    past that, everything is moved to a temporary file and the rest is
    appended there, so memory stays bounded. `close` removes the file, which
    is also removed when the object is garbage collected or the interpreter
    exits. A pickled copy contains the whole stream in memory.

    Attributes:
        lost_bytes: Bytes dropped because the spill file could not be
            written (a full disk, say); 0 normally.
        error: The first error that writing the spill file raised.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_data",
        "_finalizer",
        "_finished",
        "_limit",
        "_path",
        "_size",
        "_spill",
        "error",
        "lost_bytes",
    )

    def __init__(self, memory_limit: int = MEMORY_LIMIT) -> None:
        self._limit = memory_limit
        self._data: bytes | bytearray = bytearray()
        self._path: str | None = None
        self._spill: BinaryIO | None = None
        self._size = 0
        self._finished = False
        self._closed = False
        self._finalizer: weakref.finalize[[str], CapturedOutput] | None = None
        self.lost_bytes = 0
        self.error: OSError | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> CapturedOutput:
        """Wrap bytes that are already in memory as a finished stream."""
        output = cls(memory_limit=len(data))
        output._data = bytes(data)
        output._size = len(data)
        output._finished = True
        return output

    def __reduce__(self) -> tuple[Any, ...]:
        return (CapturedOutput.from_bytes, (self.read(),))

    def __repr__(self) -> str:
        where = f"spilled to {self._path}" if self._path else "in memory"
        return f"<CapturedOutput {self._size} bytes {where}>"

    @property
    def size(self) -> int:
        """The length of the stream in bytes, lost bytes not included."""
        return self._size

    @property
    def path(self) -> str | None:
        """The temporary file that contains the whole stream, or None if in memory."""
        return self._path

    def append(self, data: bytes) -> None:
        """Add bytes to the end of the stream, spilling to a file past the limit.

        Raises:
            ValueError: The stream was finished or closed.
        """
        if self._finished or self._closed:
            raise ValueError("cannot append to a finished CapturedOutput")
        if self._spill is None and len(self._data) + len(data) <= self._limit:
            assert isinstance(self._data, bytearray)
            self._data += data
            self._size += len(data)
            return
        try:
            if self._spill is None:
                self._start_spill()
            assert self._spill is not None
            self._spill.write(data)
        except OSError as error:
            self.lost_bytes += len(data)
            if self.error is None:
                self.error = error
            return
        self._size += len(data)

    def _start_spill(self) -> None:
        descriptor, path = tempfile.mkstemp(prefix="batchtools-output-")
        spill = open(descriptor, "wb")  # noqa: SIM115 - closed in finish()
        try:
            spill.write(self._data)
        except OSError:
            spill.close()
            _remove_file(path)
            raise
        self._path = path
        self._spill = spill
        self._finalizer = weakref.finalize(self, _remove_file, path)
        self._data = b""

    def finish(self) -> None:
        """Mark the stream complete: close the spill file or freeze the buffer."""
        self._finished = True
        if self._spill is not None:
            try:
                self._spill.close()
            except OSError as error:
                self.error = self.error or error
            self._spill = None
        elif isinstance(self._data, bytearray):
            self._data = bytes(self._data)

    def read(self) -> bytes:
        """Return the whole stream, reading the spill file if there is one."""
        if self._path is None:
            return bytes(self._data)
        with self._open_spill() as file:
            return file.read()

    def write_to(self, file: BinaryIO) -> None:
        """Write the whole stream to a binary file without loading it at once."""
        if self._path is None:
            file.write(self._data)
            return
        with self._open_spill() as source:
            shutil.copyfileobj(source, file, 1024 * 1024)

    def tail(self, size: int) -> bytes:
        """Return the last ``size`` bytes of the stream."""
        if size <= 0:
            return b""
        if self._path is None:
            return bytes(self._data[-size:])
        with self._open_spill() as file:
            file.seek(max(self._size - size, 0))
            return file.read()

    def _open_spill(self) -> BinaryIO:
        if self._closed or self._path is None:
            raise ValueError("the CapturedOutput was closed and cannot be read")
        if self._spill is not None:
            self._spill.flush()
        return open(self._path, "rb")

    def close(self) -> None:
        """Remove the spill file, if any. A spilled stream cannot be read afterwards."""
        self._closed = True
        if self._spill is not None:
            with contextlib.suppress(OSError):
                self._spill.close()
            self._spill = None
        if self._finalizer is not None:
            self._finalizer()


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(eq=False, slots=True)
class CommandResult:
    """The outcome of one command: its exit status, output and run time.

    Large output may live in temporary files. Call `close`, or use the result
    as a context manager, to remove them once the output has been used.

    Attributes:
        argv: The arguments the command was started with.
        exit_status: The exit status, or the negative signal number when a
            signal ended the command; 127 when the program was not found
            and 126 when it could not be executed.
        duration: Seconds from the spawn until the exit was seen.
        captured_stdout: The command's stdout; empty when the backend does
            not capture output.
        captured_stderr: The command's stderr, likewise.
    """

    argv: list[bytes]
    exit_status: int
    duration: float
    captured_stdout: CapturedOutput
    captured_stderr: CapturedOutput

    def __enter__(self) -> CommandResult:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stdout(self) -> bytes:
        """The whole stdout, read from the spill file (if any) on each access."""
        return self.captured_stdout.read()

    @property
    def stderr(self) -> bytes:
        """The whole stderr, read from the spill file (if any) on each access."""
        return self.captured_stderr.read()

    def read_stdout(self) -> bytes:
        """Return the whole stdout."""
        return self.captured_stdout.read()

    def read_stderr(self) -> bytes:
        """Return the whole stderr."""
        return self.captured_stderr.read()

    def write_stdout_to(self, file: BinaryIO) -> None:
        """Copy stdout to a binary file in chunks."""
        self.captured_stdout.write_to(file)

    def write_stderr_to(self, file: BinaryIO) -> None:
        """Copy stderr to a binary file in chunks."""
        self.captured_stderr.write_to(file)

    def close(self) -> None:
        """Remove the spill files. The output cannot be read afterwards."""
        self.captured_stdout.close()
        self.captured_stderr.close()


class _Command:
    """A spawned command and the state of its pipes and process tree."""

    __slots__ = (
        "argv",
        "call",
        "data_arrived",
        "deadline_handle",
        "descendants",
        "done",
        "ended",
        "exit_status",
        "finished",
        "linger_handle",
        "pid",
        "pidfd",
        "pipes",
        "poll_handle",
        "reaped",
        "redactors",
        "slot",
        "started",
        "stderr",
        "stdout",
        "stop_started",
        "terminating",
    )

    def __init__(
        self, call: Call, argv: list[bytes], pid: int, slot: int, started: float
    ) -> None:
        self.call = call
        self.argv = argv
        self.pid = pid
        self.slot = slot
        self.started = started
        self.ended = started
        self.pidfd = -1
        self.pipes: dict[int, CapturedOutput] = {}
        # One redactor per pipe, when the run has secrets.
        self.redactors: dict[int, StreamRedactor] = {}
        self.stdout = CapturedOutput()
        self.stderr = CapturedOutput()
        self.exit_status: int | None = None
        self.reaped = False
        self.finished = False
        self.data_arrived = False
        self.terminating = False
        self.stop_started = 0.0
        self.descendants: list[psutil.Process] = []
        self.linger_handle: asyncio.TimerHandle | None = None
        self.poll_handle: asyncio.TimerHandle | None = None
        self.deadline_handle: asyncio.TimerHandle | None = None
        # Resolved with None when the attempt is over; execute reads the
        # outcome from the attributes, so no exception is ever left unread.
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


# Descriptors that one command uses while it is spawned: its stdout and stderr
# pipes, the error pipe of the spawn and a pidfd. Kept for the run itself:
# the journal and its WAL, logs, and the event loop's own.
_DESCRIPTORS_PER_COMMAND = 6
_DESCRIPTORS_KEPT = 16


def _open_descriptors_left() -> int | None:
    """Return how many more descriptors this process may open, if known."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        used = len(
            os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")
        )
    except OSError:
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - used)


def _slots_within_descriptor_limit() -> int | None:
    """Return how many commands fit in the descriptor limit, or None if any."""
    left = _open_descriptors_left()
    if left is None:
        return None
    return max(1, (left - _DESCRIPTORS_KEPT) // _DESCRIPTORS_PER_COMMAND)


class SubprocessBackend(Backend):
    """Runs each attempt as a command rendered from a `CommandTemplate`.

    `execute` returns a `CommandResult` when the command exits with status
    0 and raises `CommandFailedError` (with the result attached) otherwise.

    Args:
        template: The command to render for each attempt.
        concurrency: How many commands may run at once; also the number of
            job slots for ``{%}``.
        env: The whole environment of the commands, whose ``PATH`` is also
            where programs are looked up. By default it is a copy of
            `os.environ` taken here, so later changes do not reach commands.
        kill_grace: Seconds between SIGTERM and SIGKILL when a command is
            stopped.
        capture: Capture stdout and stderr. When False, commands write to
            this process's stdout and stderr and the results hold no output.
        batched: The engine hands over a list of items per attempt (``-n``)
            instead of a single item.
        secrets: Secrets set in each command's environment under their
            names, and redacted from its captured output. A secret that has
            expired fails the attempt before the command starts.
    """

    name = "subprocess"
    runs_commands = True

    def __init__(
        self,
        template: CommandTemplate,
        concurrency: int,
        *,
        env: Mapping[str, str] | None = None,
        kill_grace: float = 2.0,
        capture: bool = True,
        batched: bool = False,
        secrets: SecretStore | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if kill_grace < 0:
            raise ValueError(f"kill_grace must not be negative, not {kill_grace}")
        super().__init__(concurrency)
        self.template = template
        self.kill_grace = kill_grace
        self.capture = capture
        self.batched = batched
        self.secrets = secrets
        source = os.environ if env is None else env
        # Encoded once here: posix_spawn would otherwise encode os.environ
        # entry by entry for every command, a measurable share of a short
        # command's cost.
        self._environment = {
            os.fsencode(name): os.fsencode(value) for name, value in source.items()
        }
        self._search_path = source.get("PATH", os.defpath)
        self._programs: dict[bytes, bytes] = {}
        self._free_slots = list(range(1, concurrency + 1))
        self._slot_waiters: deque[tuple[Call, asyncio.Future[int]]] = deque()
        self._commands: set[_Command] = set()
        self._devnull = -1
        self._use_pidfd = hasattr(os, "pidfd_open")
        self._closed = False

    async def start(self) -> None:
        self._open_devnull()
        slots = _slots_within_descriptor_limit()
        if slots is not None and slots < self.concurrency:
            logger.warning(
                "running %d commands at once instead of %d: each takes up to %d "
                "file descriptors while it starts, and this process may open %s "
                "more; raise the limit (ulimit -n) for more",
                slots,
                self.concurrency,
                _DESCRIPTORS_PER_COMMAND,
                _open_descriptors_left(),
            )
            self.concurrency = slots
            self._free_slots = list(range(1, slots + 1))

    async def execute(self, call: Call) -> CommandResult:
        if call.cancel_error is not None:
            raise call.cancel_error
        if self._closed:
            raise RunAbortedError("the subprocess backend is closed")
        slot = await self._acquire_slot(call)
        command: _Command | None = None
        try:
            if call.cancel_error is not None:
                raise call.cancel_error
            items = call.payload if self.batched else [call.payload]
            argv = self.template.render(
                items, seq=call.context.seq, slot=slot, batch=self.batched
            )
            command = self._spawn(call, argv, slot)
        finally:
            if command is None:
                self._release_slot(slot)

        call.handle = command
        try:
            await command.done
        except asyncio.CancelledError:
            # The engine's task was cancelled, which cancelled `done` too.
            # Stop the tree in the background with a fresh future for
            # aclose to wait on.
            if command.done.cancelled():
                command.done = asyncio.get_running_loop().create_future()
            self._stop_tree(command)
            if call.cancel_error is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            raise call.cancel_error from None
        finally:
            call.handle = None

        if call.cancel_error is not None:
            raise call.cancel_error
        return _outcome(command)

    def cancel(self, call: Call, error: BaseException) -> None:
        call.cancel_error = error
        if call.context.cancelled is not None:
            call.context.cancelled.set()
        handle = call.handle
        if isinstance(handle, _Command):
            self._stop_tree(handle)
        elif isinstance(handle, asyncio.Future) and not handle.done():
            handle.set_exception(error)

    def signal_workers(self, number: int) -> None:
        for command in list(self._commands):
            try:
                os.killpg(command.pid, number)
            except (ProcessLookupError, PermissionError):
                pass  # The command ended meanwhile.

    def stop_queued(self, error: BaseException) -> None:
        for call, waiter in self._slot_waiters:
            if not waiter.done():
                call.cancel_error = error
                waiter.set_exception(error)

    async def aclose(self, *, cancel: bool) -> None:
        self._closed = True
        self.stop_queued(RunAbortedError("the subprocess backend was closed"))
        if cancel:
            for command in list(self._commands):
                if command.call.cancel_error is None:
                    command.call.cancel_error = RunAbortedError(
                        "the subprocess backend was closed while the command ran"
                    )
                self._stop_tree(command)
        # A stopped command finishes at the latest kill_grace + _KILL_WAIT
        # seconds after the stop, so this wait is bounded when cancel is True.
        # A `done` future may be replaced while waiting (see execute), hence
        # the loop.
        while True:
            pending = [c.done for c in self._commands if not c.finished]
            if not pending:
                break
            await asyncio.wait(pending)
        for command in self._commands:
            # Finished but not reaped: the process survived SIGKILL.
            logger.warning(
                "command %s (pid %d) did not exit after SIGKILL and is left unreaped",
                command.argv[0].decode(errors="replace"),
                command.pid,
            )
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    # Job slots -------------------------------------------------------------

    async def _acquire_slot(self, call: Call) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (call, waiter)
        self._slot_waiters.append(entry)
        call.handle = waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot(waiter.result())
            if call.cancel_error is not None:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                raise call.cancel_error from None
            raise
        finally:
            call.handle = None
            with contextlib.suppress(ValueError):
                self._slot_waiters.remove(entry)

    def _release_slot(self, slot: int) -> None:
        while self._slot_waiters:
            _, waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        heapq.heappush(self._free_slots, slot)

    # Spawning --------------------------------------------------------------

    def _open_devnull(self) -> None:
        if self._devnull < 0:
            self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _find_program(self, program: bytes) -> bytes | None:
        if b"/" in program:
            return program
        found = self._programs.get(program)
        if found is None:
            found = shutil.which(program, path=self._search_path)
            # Misses are not cached so that a program installed during
            # the run is found.
            if found is not None:
                self._programs[program] = found
        return found

    def _spawn(self, call: Call, argv: list[bytes], slot: int) -> _Command:
        self._open_devnull()
        path = self._find_program(argv[0])
        if path is None:
            raise _spawn_failure(argv, 127, b"command not found")
        environment = self._environment_for(call)

        file_actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, self._devnull, 0)]
        read_ends: list[int] = []
        write_ends: list[int] = []
        if self.capture:
            for target in (1, 2):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                read_ends.append(read_end)
                write_ends.append(write_end)
                file_actions.append((os.POSIX_SPAWN_DUP2, write_end, target))
        try:
            started = time.monotonic()
            pid = self._posix_spawn(path, argv, file_actions, environment)
        except BaseException:
            for descriptor in read_ends:
                os.close(descriptor)
            raise
        finally:
            for descriptor in write_ends:
                os.close(descriptor)

        command = _Command(call, argv, pid, slot, started)
        call.slot = slot
        call.worker = f"pid {pid}"
        self._commands.add(command)
        loop = asyncio.get_running_loop()
        if self.capture:
            command.pipes = {read_ends[0]: command.stdout, read_ends[1]: command.stderr}
            if self.secrets is not None and self.secrets.redactor:
                redactor = self.secrets.redactor
                command.redactors = {end: redactor.stream() for end in read_ends}
            for descriptor in read_ends:
                os.set_blocking(descriptor, False)
                loop.add_reader(descriptor, self._on_output, command, descriptor)
        self._watch_exit(loop, command)
        return command

    def _environment_for(self, call: Call) -> dict[bytes, bytes]:
        """Return the command's environment: the backend's, plus the secrets.

        Raises:
            SecretExpiredError: A secret has expired; nothing is spawned.
        """
        if self.secrets is None or not len(self.secrets):
            return self._environment
        context = call.context
        secrets = self.secrets.environment(
            run_id=context.run_id, key=context.key, attempt=context.attempt
        )
        environment = dict(self._environment)
        for name, value in secrets.items():
            environment[os.fsencode(name)] = os.fsencode(value)
        return environment

    def _posix_spawn(
        self,
        path: bytes,
        argv: list[bytes],
        file_actions: list[tuple[Any, ...]],
        environment: dict[bytes, bytes],
    ) -> int:
        try:
            return os.posix_spawn(
                path,
                argv,
                environment,
                file_actions=file_actions,
                setpgroup=0,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        except OSError as error:
            if error.errno == errno.ENOEXEC:
                # A script without "#!": run it with /bin/sh as execvp and
                # shells do.
                try:
                    return os.posix_spawn(
                        _SHELL,
                        [_SHELL, path, *argv[1:]],
                        environment,
                        file_actions=file_actions,
                        setpgroup=0,
                        setsigdef=_RESET_SIGNALS,
                        setsigmask=(),
                    )
                except OSError as retry_error:
                    error = retry_error
            status = 127 if error.errno == errno.ENOENT else 126
            reason = os.strerror(error.errno or 0).encode()
            raise _spawn_failure(argv, status, reason) from None

    def _watch_exit(self, loop: asyncio.AbstractEventLoop, command: _Command) -> None:
        if self._use_pidfd:
            try:
                command.pidfd = os.pidfd_open(command.pid)
            except OSError as error:
                if error.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                # The kernel lacks pidfd (before Linux 5.3) or a seccomp
                # filter blocks it, so a waiting thread is used from now on.
                self._use_pidfd = False
            else:
                loop.add_reader(command.pidfd, self._on_exit, command)
                return
        thread = threading.Thread(
            target=_wait_in_thread,
            args=(loop, command, self._on_exit, self._on_status),
            name=f"batchtools-wait-{command.pid}",
            daemon=True,
        )
        thread.start()

    # Events ----------------------------------------------------------------

    def _on_output(self, command: _Command, descriptor: int) -> None:
        output = command.pipes.get(descriptor)
        if output is None:
            return
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = os.read(descriptor, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as error:
                logger.warning(
                    "reading the output of pid %d failed: %s", command.pid, error
                )
                data = b""
            if not data:
                self._close_pipe(command, descriptor)
                self._check_finished(command)
                return
            _store(command, descriptor, output, data)
            command.data_arrived = True
            if len(data) < _READ_SIZE:
                return

    def _on_exit(self, command: _Command) -> None:
        if command.reaped:
            return
        try:
            pid, status = os.waitpid(command.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = command.pid, -1
        if pid == 0:
            return
        self._on_status(command, status)

    def _on_status(self, command: _Command, status: int) -> None:
        if command.reaped:
            return
        command.reaped = True
        if command.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(command.pidfd)
            os.close(command.pidfd)
            command.pidfd = -1
        command.ended = time.monotonic()
        if status < 0:
            logger.warning(
                "command %s (pid %d) was reaped by another waiter, so its exit "
                "status is lost and reported as 255",
                command.argv[0].decode(errors="replace"),
                command.pid,
            )
            command.exit_status = 255
        else:
            command.exit_status = os.waitstatus_to_exitcode(status)
        self._drain_pipes(command)
        if command.finished:
            self._forget(command)
            return
        if command.pipes and not command.terminating:
            command.data_arrived = False
            command.linger_handle = asyncio.get_running_loop().call_later(
                _LINGER_IDLE, self._linger, command
            )
        self._check_finished(command)

    def _linger(self, command: _Command) -> None:
        command.linger_handle = None
        if command.finished or command.terminating:
            return
        self._drain_pipes(command)
        still_writing = command.data_arrived
        within_limit = time.monotonic() - command.ended < _LINGER_MAX
        if command.pipes and still_writing and within_limit:
            command.data_arrived = False
            command.linger_handle = asyncio.get_running_loop().call_later(
                _LINGER_IDLE, self._linger, command
            )
            return
        self._close_pipes(command)
        self._check_finished(command)

    def _check_finished(self, command: _Command) -> None:
        if command.finished or not command.reaped:
            return
        if command.terminating:
            if self._tree_alive(command):
                return  # the poll timer checks again
            self._drain_pipes(command)
            self._close_pipes(command)
        elif command.pipes:
            return  # the linger timer closes them
        self._finish(command)

    def _finish(self, command: _Command) -> None:
        command.finished = True
        timers = (command.linger_handle, command.poll_handle, command.deadline_handle)
        for handle in timers:
            if handle is not None:
                handle.cancel()
        self._close_pipes(command)
        for stream, output in (("stdout", command.stdout), ("stderr", command.stderr)):
            output.finish()
            if output.lost_bytes:
                logger.error(
                    "dropped %d bytes of the %s of command %s (pid %d) because "
                    "the spill file could not be written: %s",
                    output.lost_bytes,
                    stream,
                    command.argv[0].decode(errors="replace"),
                    command.pid,
                    output.error,
                )
        if command.reaped:
            self._forget(command)
        self._release_slot(command.slot)
        if not command.done.done():
            command.done.set_result(None)

    def _forget(self, command: _Command) -> None:
        self._commands.discard(command)

    # Pipes -----------------------------------------------------------------

    def _drain_pipes(self, command: _Command) -> None:
        for descriptor in list(command.pipes):
            output = command.pipes[descriptor]
            while True:
                try:
                    data = os.read(descriptor, _READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self._close_pipe(command, descriptor)
                    break
                _store(command, descriptor, output, data)
                command.data_arrived = True

    def _close_pipe(self, command: _Command, descriptor: int) -> None:
        output = command.pipes.pop(descriptor, None)
        if output is None:
            return
        redactor = command.redactors.pop(descriptor, None)
        if redactor is not None:
            # The bytes held back in case a secret went on in the next read.
            tail = redactor.flush()
            if tail:
                output.append(tail)
        asyncio.get_running_loop().remove_reader(descriptor)
        os.close(descriptor)

    def _close_pipes(self, command: _Command) -> None:
        for descriptor in list(command.pipes):
            self._close_pipe(command, descriptor)

    # Stopping --------------------------------------------------------------

    def _stop_tree(self, command: _Command) -> None:
        if command.terminating or command.finished:
            return
        command.terminating = True
        command.stop_started = time.monotonic()
        if command.linger_handle is not None:
            command.linger_handle.cancel()
            command.linger_handle = None
        # Descendants are collected before any signal because once a parent
        # dies, its children are re-parented and cannot be found from here.
        command.descendants = _descendants_of(command)
        self._signal_tree(command, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        command.deadline_handle = loop.call_later(
            self.kill_grace, self._kill_tree, command
        )
        command.poll_handle = loop.call_later(_POLL_INTERVAL, self._poll_tree, command)

    def _kill_tree(self, command: _Command) -> None:
        command.deadline_handle = None
        if command.finished:
            return
        # Children started since the SIGTERM are collected now.
        found = {process.pid: process for process in command.descendants}
        for process in _descendants_of(command):
            found.setdefault(process.pid, process)
        command.descendants = list(found.values())
        self._signal_tree(command, signal.SIGKILL)

    def _poll_tree(self, command: _Command) -> None:
        command.poll_handle = None
        if command.finished:
            return
        waited = time.monotonic() - command.stop_started
        if waited > self.kill_grace + _KILL_WAIT:
            logger.warning(
                "command %s (pid %d) still has processes %s running %.1f s after "
                "SIGKILL, so the backend stops waiting for them",
                command.argv[0].decode(errors="replace"),
                command.pid,
                [process.pid for process in command.descendants],
                _KILL_WAIT,
            )
            self._drain_pipes(command)
            self._finish(command)
            return
        self._drain_pipes(command)
        self._check_finished(command)
        if not command.finished:
            command.poll_handle = asyncio.get_running_loop().call_later(
                _POLL_INTERVAL, self._poll_tree, command
            )

    def _signal_tree(self, command: _Command, signum: int) -> None:
        if not command.reaped:
            # The group id is the unreaped leader's pid, so it cannot have
            # been reused for another group yet.
            try:
                os.killpg(command.pid, signum)
            except ProcessLookupError:
                pass
            except PermissionError as error:
                logger.warning("cannot signal process group %d: %s", command.pid, error)
        for process in command.descendants:
            # psutil checks the creation time, so a reused pid is skipped.
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                process.send_signal(signum)

    def _tree_alive(self, command: _Command) -> bool:
        if not command.reaped:
            return True
        alive = [process for process in command.descendants if _is_alive(process)]
        command.descendants = alive
        return bool(alive)


def _store(
    command: _Command, descriptor: int, output: CapturedOutput, data: bytes
) -> None:
    """Append bytes read from a pipe to its output, redacted if the run has secrets."""
    redactor = command.redactors.get(descriptor)
    if redactor is not None:
        data = redactor.feed(data)
        if not data:
            return
    output.append(data)


def _descendants_of(command: _Command) -> list[psutil.Process]:
    roots: list[psutil.Process] = []
    if not command.reaped:
        with contextlib.suppress(psutil.NoSuchProcess):
            roots.append(psutil.Process(command.pid))
    roots.extend(process for process in command.descendants if _is_alive(process))
    found: dict[int, psutil.Process] = {}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def _is_alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_in_thread(
    loop: asyncio.AbstractEventLoop,
    command: _Command,
    on_exit: Callable[[_Command], None],
    on_status: Callable[[_Command, int], None],
) -> None:
    try:
        if hasattr(os, "waitid"):
            # WNOWAIT leaves the child unreaped, so its pid, which is also
            # its process group id, stays reserved until on_exit reaps it
            # on the loop's thread.
            os.waitid(os.P_PID, command.pid, os.WEXITED | os.WNOWAIT)
            callback: Callable[..., None] = on_exit
            arguments: tuple[Any, ...] = (command,)
        else:
            # NOTE: without waitid (macOS before Python 3.13) the child is
            # reaped here, so a stop racing with its exit could signal a
            # process group whose id was reused.
            _, status = os.waitpid(command.pid, 0)
            callback, arguments = on_status, (command, status)
    except ChildProcessError:
        callback, arguments = on_status, (command, -1)
    with contextlib.suppress(RuntimeError):  # the loop has closed
        loop.call_soon_threadsafe(callback, *arguments)


def _spawn_failure(argv: list[bytes], status: int, reason: bytes) -> CommandFailedError:
    message = argv[0] + b": " + reason + b"\n"
    result = CommandResult(
        argv=argv,
        exit_status=status,
        duration=0.0,
        captured_stdout=CapturedOutput.from_bytes(b""),
        captured_stderr=CapturedOutput.from_bytes(message),
    )
    return CommandFailedError(status, message, result)


def _outcome(command: _Command) -> CommandResult:
    status = command.exit_status
    if status is None:
        # Given up on after SIGKILL without an exit status.
        status = -signal.SIGKILL
    result = CommandResult(
        argv=command.argv,
        exit_status=status,
        duration=command.ended - command.started,
        captured_stdout=command.stdout,
        captured_stderr=command.stderr,
    )
    if status != 0:
        raise CommandFailedError(
            status, command.stderr.tail(STDERR_TAIL_SIZE), result=result
        )
    return result
