"""A command that prints its secret, as a careless program might.

Usage: ``python leaky_command.py ITEM``. It reads the secret from the
environment variable ``TOKEN`` and writes it whole to stdout. Then it writes
it to stderr in two writes, with a flush and a pause between, so that the
two halves reach the reading end of the pipe in separate reads. Last, it
reports whether its own command line (``/proc/self/cmdline``) and its
environment contain the value, without printing it, and exits with status
1 for the item ``bad`` and 0 otherwise.
"""

from __future__ import annotations

import os
import sys
import time

# Long enough for the reader to take the first half before the second is
# written; the test passes either way, but then proves less.
PAUSE = 0.2


def main() -> int:
    item = sys.argv[1]
    token = os.environ["TOKEN"]
    sys.stdout.write(f"item {item} token {token}\n")
    sys.stdout.flush()
    half = len(token) // 2
    sys.stderr.write(f"warning for {item}: token {token[:half]}")
    sys.stderr.flush()
    time.sleep(PAUSE)
    sys.stderr.write(f"{token[half:]} was rejected\n")
    sys.stderr.flush()
    try:
        with open("/proc/self/cmdline", "rb") as file:
            command_line = file.read()
    except FileNotFoundError:  # no /proc (macOS): the interpreter's own record
        command_line = "\0".join(sys.orig_argv).encode()
    in_argv = token.encode() in command_line
    sys.stdout.write(f"argv has the token: {in_argv}\n")
    sys.stdout.write(f"environment has the token: {'TOKEN' in os.environ}\n")
    return 1 if item == "bad" else 0


if __name__ == "__main__":
    sys.exit(main())
