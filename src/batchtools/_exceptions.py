"""Exceptions raised by batchtools.

The tree, grouped by what the caller can do about each family::

    BatchtoolsError
    ├── ConfigurationError        fix the options, job file or task; nothing ran
    │   ├── TemplateError         a command template that cannot be rendered
    │   ├── GraphCycleError       the tasks of a graph depend on each other in a cycle
    │   └── SecretMissingError    a secret's source has no value (unset, no file)
    ├── JournalError              the journal cannot be used; committed work is kept
    │   ├── JournalLockedError    another live process holds the journal
    │   ├── JournalMismatchError  the journal belongs to a different run
    │   └── CacheError            the result cache file cannot be read or written
    ├── LockTimeoutError          a file lock was not free within its timeout
    ├── QueueClosedError          a priority queue accepts no more items
    ├── WriteRecoveryError        an interrupted multi-file write cannot be repaired
    ├── RunAbortedError           the run could not go on (exit status 3)
    └── AttemptError              one attempt failed; kept in outcomes, never raised
        ├── AttemptTimeoutError   the attempt ran past its timeout
        ├── CircuitOpenError      a circuit breaker is open for the item's key
        ├── CommandFailedError    a command exited non-zero or died by a signal
        ├── FallbackError         every strategy of a fallback chain failed
        ├── ItemsFailedError      more items of a graph task failed than it allows
        ├── MemoryLimitError      a worker process used more memory than allowed
        ├── PoolTimeoutError      no pooled resource was free within the timeout
        ├── WorkerLostError       the worker process died during the attempt
        │   └── DaskWorkerLostError   a Dask worker was lost while it held the attempt
        ├── RemoteError           stand-in for an exception that could not be
        │                         sent back from a worker process
        └── SecretExpiredError    the attempt read a secret after its expiry

Every exception keeps its facts as attributes and builds its text from them,
and each one pickles, so it crosses the process boundary intact.
"""

from __future__ import annotations

import signal
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from typing import Any


class BatchtoolsError(Exception):
    """Root of every exception that batchtools raises."""


class ConfigurationError(BatchtoolsError, ValueError):
    """Invalid options, job file, template or task, found before anything ran."""


class TemplateError(ConfigurationError):
    """A command template that cannot be parsed or rendered."""


class JournalError(BatchtoolsError):
    """The journal cannot be opened, read or written.

    Attributes:
        path: The journal file.
        resumable: Whether a resume can continue the run once the cause is
            fixed; ``False`` for a damaged file.
    """

    def __init__(self, path: str, message: str, *, resumable: bool = True) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message
        self.resumable = resumable

    def __str__(self) -> str:
        return f"journal {self.path}: {self.message}"


class JournalLockedError(JournalError):
    """Another live process holds the journal's writer lock."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        holder = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(
            path,
            f"it is in use by {holder}; wait for that run to end or stop it first",
        )
        self.holder_pid = holder_pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.holder_pid))


class JournalMismatchError(JournalError):
    """The journal was made by a different command, task or option set."""


class CacheError(JournalError):
    """The result cache's file cannot be read or written.

    A run goes on without the disk copy: values are kept in memory, and
    items whose values cannot be read run again.
    """

    def __str__(self) -> str:
        return f"result cache {self.path}: {self.message}"


class GraphCycleError(ConfigurationError):
    """The tasks' dependencies form a cycle, so no task of it could ever start.

    Attributes:
        cycle: The task names along the cycle, each needing the next, with
            the first name repeated at the end.
    """

    def __init__(self, cycle: Sequence[Hashable]) -> None:
        super().__init__(list(cycle))
        self.cycle = list(cycle)

    def __str__(self) -> str:
        path = " -> ".join(
            name if isinstance(name, str) else repr(name) for name in self.cycle
        )
        return (
            f"the tasks form a cycle: {path} (each needs the next), so none of "
            "them can start; remove one of these dependencies"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cycle,))


class LockTimeoutError(BatchtoolsError, TimeoutError):
    """A file lock was not free within the timeout.

    Attributes:
        path: The lock file.
        timeout: Seconds the caller waited.
        holder_pid: The pid of the process that holds the lock, or ``None``
            when it is unknown.
    """

    def __init__(self, path: str, timeout: float, holder_pid: int | None) -> None:
        super().__init__(path, timeout, holder_pid)
        self.path = path
        self.timeout = timeout
        self.holder_pid = holder_pid

    def __str__(self) -> str:
        holder = f"process {self.holder_pid}" if self.holder_pid else "another process"
        return (
            f"lock file '{self.path}' was not free within {self.timeout:g} s "
            f"because {holder} holds it; wait for it to finish or stop it, or "
            "give a longer timeout"
        )


class QueueClosedError(BatchtoolsError, RuntimeError):
    """An item was put into a priority queue that accepts no more items.

    Attributes:
        reason: Why the queue stopped accepting items.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"the priority queue accepts no more items: {self.reason}"


