"""The journal: the SQLite record of a run's items, attempts and outcomes."""

from batchtools.journal._journal import (
    ItemRow,
    Journal,
    RunRecord,
    check_path,
    count_states,
    item_history,
    iter_items,
    read_run,
)
from batchtools.journal._traces import (
    AttemptTrace,
    ItemTrace,
    JournalReader,
    TimelineSample,
)

__all__ = [
    "AttemptTrace",
    "ItemRow",
    "ItemTrace",
    "Journal",
    "JournalReader",
    "RunRecord",
    "TimelineSample",
    "check_path",
    "count_states",
    "item_history",
    "iter_items",
    "read_run",
]
