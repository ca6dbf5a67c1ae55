"""Python tasks that record each attempt in a ledger file, to count executions.

The ledger's path and the number of the current session come from the
environment, which worker processes inherit from the process that runs the
library. Each attempt appends one line, ``ITEM SESSION``, with one
``write(2)`` on a descriptor opened with ``O_APPEND``, so lines of
concurrent workers never mix.
"""

from __future__ import annotations

import os
import time

LEDGER_VARIABLE = "RELIABILITY_LEDGER"
SESSION_VARIABLE = "RELIABILITY_SESSION"
WORK_SECONDS = 0.002
"""Seconds each attempt works after it recorded itself, so that a kill can
land between the side effect and the outcome."""


def append_to_ledger(item: str, session: str) -> None:
    """Append ``ITEM SESSION`` to the ledger named in the environment."""
    line = f"{item} {session}\n".encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    descriptor = os.open(os.environ[LEDGER_VARIABLE], flags, 0o600)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def record_attempt(item: str) -> str:
    """Record an attempt at ``item`` in the ledger, work briefly, return ``item``."""
    append_to_ledger(item, os.environ[SESSION_VARIABLE])
    time.sleep(WORK_SECONDS)
    return item
