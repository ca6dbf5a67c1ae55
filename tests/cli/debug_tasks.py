"""Python functions for the CLI tests of --pdb, --pdb-at and foreground retries.

Worker processes and the CLI import them by module and name, so they live
in an importable module.
"""

from __future__ import annotations

import sys


def fail_on_bad(item: str) -> str:
    """Raise for the item ``bad``; return the others in upper case."""
    if item == "bad":
        raise ValueError(f"cannot handle {item}")
    return item.upper()


async def fail_on_bad_async(item: str) -> str:
    """The coroutine version of `fail_on_bad`."""
    if item == "bad":
        raise ValueError(f"cannot handle {item}")
    return item.upper()


def talk_then_fail_on_bad(item: str) -> str:
    """Write a line to stdout and one to stderr, then behave as `fail_on_bad`."""
    print(f"stdout of {item}", flush=True)
    print(f"stderr of {item}", file=sys.stderr, flush=True)
    return fail_on_bad(item)


def identity(item: str) -> str:
    """Return the item."""
    return item


def identity_batch(items: list[str]) -> list[str]:
    """Return the items of a batch (``-n``), one value per item."""
    return items
