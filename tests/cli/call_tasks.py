"""Python functions for ``batchtools run --call`` in the CLI tests.

Worker processes import them by module and name, so they live in an
importable module. They report through files named by environment
variables, which the CLI's workers inherit.
"""

from __future__ import annotations

import os
import time

GATE_TIMEOUT = 60.0
"""Seconds a task waits for its gate file before it fails, so a broken test
cannot hang."""


def record_then_wait(item: str) -> str:
    """Append ``item`` to the ledger ``CALL_LEDGER``, then wait for ``CALL_GATE``.

    Raises:
        TimeoutError: The gate file did not appear within `GATE_TIMEOUT`.
    """
    line = f"{item} {os.getpid()}\n".encode()
    fd = os.open(os.environ["CALL_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    gate = os.environ["CALL_GATE"]
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {gate} did not appear")
        time.sleep(0.02)
    return item


def connect() -> str:
    """Setup function: return the worker's state, here a made-up session name."""
    return f"session-{os.getpid()}"


def disconnect(state: str) -> None:
    """Teardown function: note in ``CALL_LEDGER`` that ``state`` was closed."""
    with open(os.environ["CALL_LEDGER"], "a") as ledger:
        ledger.write(f"closed {state}\n")


def with_session(item: str, context: object) -> str:
    """Return the item with the worker's session name."""
    return f"{item} {getattr(context, 'state', None)}"


def worker_pid(item: str) -> str:
    """Return the pid of the process that executed the item."""
    return str(os.getpid())


def primary(item: str) -> str:
    """Fail for items that start with ``bad``; return the others marked."""
    if item.startswith("bad"):
        raise ConnectionError(f"primary cannot serve {item}")
    return f"{item} from primary"


def backup(item: str) -> str:
    """Serve every item, marked as coming from the backup."""
    return f"{item} from backup"


def count_call(item: str) -> str:
    """Append the item to ``CALL_LEDGER`` and return it reversed."""
    with open(os.environ["CALL_LEDGER"], "a") as ledger:
        ledger.write(f"{item}\n")
    return item[::-1]
