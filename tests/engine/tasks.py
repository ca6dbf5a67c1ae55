"""Tasks that the engine tests run on the process backend.

Worker processes load a task by its module and qualified name, so these
live in an importable module. Tasks that must coordinate across processes
do it through files in a directory whose path travels in the payload.
"""

from __future__ import annotations

import os
import signal
import time

import batchtools

WAIT_LIMIT = 60.0
"""Seconds a task waits for other attempts before it fails, so a broken test ends."""

POLL_INTERVAL = 0.002
"""Seconds between two looks at the directory while a task waits."""


def fail_every_third(x: int) -> int:
    """Return ``x + 1000``, or raise ValueError when ``x`` is a multiple of 3."""
    if x % 3 == 0:
        raise ValueError(f"item {x} is a multiple of 3")
    return x + 1000


def _take_slot(directory: str) -> tuple[int, str]:
    slot = 0
    while True:
        path = os.path.join(directory, f"slot-{slot}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            slot += 1
            continue
        return slot, path


def _count_slots(directory: str) -> int:
    return sum(1 for name in os.listdir(directory) if name.startswith("slot-"))


def hold_slot_until_gathered(payload: tuple[str, int, int]) -> int:
    """Hold the lowest free slot until ``concurrency`` attempts held one at once.

    The payload is ``(directory, x, concurrency)``. A slot is a file created
    with O_EXCL and removed when the attempt ends, so two attempts that
    execute at the same time never share one. A slot number of
    ``concurrency`` or more means too many attempts executed at once. The
    first attempt that sees ``concurrency`` slot files creates the file
    ``gathered``; until it exists, every attempt waits with its slot held.
    Returns the slot number.

    Raises:
        TimeoutError: ``concurrency`` attempts never held slots at once
            within `WAIT_LIMIT` seconds.
    """
    directory, _, concurrency = payload
    slot, path = _take_slot(directory)
    gathered = os.path.join(directory, "gathered")
    # The wait is a poll of the directory with a deadline: the files, not
    # the interval, decide when it ends.
    deadline = time.monotonic() + WAIT_LIMIT
    try:
        while not os.path.exists(gathered):
            if _count_slots(directory) >= concurrency:
                with open(gathered, "a"):
                    pass
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{concurrency} attempts never executed at once "
                    f"within {WAIT_LIMIT} s"
                )
            time.sleep(POLL_INTERVAL)
    finally:
        os.unlink(path)
    return slot


class CodeAndReasonError(Exception):
    """An exception that pickles but cannot be unpickled.

    Pickle rebuilds an exception from its ``args``, which here hold one
    formatted message, while the constructor requires two arguments.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"error {code}: {reason}")
        self.code = code
        self.reason = reason


def raise_code_and_reason(x: int) -> int:
    """Raise `CodeAndReasonError` for item 7; return ``x`` otherwise."""
    if x == 7:
        raise CodeAndReasonError(x, "the quota is exhausted")
    return x


def kill_own_worker(payload: tuple[int, int]) -> int:
    """Kill the worker process with SIGKILL on the poison item; return ``x`` else.

    The payload is ``(x, poison)``.
    """
    x, poison = payload
    if x == poison:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def report_pid(x: int) -> int:
    """Return the id of the worker process that executed the item."""
    return os.getpid()


def wait_for_file(payload: tuple[str, int]) -> int:
    """Return ``x`` at once for item 0; otherwise first wait for a file.

    The payload is ``(directory, x)``, and the file is ``release`` in that
    directory. Tests that expect a cancel to kill the attempt never create
    it.

    Raises:
        TimeoutError: The file did not appear within `WAIT_LIMIT` seconds.
    """
    directory, x = payload
    if x == 0:
        return x
    release = os.path.join(directory, "release")
    deadline = time.monotonic() + WAIT_LIMIT
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} did not appear within {WAIT_LIMIT} s")
        time.sleep(POLL_INTERVAL)
    return x


# --- Worker state and memory limits ----------------------------------------


def worker_pid() -> int:
    """Setup function: return the worker process's pid as its state."""
    return os.getpid()


def state_and_pid(item: int, context: batchtools.Context) -> tuple[int, int]:
    """Return the worker's state next to the pid that executed the item."""
    return context.state, os.getpid()


def pid_of_worker(item: int) -> int:
    """Return the pid of the worker process that executed the item."""
    return os.getpid()


def hog_memory(item: str) -> str:
    """Hold about 300 MiB of touched memory for item ``"big"``, until killed."""
    if item == "big":
        ballast = b"x" * (300 * 2**20)
        time.sleep(60)
        return str(len(ballast))
    return item


def setup_that_fails() -> None:
    """Setup function that cannot connect."""
    raise ConnectionRefusedError("the database refused the connection")


def count_under_lock(item: int, context: batchtools.Context) -> int:
    """Read, then write, a shared counter while holding the run's lock."""
    with context.lock.hold("counter"):
        value = context.shared.get("counter", 0) + 1
        context.shared.set("counter", value)
    return int(value)


class SetupThatFailsOnce:
    """Setup function that fails the first time in a run, counted in a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self) -> str:
        try:
            descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return "connected"
        os.close(descriptor)
        raise ConnectionRefusedError("the database refused the connection once")


class SetupThatHangs:
    """Setup function that signals it started, by a file, then never returns."""

    def __init__(self, started: str) -> None:
        self.started = started

    def __call__(self) -> None:
        with open(self.started, "w"):
            pass
        time.sleep(WAIT_LIMIT)


def setup_slow_after_first(marker: str) -> None:
    """Return at once in the first worker, which creates ``marker``; else in 3 s."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        time.sleep(3)
    else:
        os.close(fd)


def sleep_if_slow(item: str) -> str:
    """Sleep a minute for the item ``slow``, return other items at once."""
    if item == "slow":
        time.sleep(60)
    return item
