"""Tasks for the dask backend tests.

They live in an importable module because Dask workers load a task by its
module and name. Tasks report what they saw through their return value or
through files whose paths travel in the item, never through shared memory.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from batchtools.backends._base import Context

CANCEL_WAIT = 30.0
"""Seconds a task waits for its cancel before it gives up, so no test hangs."""


def double(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def double_slowly(x: int) -> int:
    """Return ``2 * x`` after 2 ms, so that a run lasts long enough to disturb."""
    time.sleep(0.002)
    return 2 * x


def describe(x: int, context: Context) -> dict[str, Any]:
    """Return what the task saw: the item, its context and the worker's pid."""
    return {
        "value": 2 * x,
        "key": context.key,
        "run_id": context.run_id,
        "attempt": context.attempt,
        "seq": context.seq,
        "pid": os.getpid(),
        "state": context.state,
    }


def pid_of_worker(x: int) -> list[int]:
    """Return ``x`` and the id of the process that executed it, after 2 ms."""
    time.sleep(0.002)
    return [x, os.getpid()]


def succeed_on_third_attempt(x: int, context: Context) -> list[int]:
    """Raise ValueError on attempts 1 and 2; return ``[x, attempt]`` on the third."""
    if context.attempt < 3:
        raise ValueError(f"attempt {context.attempt} of item {x} fails on purpose")
    return [x, context.attempt]


def wait_for_cancel(marker: str, context: Context) -> str:
    """Wait until the driver cancels the attempt, then create ``marker``.

    Returns:
        ``"not cancelled"`` if no cancel arrived within `CANCEL_WAIT`.
    """
    cancelled = context.cancelled
    assert isinstance(cancelled, threading.Event)
    if not cancelled.wait(CANCEL_WAIT):
        return "not cancelled"
    Path(marker).write_text(str(os.getpid()))
    return "cancelled"


def record_interval(x: int) -> list[float]:
    """Sleep 20 ms and return when the call started and ended (CLOCK_MONOTONIC)."""
    started = time.monotonic()
    time.sleep(0.02)
    return [started, time.monotonic()]


def own_times(x: int) -> list[float]:
    """Sleep 20 ms; return the pid, thread, start and end (epoch seconds)."""
    started = time.time()
    time.sleep(0.02)
    return [os.getpid(), threading.get_ident(), started, time.time()]


def open_state(folder: str) -> str:
    """A setup function: create a file named after this process in ``folder``."""
    path = Path(folder) / f"setup-{os.getpid()}"
    path.write_text("set up")
    return f"state of {os.getpid()}"


def close_state(folder: str, state: str) -> None:
    """A teardown function: record ``state`` in a file in ``folder``."""
    (Path(folder) / f"teardown-{os.getpid()}").write_text(state)


def fail_setup() -> None:
    """A setup function that fails."""
    raise ConnectionError("the database at db.invalid refused the connection")


async def double_async(x: int) -> int:
    """Return ``2 * x``; a coroutine function, which the dask backend rejects."""
    return 2 * x
