"""File utilities: atomic writes, file locks, batch reads and writes, search.

Each works on its own, without a run. `grep` is loaded on first use: it
imports the engine's helpers, and `batchtools.flow` imports this package
for its file locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchtools.fs.atomic import (
    WriteRecovery,
    atomic_write,
    atomic_write_many,
    atomic_writer,
    recover_writes,
)
from batchtools.fs.batch import (
    FileResult,
    FileResultStream,
    iter_read_many,
    iter_write_many,
    read_many,
    write_many,
)
from batchtools.fs.lock import FileLock

if TYPE_CHECKING:
    from batchtools.fs.grep import grep

__all__ = [
    "FileLock",
    "FileResult",
    "FileResultStream",
    "WriteRecovery",
    "atomic_write",
    "atomic_write_many",
    "atomic_writer",
    "grep",
    "iter_read_many",
    "iter_write_many",
    "read_many",
    "recover_writes",
    "write_many",
]


def __getattr__(name: str) -> Any:
    if name == "grep":
        from batchtools.fs.grep import grep

        return grep
    raise AttributeError(f"module 'batchtools.fs' has no attribute {name!r}")
