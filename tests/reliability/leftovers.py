"""What a run may leave behind: processes, file descriptors and threads.

CLI scenarios start the CLI in its own session. Every process it starts,
however deep, shares that session id unless it calls ``setsid`` itself, so
commands that must be found in any case also carry a marker argument.
Library scenarios run in this process and compare its counts of open file
descriptors, threads and child processes before and after.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from tests.cli.support import wait_until
from tests.test_leaks import Resources, measure


def session_processes(session: int) -> list[psutil.Process]:
    """Return the live, non-zombie processes whose session id is ``session``."""
    found = []
    for process in psutil.process_iter(["status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except OSError:
            continue  # The process ended while the list was read.
    return found


def marked_processes(marker: str) -> list[psutil.Process]:
    """Return the live, non-zombie processes with ``marker`` as one argument."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if marker in (info["cmdline"] or []):
            found.append(process)
    return found


def still_alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Return the processes of ``processes`` that run and are not zombies.

    `psutil.Process.is_running` compares the start time too, so a process
    whose pid was reused does not count.
    """
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def describe(processes: Iterable[psutil.Process]) -> list[str]:
    """Return ``pid: argv`` of each process, for an assertion message."""
    lines = []
    for process in processes:
        try:
            lines.append(f"{process.pid}: {' '.join(process.cmdline())}")
        except psutil.Error:
            lines.append(f"{process.pid}: (ended)")
    return lines


def wait_for_session_end(session: int, description: str) -> None:
    """Wait until no process of ``session`` is left, such as orphaned commands.

    Raises:
        AssertionError: Processes of the session are still alive after
            `tests.cli.support.WAIT_TIMEOUT` seconds.
    """
    wait_until(lambda: not session_processes(session), description)


@dataclass
class ResourceCheck:
    """This process's descriptors, threads and children before a scenario.

    Call `leaks` after the scenario: it joins the threads that are ending
    by themselves, counts again and returns what grew.
    """

    threads_before: set[threading.Thread]
    before: Resources

    @classmethod
    def start(cls) -> ResourceCheck:
        """Count the resources now, joining threads left by earlier scenarios."""
        threads = set(threading.enumerate())
        return cls(threads, measure(threads))

    def leaks(self) -> dict[str, int]:
        """Return how many descriptors, threads and children were added.

        Raises:
            AssertionError: A thread started by the scenario is still alive
                after `tests.engine.support.JOIN_LIMIT` seconds.
        """
        after = measure(self.threads_before)
        return {
            "descriptors": after.descriptors - self.before.descriptors,
            "threads": after.threads - self.before.threads,
            "children": len(after.children - self.before.children),
        }
