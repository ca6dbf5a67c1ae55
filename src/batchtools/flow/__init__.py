"""Flow: dependency graphs, pipelines, priority queues, transactions and locks.

Each runs on the engine, so it gets the engine's policies, backends,
journal and report.
"""

from batchtools.flow.locks import (
    KeyedLock,
    LockStatistics,
    RunResources,
    SharedState,
    open_run_resources,
)

__all__ = [
    "KeyedLock",
    "LockStatistics",
    "RunResources",
    "SharedState",
    "open_run_resources",
]
