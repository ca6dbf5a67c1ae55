"""Measure the journal writer's memory over commit groups of many sizes.

Usage: ``python -m tests.reliability.journal_memory JOURNAL GROUPS FIRST_SIZE``

Creates the journal, then commits GROUPS groups of new items, of
FIRST_SIZE, FIRST_SIZE + 1, ... items, one flush each, as the writer does
when items arrive at varying rates. Prints one JSON object with the
resident memory, in bytes, after the first group and after the last.
Runs in its own process, so that nothing else moves its memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import psutil

from batchtools.journal import Journal


def _rows(first_seq: int, count: int) -> list[tuple[int, str, str]]:
    rows = []
    for seq in range(first_seq, first_seq + count):
        text = json.dumps([f"item {seq:095d}"])
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        rows.append((seq, text, digest))
    return rows


async def measure(path: str, groups: int, first_size: int) -> dict[str, int]:
    """Commit the groups to a new journal at ``path``; return the memory figures."""
    journal = Journal.create(path, run_id="memory", signature="memory", spec={})
    journal.start(asyncio.get_running_loop())
    process = psutil.Process()
    seq = 0
    after_first = 0
    try:
        for size in range(first_size, first_size + groups):
            # The rare item that the writer's Bloom filter takes for a repeat
            # is left out, which changes a group's size by one or two.
            journal.register_new(_rows(seq, size))
            seq += size
            await journal.aflush()
            if not after_first:
                after_first = process.memory_info().rss
    finally:
        after_last = process.memory_info().rss
        journal.close()
    return {"after_first": after_first, "after_last": after_last, "items": seq}


def main(arguments: list[str]) -> int:
    """Run `measure` with the command-line arguments and print its figures."""
    path, groups, first_size = arguments[0], int(arguments[1]), int(arguments[2])
    print(json.dumps(asyncio.run(measure(path, groups, first_size))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
