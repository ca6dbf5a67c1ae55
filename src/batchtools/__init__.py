"""Apply one operation to many items: bounded concurrency, retries, a journal.

The entry points are `run` (returns a `Report`), `stream` (yields
outcomes as they finish) and their async twins `arun` and `astream`.
"""

import typing as _typing

from batchtools._exceptions import (
    AttemptError,
    AttemptTimeoutError,
    BatchtoolsError,
    CacheError,
    CircuitOpenError,
    CommandFailedError,
    ConfigurationError,
    DaskWorkerLostError,
    FallbackError,
    GraphCycleError,
    ItemsFailedError,
    JournalError,
    JournalLockedError,
    JournalMismatchError,
    LockTimeoutError,
    MemoryLimitError,
    PoolTimeoutError,
    QueueClosedError,
    RemoteError,
    RunAbortedError,
    SecretExpiredError,
    SecretMissingError,
    TemplateError,
    WorkerLostError,
    WriteRecoveryError,
)
from batchtools.backends._base import Context
from batchtools.backends._cluster import DaskCluster
from batchtools.engine._api import AsyncStream, Stream, arun, astream, run, stream
from batchtools.engine._engine import Interrupted, Observer
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import Attempt, FailureGroup, Outcome, Report, State
from batchtools.flow import (
    Graph,
    KeyedLock,
    Pipeline,
    PriorityQueue,
    SharedState,
    Stage,
    Step,
    SyncPriorityQueue,
    Transaction,
)
from batchtools.fs import (
    FileLock,
    atomic_write,
    atomic_write_many,
    atomic_writer,
    read_many,
    recover_writes,
    write_many,
)
from batchtools.policy import (
    Backoff,
    Cache,
    CircuitBreaker,
    Concurrency,
    Fallback,
    Memory,
    RateLimit,
    ResourcePool,
    Retry,
    parse_duration,
    parse_size,
)
from batchtools.secrets import SecretStore

if _typing.TYPE_CHECKING:
    from batchtools.fs.grep import grep
    from batchtools.observe.audit import AuditLog
    from batchtools.observe.metrics import Metrics

__version__ = "0.1.0"

# Loaded on first use, so that `import batchtools` and every command of the
# CLI do not pay for the search workers, the HTTP server and the audit log.
_LAZY = {
    "grep": "batchtools.fs.grep",
    "AuditLog": "batchtools.observe.audit",
    "Metrics": "batchtools.observe.metrics",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchtools' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module), name)


__all__ = [
    "AsyncStream",
    "Attempt",
    "AttemptError",
    "AttemptTimeoutError",
    "AuditLog",
    "Backoff",
    "BatchtoolsError",
    "Cache",
    "CacheError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CommandFailedError",
    "Concurrency",
    "ConfigurationError",
    "Context",
    "DaskCluster",
    "DaskWorkerLostError",
    "FailureGroup",
    "Fallback",
    "FallbackError",
    "FileLock",
    "Graph",
    "GraphCycleError",
    "Halt",
    "Interrupted",
    "ItemsFailedError",
    "JournalError",
    "JournalLockedError",
    "JournalMismatchError",
    "KeyedLock",
    "LockTimeoutError",
    "Memory",
    "MemoryLimitError",
    "Metrics",
    "Observer",
    "Outcome",
    "Pipeline",
    "PoolTimeoutError",
    "PriorityQueue",
    "QueueClosedError",
    "RateLimit",
    "RemoteError",
    "Report",
    "ResourcePool",
    "Retry",
    "RunAbortedError",
    "SecretExpiredError",
    "SecretMissingError",
    "SecretStore",
    "SharedState",
    "Stage",
    "State",
    "Step",
    "Stream",
    "SyncPriorityQueue",
    "TemplateError",
    "Transaction",
    "WorkerLostError",
    "WriteRecoveryError",
    "arun",
    "astream",
    "atomic_write",
    "atomic_write_many",
    "atomic_writer",
    "grep",
    "parse_duration",
    "parse_size",
    "read_many",
    "recover_writes",
    "run",
    "stream",
    "write_many",
]