class WriteRecoveryError(BatchtoolsError):
    """The record of an interrupted multi-file write cannot be used or carried out.

    The record stays where it is, so a later recovery can try again once the
    cause is fixed.

    Attributes:
        path: The record, or the folder that keeps the records.
        message: What is wrong and what to do about it.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class RunAbortedError(BatchtoolsError):
    """The run could not go on; everything committed to the journal is kept."""


class AttemptError(BatchtoolsError):
    """Base of the errors that describe why one attempt failed."""


class AttemptTimeoutError(AttemptError, TimeoutError):
    """The attempt ran past its timeout and was stopped."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.timeout = timeout

    def __str__(self) -> str:
        return f"timed out after {self.timeout:g} s"


class CircuitOpenError(AttemptError):
    """A circuit breaker is open, so the call was not made.

    Attributes:
        key: The circuit's key (``None`` for an unkeyed breaker).
        retry_after: Seconds until the circuit lets a probe through.
    """

    def __init__(self, key: Any, retry_after: float) -> None:
        super().__init__(key, retry_after)
        self.key = key
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = "" if self.key is None else f" for {self.key!r}"
        return (
            f"circuit open{where}; it lets a probe through in {self.retry_after:.1f} s"
        )


class FallbackError(AttemptError):
    """Every strategy of a fallback chain failed.

    Attributes:
        strategies: The strategies' names, in the order they were tried.
        errors: Each strategy's error, in the same order.
    """

    def __init__(self, strategies: list[str], errors: list[BaseException]) -> None:
        super().__init__(strategies, errors)
        self.strategies = strategies
        self.errors = errors

    def __str__(self) -> str:
        parts = [
            f"{name}: {type(error).__name__}: {error}"
            for name, error in zip(self.strategies, self.errors, strict=True)
        ]
        return "every strategy failed; " + "; ".join(parts)


class CommandFailedError(AttemptError):
    """A command exited with a non-zero status or was killed by a signal.

    Attributes:
        exit_status: The exit status, or the negative signal number when a
            signal ended the command, as `subprocess` reports it.
        stderr_tail: The last bytes the command wrote to stderr.
        result: The command's captured output, when the backend kept it; it
            is not pickled.
    """

    def __init__(
        self, exit_status: int, stderr_tail: bytes = b"", result: Any = None
    ) -> None:
        super().__init__(exit_status, stderr_tail)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail
        self.result = result

    def __str__(self) -> str:
        if self.exit_status < 0:
            return f"killed by {signal_name(-self.exit_status)}"
        return f"exit status {self.exit_status}"


class MemoryLimitError(AttemptError):
    """A worker process used more memory than allowed and was killed.

    Attributes:
        rss: The worker's resident memory when it was killed, in bytes.
        limit: The allowed resident memory, in bytes.
    """

    def __init__(self, rss: int, limit: int) -> None:
        super().__init__(rss, limit)
        self.rss = rss
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"the worker process used {format_size(self.rss)}, more than the "
            f"limit of {format_size(self.limit)}, and was killed"
        )


