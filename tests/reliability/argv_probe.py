"""Write this program's arguments to a new file, for the hostile-argument tests.

Usage: ``python argv_probe.py FOLDER [ARG...]``

Creates one new file in FOLDER per call and writes to it the `repr` of the
arguments after FOLDER, as a list of bytes. `os.fsencode` undoes Python's
decoding of argv, so a test reads back exactly the bytes the program got.
"""

from __future__ import annotations

import os
import sys
import tempfile


def main() -> int:
    """Write the arguments to a new file in the folder named first."""
    arguments = [os.fsencode(argument) for argument in sys.argv[2:]]
    descriptor, _ = tempfile.mkstemp(dir=sys.argv[1], prefix="call-")
    with os.fdopen(descriptor, "w", encoding="ascii") as stream:
        stream.write(repr(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
