"""Task functions for the graph tests, in a module that workers can import.

Worker processes import a task by module and name, and ``batchtools graph``
imports ``call = "MODULE:FUNCTION"`` the same way, so these live in an
importable module rather than inside the tests.
"""

from __future__ import annotations

import collections


class Step:
    """A single-operation task that counts its calls and fails on request.

    Every instance has the same qualified name, so a graph rebuilt from new
    instances has the same signature and resumes the same journal.

    Args:
        name: The task's name, returned as its value.
        calls: Counts the calls of each name.
        broken: While the name is in this set, a call raises RuntimeError.
    """

    def __init__(
        self, name: str, calls: collections.Counter[str], broken: set[str]
    ) -> None:
        self.name = name
        self.calls = calls
        self.broken = broken

    def __call__(self) -> str:
        self.calls[self.name] += 1
        if self.name in self.broken:
            raise RuntimeError(f"step {self.name} is broken")
        return self.name


class ItemStep:
    """A task over items that counts its calls per item and fails on request.

    Args:
        calls: Counts the calls of each item.
        broken: While an item is in this set, its call raises ValueError.
    """

    def __init__(self, calls: collections.Counter[int], broken: set[int]) -> None:
        self.calls = calls
        self.broken = broken

    def __call__(self, item: int) -> int:
        self.calls[item] += 1
        if item in self.broken:
            raise ValueError(f"item {item} is broken")
        return item


def square(item: int) -> int:
    """Return the square of ``item``; runs in worker processes."""
    return item * item


def fail_on_three(item: int) -> int:
    """Return ``item``, or raise ValueError for 3; runs in worker processes.

    Raises:
        ValueError: The item is 3.
    """
    if item == 3:
        raise ValueError("three is not allowed")
    return item


def answer() -> int:
    """Return 42, for a single-operation ``call`` task of a job file."""
    return 42


def shout(item: str) -> str:
    """Return ``item`` in upper case, for a ``call`` task over items."""
    return item.upper()
