"""Search one file for matching lines, and the loop of a search worker process.

This module imports only the standard library, because `batchtools.fs.grep`
runs it as a script (``python -I -S _grep_worker.py STOP_FD``) for its
worker processes. Such a worker is ready in about 35 ms, where one that
imports the batchtools package takes 0.25 to 0.4 s. `batchtools.fs.grep`
also imports this module to search small trees in its own process.

The protocol uses the framing of `multiprocessing.connection.Connection`.
The parent writes to the worker's standard input one pickled settings
tuple, ``(pattern, flags, mode, limit)``, then pickled lists of paths. For
each list the worker writes one pickled list of outcomes, in the same
order, to its standard output, and it exits at the end of its input.
Before each file it polls the stop pipe, whose read end it inherits as
STOP_FD. Once the parent writes to that pipe or closes it, the worker
returns `NOT_READ` for every file it has not opened yet.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import signal
import sys
from multiprocessing.connection import Connection

# Output modes of a search.
LINES = 0  # every matching line, with its number
FILES = 1  # whether the file has a match at all
COUNTS = 2  # how many lines match

# The status of one file's outcome.
TEXT = 0  # searched; count and lines are valid
BINARY = 1  # contains a NUL byte, so it was skipped
FAILED = 2  # could not be opened or read, for the reason in the message
NOT_READ = 3  # the search had stopped before this file was opened

BLOCK_BYTES = 1 << 20
"""Bytes read at a time. A file is searched block by block, so memory stays
bounded by the block plus the longest line, whatever the file's size."""

FIRST_BLOCK_BYTES = 65536
"""Bytes of the first read. Most binary files show a NUL byte within them,
so a binary file costs one small read, as in GNU grep."""
_NO_LINES: list[tuple[int, bytes]] = []

Outcome = tuple[int, int, list[tuple[int, bytes]], int, str]
"""One file's result: status, matching lines counted, the ``(line number,
line)`` pairs in `LINES` mode, bytes read, and the error message."""


class _Scan:
    """The matching lines found so far in one file, fed block by block."""

    __slots__ = ("count", "done", "limit", "line_base", "lines", "mode", "search")

    def __init__(self, regex: re.Pattern[bytes], mode: int, limit: int | None) -> None:
        self.search = regex.search
        self.mode = mode
        self.limit = limit
        self.count = 0
        self.lines: list[tuple[int, bytes]] = []
        self.line_base = 0  # lines in the data scanned before
        self.done = limit == 0

    def scan(self, data: bytes, end: int) -> None:
        """Find the matching lines of ``data[:end]``.

        ``data`` starts at the start of a line, and ``end`` is just after a
        newline or at the end of the file.

        The regex runs over the whole region at once, which is much faster
        than one call per line. A match that runs over a newline (``\\s`` and
        ``[^x]`` match one) proves nothing about its line, so that line is
        searched again on its own, as grep searches it. The next search starts
        at the next line either way, so a line is counted at most once.
        """
        search = self.search
        collect = self.mode == LINES
        position = 0
        counted = 0
        base = self.line_base
        while position < end:
            match = search(data, position, end)
            if match is None:
                break
            start = match.start()
            if start == end and data[end - 1] == 0x0A:
                break  # an empty match after the last newline: no line there
            newline = data.rfind(b"\n", position, start)
            line_start = position if newline < 0 else newline + 1
            line_end = data.find(b"\n", start, end)
            if line_end < 0:
                line_end = end
            position = line_end + 1
            if match.end() > line_end and search(data, line_start, line_end) is None:
                continue
            self.count += 1
            if collect:
                base += data.count(b"\n", counted, line_start)
                counted = line_start
                self.lines.append((base + 1, data[line_start:line_end]))
            if self.mode == FILES or self.count == self.limit:
                self.done = True
                return
        if collect:
            self.line_base = base + data.count(b"\n", counted, end)


