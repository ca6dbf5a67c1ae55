"""Python tasks for ``batchtools run --call`` in the reliability campaign."""

from __future__ import annotations

import os


def ignore(item: str) -> None:
    """Do nothing with ``item``: the cheapest task, to measure the runner."""


async def ignore_async(item: str) -> None:
    """Do nothing with ``item``, as a coroutine function for the async backend."""


def fail_every_third(item: str) -> str:
    """Return ``item``, or raise `ValueError` when it is a multiple of three."""
    if int(item) % 3 == 0:
        raise ValueError(f"item {item} is a multiple of three")
    return item


def save_item(item: str) -> int:
    """Write ``item``'s bytes to the file ``$RELIABILITY_OUTPUT``; return its length."""
    data = os.fsencode(item)
    with open(os.environ["RELIABILITY_OUTPUT"], "wb") as stream:
        stream.write(data)
    return len(data)
