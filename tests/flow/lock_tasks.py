"""Tasks for the process tests of `batchtools.flow.locks`.

Worker processes load a task by its module and name, so the tasks live in
an importable module. Each receives the lock and the shared state inside
its item, where they travel pickled as their paths.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from batchtools.flow.locks import KeyedLock, SharedState

LockItem = tuple[KeyedLock, SharedState, int]


def increment_under_lock(item: LockItem) -> int:
    """Increment ``count`` with a get and a set under the lock of ``"count"``.

    Returns:
        How many holders of the key, this one included, were inside at once,
        as counted in the shared state.
    """
    lock, shared, _ = item
    with lock.hold("count"):
        value = shared.get("count", 0)
        # Two write transactions between the read and the write widen the
        # window in which a broken lock would let another process in.
        inside: int = shared.update("inside", lambda n: n + 1, 0)
        shared.update("inside", lambda n: n - 1, 0)
        shared.set("count", value + 1)
    return inside


def increment_by_update(item: LockItem) -> int:
    """Increment ``count`` with one atomic update, without the lock.

    Returns:
        The value after this increment.
    """
    _, shared, _ = item
    value: int = shared.update("count", lambda n: n + 1, 0)
    return value


def hold_until_killed(lock: KeyedLock, key: str, connection: Connection) -> None:
    """Hold the lock of ``key``, send ``"held"``, and wait until the process dies."""
    with lock.hold(key):
        connection.send("held")
        connection.recv()
