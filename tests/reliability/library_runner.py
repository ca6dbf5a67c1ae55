"""Run the crash campaign's items through the library, for a test to kill.

Usage: ``python -m tests.reliability.library_runner JOURNAL COUNT``

Applies `tests.reliability.ledger_tasks.record_attempt` to the items
``item-00001`` to ``item-COUNT`` on the process backend with the journal
``JOURNAL``. Called again with the same journal, it resumes the run. Exits
with status 0 when every item succeeded, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import batchtools
from tests.reliability.ledger_tasks import record_attempt

CONCURRENCY = 2


def item_names(count: int) -> Iterator[str]:
    """Yield the names of the campaign's ``count`` items, in input order."""
    return (f"item-{number:05d}" for number in range(1, count + 1))


def main(arguments: Sequence[str]) -> int:
    """Run or resume the items; return the exit status."""
    journal, count = arguments[0], int(arguments[1])
    report = batchtools.run(
        item_names(count),
        record_attempt,
        backend="process",
        concurrency=CONCURRENCY,
        journal=journal,
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
