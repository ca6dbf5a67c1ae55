"""Running the ``batchtools`` command on a pseudo-terminal, as a person would.

stdin, stdout and stderr of the process are the terminal's end, so the CLI
draws its progress line and pdb shows its prompt. The test reads what the
screen would show and types lines. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from tests.cli.support import Argument, cli_argv, cli_environment, kill_tree

EXPECT_TIMEOUT = 60.0
"""Seconds `Terminal.expect` waits for its text before the test fails."""

PROMPT = b"(Pdb) "


class Terminal:
    """A ``batchtools`` process whose standard streams are a pseudo-terminal.

    Attributes:
        output: Everything the process wrote so far.
    """

    def __init__(self, process: subprocess.Popen[bytes], master: int) -> None:
        self.process = process
        self.output = b""
        self._master = master
        self._read_up_to = 0

    def expect(self, text: bytes, timeout: float = EXPECT_TIMEOUT) -> bytes:
        """Read until ``text`` appears after the last match; return what was read.

        Raises:
            AssertionError: The process ended, or ``timeout`` seconds passed,
                before ``text`` appeared.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.output.find(text, self._read_up_to)
            if found >= 0:
                start, self._read_up_to = self._read_up_to, found + len(text)
                return self.output[start : self._read_up_to]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} did not appear within {timeout} s; the terminal "
                    f"shows: {self.output[self._read_up_to :]!r}"
                )
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(
                    f"batchtools ended before {text!r} appeared; the terminal "
                    f"shows: {self.output[self._read_up_to :]!r}"
                )

    def read_for(self, seconds: float) -> bytes:
        """Return what the process writes during the next ``seconds``."""
        start = len(self.output)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self._read(left):
            pass
        self._read_up_to = len(self.output)
        return self.output[start:]

    def send(self, line: str) -> None:
        """Type ``line`` and Enter."""
        os.write(self._master, line.encode() + b"\r")

    def wait(self, timeout: float = EXPECT_TIMEOUT) -> int:
        """Read the rest of the output and return the exit status.

        Raises:
            AssertionError: The process did not end within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while self._read(max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() > deadline:
                break
        try:
            return self.process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"batchtools did not end within {timeout} s; the terminal "
                f"shows: {self.output[-2000:]!r}"
            ) from None

    def _read(self, timeout: float) -> bool:
        """Read what is there, waiting up to ``timeout`` s; false at the end."""
        ready, _, _ = select.select([self._master], [], [], max(timeout, 0.0))
        if not ready:
            return self.process.poll() is None
        try:
            data = os.read(self._master, 65536)
        except OSError as error:
            if error.errno == errno.EIO:  # Linux: every slave end is closed.
                return False
            raise
        self.output += data
        return bool(data)


@contextlib.contextmanager
def terminal_cli(
    arguments: Sequence[Argument],
    cwd: Path,
    *,
    environment: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
) -> Iterator[Terminal]:
    """Start ``batchtools`` on a new pseudo-terminal of 40 rows and 160 columns.

    ``stdout``, if given, replaces the terminal as standard output. The
    process and its descendants are killed when the block ends.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        process = subprocess.Popen(
            cli_argv(arguments),
            cwd=cwd,
            env=dict(environment) if environment is not None else cli_environment(),
            stdin=slave,
            stdout=slave if stdout is None else stdout,
            stderr=slave,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    try:
        yield Terminal(process, master)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=EXPECT_TIMEOUT)
        os.close(master)
