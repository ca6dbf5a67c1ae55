"""Helpers shared by the engine and leak tests: threads and child processes."""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import threading
import time

import psutil

JOIN_LIMIT = 20.0
"""Seconds to wait for threads that should be ending, generous for loaded machines."""


def multiprocessing_helpers() -> set[int]:
    """Return the pids of multiprocessing's forkserver and resource tracker.

    Both start once per process and outlive every run, so they are not leaks.
    """
    pids: set[int] = set()
    forkserver = getattr(multiprocessing.forkserver, "_forkserver", None)
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    for pid in (
        getattr(forkserver, "_forkserver_pid", None),
        getattr(tracker, "_pid", None),
    ):
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def child_processes() -> set[int]:
    """Return the pids of this process's descendants, except multiprocessing's.

    Worker processes of the process backend are children of the forkserver,
    so they are found through the recursive walk. Zombies count too.
    """
    helpers = multiprocessing_helpers()
    children = psutil.Process().children(recursive=True)
    return {child.pid for child in children if child.pid not in helpers}


def threads_still_alive(
    before: set[threading.Thread], limit: float = JOIN_LIMIT
) -> list[threading.Thread]:
    """Join the threads started since ``before``; return those still alive after.

    All the joins share one deadline of ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    alive = []
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            alive.append(thread)
    return alive
