"""Tasks for the process backend tests.

They live in an importable module because worker processes load a task by
its module and name. Tasks that coordinate with a test use named pipes
(FIFOs) whose paths travel in the payload. A task writes a line to an events
FIFO to report its progress, and reads a byte from a gate FIFO to wait until
the test lets it continue.
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
    """An exception that cannot be unpickled.

    Its ``args`` contain one value, so unpickling calls ``__init__`` with one
    argument where it requires two.
    """

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
    """An object that pickles anywhere but raises RuntimeError when unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _rebuild_unless_in(pid: int) -> UnpicklableInProcess:
    if os.getpid() == pid:
        raise RuntimeError(f"this object cannot be unpickled in process {pid}")
    return UnpicklableInProcess(pid)


class UnpicklableInProcess:
    """An object that raises RuntimeError when unpickled in process ``pid``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unless_in, (self.pid,))


def return_unpicklable_in(pid: int) -> UnpicklableInProcess:
    """Return a value that cannot be unpickled in process ``pid``."""
    return UnpicklableInProcess(pid)


class ExitOnLoad:
    """A callable task whose unpickling ends the process with exit status 7."""

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (7,))


def identity(x: Any) -> Any:
    """Return the payload as it arrived."""
    return x


def make_bytes(size: int) -> bytes:
    """Return ``size`` bytes of a repeating pattern."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


def _send_event(events: str, line: str) -> None:
    with open(events, "wb", buffering=0) as pipe:
        pipe.write(f"{line}\n".encode())


def _wait_at_gate(gate: str) -> None:
    descriptor = os.open(gate, os.O_RDONLY)
    try:
        ready, _, _ = select.select([descriptor], [], [], GATE_TIMEOUT)
        if not ready:
            raise TimeoutError(f"timed out after {GATE_TIMEOUT:g} s at the gate {gate}")
        os.read(descriptor, 1)
    finally:
        os.close(descriptor)


def run_once(payload: tuple[str, int, str]) -> tuple[int, int]:
    """Mark item ``x`` as run, perform ``action``, and return ``x`` and the pid.

    The payload is ``(directory, x, action)``. The marker file is created
    with O_EXCL, so an item that runs a second time raises FileExistsError.
    The actions are:

    * ``""``: nothing more.
    * ``sigkill``, ``sigsegv``, ``exit3``: end the worker process that way.
    * ``block:<events>:<gate>``: send the event ``started <x> <pid>``, then
      wait at the gate.
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
    """Hold the lowest free slot while waiting at the gate, then return the slot.

    The payload is ``(directory, x, events, gate)``, and the event sent is
    ``started <x> <slot> <pid>``. Slots are files created with O_EXCL, so two
    items that execute at the same time never share one, and the highest
    slot seen is the highest number of items that executed at once, minus
    one.
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
        _send_event(events, f"started {x} {slot} {os.getpid()}")
        _wait_at_gate(gate)
    finally:
        os.unlink(path)
    return slot
