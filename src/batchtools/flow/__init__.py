"""Flow: dependency graphs, pipelines, priority queues, transactions and locks.

Each runs on the engine, so it gets the engine's policies, backends,
journal and report.
"""

from batchtools.flow.graph import Graph, GraphReport, TaskResult
from batchtools.flow.locks import (
    KeyedLock,
    LockStatistics,
    RunResources,
    SharedState,
    open_run_resources,
)
from batchtools.flow.pipeline import (
    Pipeline,
    PipelineOutcome,
    PipelineReport,
    Stage,
    StageReport,
)
from batchtools.flow.prioritized import prioritized
from batchtools.flow.queue import PriorityQueue, QueueStatistics, SyncPriorityQueue
from batchtools.flow.transaction import (
    Step,
    StepContext,
    Transaction,
    TransactionReport,
    TransactionStatus,
)

__all__ = [
    "Graph",
    "GraphReport",
    "KeyedLock",
    "LockStatistics",
    "Pipeline",
    "PipelineOutcome",
    "PipelineReport",
    "PriorityQueue",
    "QueueStatistics",
    "RunResources",
    "SharedState",
    "Stage",
    "StageReport",
    "Step",
    "StepContext",
    "SyncPriorityQueue",
    "TaskResult",
    "Transaction",
    "TransactionReport",
    "TransactionStatus",
    "open_run_resources",
    "prioritized",
]