class PoolTimeoutError(AttemptError, TimeoutError):
    """No resource of a pool was free within the acquire timeout.

    Attributes:
        pool: The pool's name.
        timeout: Seconds the caller waited.
        size: How many resources the pool held, all of them in use.
    """

    def __init__(self, pool: str, timeout: float, size: int) -> None:
        super().__init__(pool, timeout, size)
        self.pool = pool
        self.timeout = timeout
        self.size = size

    def __str__(self) -> str:
        return (
            f"no resource of pool {self.pool!r} was free within {self.timeout:g} s "
            f"(all {self.size} in use); raise its max_size or acquire_timeout, "
            "or lower the concurrency"
        )


class ItemsFailedError(AttemptError):
    """More items of a task over items failed than its ``allow_failures`` allows.

    Attributes:
        task: The task's name.
        failed: Items that did not succeed (failed, skipped or cancelled).
        total: Items that reached an outcome.
        allowed: The allowance as text, such as ``"0 items"`` or ``"5%"``.
        cause: The most common cause of failure, if any item failed.
    """

    def __init__(
        self, task: str, failed: int, total: int, allowed: str, cause: str | None
    ) -> None:
        super().__init__(task, failed, total, allowed, cause)
        self.task = task
        self.failed = failed
        self.total = total
        self.allowed = allowed
        self.cause = cause

    def __str__(self) -> str:
        text = (
            f"{self.failed} of {self.total} items did not succeed "
            f"(allow_failures permits {self.allowed})"
        )
        return f"{text}; most common cause: {self.cause}" if self.cause else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.task, self.failed, self.total, self.allowed, self.cause),
        )


class WorkerLostError(AttemptError):
    """The worker process died while it ran the attempt.

    Attributes:
        exit_status: The worker's exit code, or the negative signal number.
    """

    def __init__(self, exit_status: int | None) -> None:
        super().__init__(exit_status)
        self.exit_status = exit_status

    def __str__(self) -> str:
        if self.exit_status is None:
            return "worker process died"
        if self.exit_status < 0:
            return f"worker process killed by {signal_name(-self.exit_status)}"
        return f"worker process exited with status {self.exit_status}"


class DaskWorkerLostError(WorkerLostError):
    """A Dask worker died, or left the cluster, while it held the attempt.

    The scheduler reports the loss without an exit status, so
    ``exit_status`` is ``None``.

    Attributes:
        address: The lost worker's address, such as ``tcp://10.0.0.7:40211``.
    """

    def __init__(self, address: str) -> None:
        super().__init__(None)
        self.args = (address,)
        self.address = address

    def __str__(self) -> str:
        return f"Dask worker {self.address} was lost while it held the attempt"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.address,))


class RemoteError(AttemptError):
    """Stand-in for an exception raised in a worker that could not be pickled.

    Attributes:
        type_name: The qualified name of the original exception type.
        message: `str()` of the original exception.
        traceback_text: The formatted traceback from the worker.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class SecretMissingError(ConfigurationError):
    """A secret's source has no value, or the secret was never registered.

    Attributes:
        name: The secret's name.
        source: Where the value was to come from, such as ``env:DB_PASS``.
        reason: What is missing and how to provide it.
    """

    def __init__(self, name: str, source: str, reason: str) -> None:
        super().__init__(name, source, reason)
        self.name = name
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"secret {self.name!r}{where} is missing: {self.reason}"


class SecretExpiredError(AttemptError):
    """The attempt read a secret whose expiry time had passed.

    Attributes:
        name: The secret's name.
        expires_at: When the secret expired, in seconds since the epoch, on
            the clock of its store.
    """

    def __init__(self, name: str, expires_at: float) -> None:
        super().__init__(name, expires_at)
        self.name = name
        self.expires_at = expires_at

    def __str__(self) -> str:
        try:
            when = datetime.fromtimestamp(self.expires_at, UTC)
            moment = when.isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            moment = f"{self.expires_at:g} s after the epoch"
        return (
            f"secret {self.name!r} expired at {moment}; renew it and run the "
            "failed items again"
        )


def format_size(size: int) -> str:
    """Format bytes for messages: ``512 bytes``, ``3.5 KiB``, ``120.3 MiB``."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def signal_name(number: int) -> str:
    """Return the conventional name of a signal number, such as ``SIGKILL``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
