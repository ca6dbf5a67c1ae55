"""Apply one operation to many items: bounded concurrency, retries, a journal.

The entry points are `run` (returns a `Report`), `stream` (yields
outcomes as they finish) and their async twins `arun` and `astream`.
"""

from batchtools._exceptions import (
    AttemptError,
    AttemptTimeoutError,
    BatchtoolsError,
    CircuitOpenError,
    CommandFailedError,
    ConfigurationError,
    FallbackError,
    JournalError,
    JournalLockedError,
    JournalMismatchError,
    MemoryLimitError,
    PoolTimeoutError,
    RemoteError,
    RunAbortedError,
    TemplateError,
    WorkerLostError,
)
from batchtools.backends._base import Context
from batchtools.engine._api import AsyncStream, Stream, arun, astream, run, stream
from batchtools.engine._engine import Interrupted, Observer
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import Attempt, FailureGroup, Outcome, Report, State
from batchtools.flow import KeyedLock, SharedState
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

__version__ = "0.1.0"

__all__ = [
    "AsyncStream",
    "Attempt",
    "AttemptError",
    "AttemptTimeoutError",
    "Backoff",
    "BatchtoolsError",
    "Cache",
    "CircuitBreaker",
    "CircuitOpenError",
    "CommandFailedError",
    "Concurrency",
    "ConfigurationError",
    "Context",
    "FailureGroup",
    "Fallback",
    "FallbackError",
    "Halt",
    "Interrupted",
    "JournalError",
    "JournalLockedError",
    "JournalMismatchError",
    "KeyedLock",
    "Memory",
    "MemoryLimitError",
    "Observer",
    "Outcome",
    "PoolTimeoutError",
    "RateLimit",
    "RemoteError",
    "Report",
    "ResourcePool",
    "Retry",
    "RunAbortedError",
    "SharedState",
    "State",
    "Stream",
    "TemplateError",
    "WorkerLostError",
    "arun",
    "astream",
    "parse_duration",
    "parse_size",
    "run",
    "stream",
]
