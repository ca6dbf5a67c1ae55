"""Record this program's arguments in a ledger file, for the CLI tests.

Usage: ``python probe.py LEDGER [ARG...]``

Appends one JSON line per call to LEDGER. The line holds the arguments
after LEDGER as hex strings, so that bytes that are not UTF-8 survive. It
also holds the ``PROBE_SESSION`` environment variable, which tells a test
which session of a run made the call. The line goes out in one ``write`` on
a file opened with ``O_APPEND``, so concurrent probes never interleave.

When the file named by ``PROBE_FAIL_LIST`` exists and lists the hex of the
last argument on a line of its own, the probe exits with status 3 after
recording the call.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    """Append the call to the ledger and return the exit status."""
    ledger = sys.argv[1]
    arguments = [os.fsencode(argument).hex() for argument in sys.argv[2:]]
    record = {"argv": arguments, "session": os.environ.get("PROBE_SESSION", "")}
    line = (json.dumps(record) + "\n").encode("ascii")
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    fail_list = os.environ.get("PROBE_FAIL_LIST")
    if fail_list and arguments:
        try:
            with open(fail_list, encoding="ascii") as stream:
                failing = set(stream.read().split())
        except FileNotFoundError:
            failing = set()
        if arguments[-1] in failing:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
