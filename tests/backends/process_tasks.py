"""Tasks for the process backend tests.

They live in an importable module because worker processes load a task by
its module and name. Tasks that must coordinate with a test talk to it
through named pipes (FIFOs), whose paths travel in the payload: a task
writes a line to an events FIFO to say where it is, and reads a byte from a
gate FIFO to wait until the test lets it go on.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Any

from batchtools.backends._base import Context

GATE_TIMEOUT = 60.0
"""Seconds a task waits at a gate before it fails, so a broken test cannot hang."""


def square(x: int) -> int:
    """Return ``x * x``."""
    return x * x


def square_or_fail(x: int) -> int:
    """Return ``x * x``, or raise ValueError when ``x % 7 == 3``."""
    if x % 7 == 3:
        raise ValueError(f"bad item {x}")
    return x * x


def report_pid(x: int) -> tuple[int, int]:
    """Return ``x`` and the id of the worker process that executed it."""
    return x, os.getpid()


def describe_context(x: int, context: Context) -> tuple[int, str, int, int]:
    """Return ``x`` with the key, attempt and seq of the context it received."""
    return x, context.key, context.attempt, context.seq


class TwoArgumentError(Exception):
    """An exception that cannot be unpickled: pickle calls it with one argument."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


def raise_two_argument_error(x: int) -> None:
    """Raise `TwoArgumentError`."""
    raise TwoArgumentError(x, "the disk is full")


def raise_base_exception(kind: str) -> int:
    """Raise KeyboardInterrupt or SystemExit as named, else return the pid."""
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "exit":
        raise SystemExit(4)
    return os.getpid()


def return_lock(x: int) -> threading.Lock:
    """Return a value that cannot be pickled."""
    return threading.Lock()


def _explode() -> None:
    raise RuntimeError("this object cannot be unpickled here")


class UnpicklableHere:
    """Pickles anywhere, but unpickling it raises RuntimeError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _rebuild_unless_in(pid: int) -> UnpicklableInProcess:
    if os.getpid() == pid:
        raise RuntimeError(f"this object cannot be unpickled in process {pid}")
    return UnpicklableInProcess(pid)


class UnpicklableInProcess:
    """Pickles anywhere, but unpickling it in process ``pid`` raises RuntimeError."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unless_in, (self.pid,))


def return_unpicklable_in(pid: int) -> UnpicklableInProcess:
    """Return a value that cannot be unpickled in process ``pid``."""
    return UnpicklableInProcess(pid)


def identity(x: Any) -> Any:
    """Return the payload as it arrived."""
    return x


def _send_event(events: str, line: str) -> None:
    with open(events, "wb", buffering=0) as pipe:
        pipe.write(f"{line}\n".encode())


def _wait_at_gate(gate: str) -> None:
    descriptor = os.open(gate, os.O_RDONLY)
    try:
        ready, _, _ = select.select([descriptor], [], [], GATE_TIMEOUT)
        if not ready:
            raise TimeoutError(f"nobody opened the gate {gate}")
        os.read(descriptor, 1)
    finally:
        os.close(descriptor)


def run_once(payload: tuple[str, int, str]) -> tuple[int, int]:
    """Mark item ``x`` as run, act as told, and return ``x`` and the pid.

    The payload is ``(directory, x, action)``. The marker file is created
    with O_EXCL, so an item that runs a second time raises FileExistsError.
    Actions: ``""`` does nothing more; ``sigkill``, ``sigsegv`` and ``exit3``
    end the worker process; ``block:<events>:<gate>`` sends the event
    ``started <x> <pid>`` and then waits at the gate.
    """
    directory, x, action = payload
    marker = os.open(
        os.path.join(directory, f"ran-{x}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY
    )
    os.close(marker)
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigsegv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "exit3":
        os._exit(3)
    elif action.startswith("block:"):
        _, events, gate = action.split(":")
        _send_event(events, f"started {x} {os.getpid()}")
        _wait_at_gate(gate)
    return x, os.getpid()


def hold_slot(payload: tuple[str, int, str, str]) -> int:
    """Occupy the lowest free slot while waiting at the gate; return the slot.

    The payload is ``(directory, x, events, gate)``. Slots are files created
    with O_EXCL, so two items that execute at the same time never share one,
    and the highest slot seen is the highest number of items that executed
    at once, minus one.
    """
    directory, x, events, gate = payload
    slot = 0
    while True:
        path = os.path.join(directory, f"slot-{slot}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            slot += 1
            continue
        break
    try:
        _send_event(events, f"started {x} {slot}")
        _wait_at_gate(gate)
    finally:
        os.unlink(path)
    return slot
