"""Child process of the memory benchmarks: one measurement per interpreter.

Peak RSS only grows during a process's life, so each
measurement runs in a fresh interpreter started by `_common.run_child`. The
child prints one JSON object on its last line of output, with three fields.
``seconds`` is the timed part only, without the interpreter's start-up and
imports. ``rss_mb`` is the peak RSS of the whole process (see
`_common.peak_rss_mb`). ``count`` is the number of items processed or, for
a resume, taken from the journal.

Usage::

    python _child.py stream N
    python _child.py build-journal N PATH
    python _child.py resume N PATH
    python _child.py resume-stream N PATH
    python _child.py hash N
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable

from _common import peak_rss_mb
from _tasks import noop_async

import batchtools

CONCURRENCY = 100


def stream_items(count: int, journal: str | None) -> int:
    """Stream ``count`` no-op items and return how many outcomes arrived.

    With a journal, only outcomes taken from the journal are counted, so a
    resume that ran any item again reports fewer than ``count``.
    """
    received = 0
    with batchtools.stream(
        range(count), noop_async, concurrency=CONCURRENCY, journal=journal
    ) as outcomes:
        for outcome in outcomes:
            if not outcome.ok:
                raise RuntimeError(f"item failed: {outcome!r}")
            if journal is None or outcome.source == "journal":
                received += 1
    return received


def run_items(count: int, journal: str) -> int:
    """Run ``count`` no-op items with ``journal`` and return how many came from it."""
    report = batchtools.run(
        range(count), noop_async, concurrency=CONCURRENCY, journal=journal
    )
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")
    return report.from_journal


def hash_items(count: int) -> int:
    """Hash the repr of every item once, as a content key would, and return count."""
    hashed = 0
    for item in range(count):
        hashlib.blake2b(repr(item).encode()).digest()
        hashed += 1
    return hashed


def dispatch(arguments: list[str]) -> Callable[[], int]:
    """Return the measurement that ``arguments`` name.

    Raises:
        SystemExit: The mode is unknown or its arguments are missing.
    """
    if len(arguments) < 2:
        raise SystemExit(__doc__)
    mode, count = arguments[0], int(arguments[1])
    path = arguments[2] if len(arguments) > 2 else None
    if mode == "stream":
        return lambda: stream_items(count, None)
    if mode == "hash":
        return lambda: hash_items(count)
    if path is None:
        raise SystemExit(f"mode {mode!r} needs a journal path\n{__doc__}")
    if mode in ("build-journal", "resume"):
        return lambda: run_items(count, path)
    if mode == "resume-stream":
        return lambda: stream_items(count, path)
    raise SystemExit(f"unknown mode {mode!r}\n{__doc__}")


def main() -> None:
    """Run the measurement named on the command line and print its JSON line."""
    measurement = dispatch(sys.argv[1:])
    start = time.perf_counter()
    count = measurement()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb(), "count": count}))


if __name__ == "__main__":
    main()
