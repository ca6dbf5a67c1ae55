"""Tasks shared by the benchmarks, in a module that worker processes can import.

Process pools pickle a module-level function by reference, so the CPU task
lives here rather than in a script that runs as ``__main__``.
"""

from __future__ import annotations

import asyncio


async def noop_async(item: object) -> None:
    """Yield to the event loop once, as any task waiting on I/O does, then return."""
    await asyncio.sleep(0)


def noop_sync(item: object) -> None:
    """Return at once; the thread benchmarks measure only the pool's overhead."""
    return None


def spin(item: int, length: int) -> int:
    """Sum ``length`` consecutive integers from ``item`` in a Python loop.

    The loop keeps one CPU busy for a time proportional to ``length`` and
    returns a small integer, so pickling the result costs next to nothing.
    """
    total = 0
    for value in range(item, item + length):
        total += value
    return total
