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

__all__ = [
    "ItemRow",
    "Journal",
    "RunRecord",
    "check_path",
    "count_states",
    "item_history",
    "iter_items",
    "read_run",
]