class Searcher:
    """Searches files for lines that match one compiled pattern.

    Args:
        pattern: The regular expression, as bytes.
        flags: `re` flags; `re.MULTILINE` is added.
        mode: `LINES`, `FILES` or `COUNTS`.
        limit: Stop counting a file's matches at this many; ``None`` for
            no limit.
    """

    def __init__(
        self, pattern: bytes, flags: int, mode: int, limit: int | None
    ) -> None:
        self.regex = re.compile(pattern, flags | re.MULTILINE)
        self.mode = mode
        self.limit = limit

    def search(self, path: str, limit: int | None = None) -> Outcome:
        """Search the file at ``path`` and return its outcome.

        A NUL byte anywhere makes the file binary, so the file is read to
        its end even after the last match it may report. The regex stops at
        the first match (`FILES`) or at the limit, but the NUL check goes on.

        Args:
            path: The file.
            limit: A lower limit than the searcher's for this file only.
        """
        if limit is None or (self.limit is not None and self.limit < limit):
            limit = self.limit
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as error:
            return (FAILED, 0, _NO_LINES, 0, describe(error))
        try:
            return self._read(fd, _Scan(self.regex, self.mode, limit))
        except OSError as error:
            return (FAILED, 0, _NO_LINES, 0, describe(error))
        finally:
            os.close(fd)

    def _read(self, fd: int, scan: _Scan) -> Outcome:
        size = os.fstat(fd).st_size
        # A first read of size + 1 bytes reads a small file to its end in one
        # call, without allocating more than it needs.
        request = size + 1 if 0 < size < FIRST_BLOCK_BYTES else FIRST_BLOCK_BYTES
        read_bytes = 0
        pieces: list[bytes] = []  # the start of a line that has no end yet
        while True:
            block = os.read(fd, request)
            request = BLOCK_BYTES
            if not block:
                break
            read_bytes += len(block)
            if b"\0" in block:
                return (BINARY, 0, _NO_LINES, read_bytes, "")
            if scan.done:
                continue  # only the NUL check is left
            cut = block.rfind(b"\n") + 1
            if not cut:
                pieces.append(block)
                continue
            if pieces:
                pieces.append(block)
                data = b"".join(pieces)
                cut += len(data) - len(block)
            else:
                data = block
            scan.scan(data, cut)
            pieces = [data[cut:]] if cut < len(data) else []
        if pieces and not scan.done:
            data = b"".join(pieces)
            scan.scan(data, len(data))
        lines = scan.lines if self.mode == LINES else _NO_LINES
        return (TEXT, scan.count, lines, read_bytes, "")


def describe(error: OSError) -> str:
    """Return the reason of an `OSError`, such as ``No such file or directory``."""
    return error.strerror or str(error)


def serve(stop_fd: int) -> int:
    """Search the chunks of paths read from standard input until it ends.

    Returns:
        0, the exit status.
    """
    # The parent stops the search on Ctrl-C, and the terminal sends SIGINT
    # to this process too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Outcomes go to a copy of standard output; anything else written to
    # file descriptor 1 lands on standard error instead.
    outbox = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    inbox = Connection(0, writable=False)
    stop = select.poll()
    stop.register(stop_fd, select.POLLIN)
    stopped = False
    try:
        searcher = Searcher(*pickle.loads(inbox.recv_bytes()))
        while True:
            paths: list[str] = pickle.loads(inbox.recv_bytes())
            outcomes: list[Outcome] = []
            for path in paths:
                stopped = stopped or bool(stop.poll(0))
                if stopped:
                    outcomes.append((NOT_READ, 0, _NO_LINES, 0, ""))
                else:
                    outcomes.append(searcher.search(path))
            outbox.send_bytes(pickle.dumps(outcomes, pickle.HIGHEST_PROTOCOL))
    except (EOFError, BrokenPipeError):
        return 0  # the parent closed its end: the search is over


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
