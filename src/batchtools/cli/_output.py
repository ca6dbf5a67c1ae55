"""Passing each command's output through, whole, and keeping it under --results."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from batchtools._exceptions import CommandFailedError
from batchtools.backends._subprocess import CommandResult
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.fs.atomic import atomic_write, atomic_writer

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine
    from batchtools.secrets import Redactor


class OutputWriter:
    """An engine observer that prints each item's output when it finishes.

    A command's stdout goes to our stdout and its stderr to our stderr, each
    in one piece, so the output of two commands never interleaves. Bytes
    reach a pipe or file exactly; a terminal gets invalid UTF-8 replaced.

    Args:
        results: A folder that keeps each item's stdout, stderr and exit
            status, or ``None``.
        write_stderr: Writes text to the terminal's stderr (above a progress
            line, when one is shown).
        quiet: Print nothing but the commands' own output.
        redactor: Replaces secret values in what is written: a Python
            task's value and the text of an error. A command's output is
            redacted as the subprocess backend captures it.
    """

    def __init__(
        self,
        results: Path | None = None,
        write_stderr: Callable[[str], None] | None = None,
        *,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._results = results
        self._redactor = redactor
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._stderr = stderr if stderr is not None else sys.stderr.buffer
        self._stdout_tty = _isatty(self._stdout)
        self._stderr_tty = _isatty(self._stderr)
        self._write_stderr = write_stderr
        self._hide_progress: Callable[[], AbstractContextManager[None]] | None = None
        self._engine: Engine | None = None
        self.stdout_closed = False

    def on_start(self, engine: Engine) -> None:
        self._engine = engine

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_finish(self, report: Report) -> None:
        if not self.stdout_closed:
            try:
                self._stdout.flush()
            except BrokenPipeError:
                self._stdout_gone()

    def keep(self, outcome: Outcome) -> None:
        """Write ``outcome`` under the results folder, if there is one.

        The engine calls this before the journal commits the outcome, so a
        killed run never has a committed item without its files.

        Raises:
            OSError: A file could not be written; the error names it.
        """
        if self._results is None or outcome.source == "journal":
            return
        result = _result_of(outcome)
        try:
            self._keep(outcome, result)
        except Exception:
            # The engine then skips the output, which would close the result.
            if result is not None:
                result.close()
            raise

    def on_outcome(self, outcome: Outcome) -> None:
        """Print ``outcome``'s output, once the journal has committed it."""
        if outcome.source == "journal":
            # Finished in an earlier session, which printed its output and
            # kept its files. The journal has no output to write again.
            return
        result = _result_of(outcome)
        try:
            if result is not None:
                self._pass_through(result)
            elif outcome.state is State.SUCCEEDED and outcome.value is not None:
                line = self._value_line(outcome.value)
                if self._stdout_tty and self._hide_progress is not None:
                    with self._hide_progress():
                        self._write_stdout(line)
                else:
                    self._write_stdout(line)
        finally:
            if result is not None:
                result.close()

    def hide_progress_with(
        self, hidden: Callable[[], AbstractContextManager[None]]
    ) -> None:
        """Erase the progress line through ``hidden`` before writing to a terminal."""
        self._hide_progress = hidden

    def _pass_through(self, result: CommandResult) -> None:
        if result.captured_stdout.size:
            if self._stdout_tty:
                text = _for_terminal(result.read_stdout()).encode()
                if self._hide_progress is not None:
                    with self._hide_progress():
                        self._write_stdout(text)
                else:
                    self._write_stdout(text)
            else:
                self._write_stdout(result.read_stdout(), result)
        if result.captured_stderr.size:
            data = result.read_stderr()
            if self._write_stderr is not None and self._stderr_tty:
                self._write_stderr(_for_terminal(data).rstrip("\n"))
            else:
                self._stderr.write(data)
                self._stderr.flush()

    def _write_stdout(self, data: bytes, result: CommandResult | None = None) -> None:
        if self.stdout_closed:
            return
        try:
            if result is not None and result.captured_stdout.path is not None:
                result.write_stdout_to(self._stdout)
            else:
                self._stdout.write(data)
            self._stdout.flush()
        except BrokenPipeError:
            self._stdout_gone()
        except OSError as error:
            if error.errno != errno.EPIPE:
                raise
            self._stdout_gone()

    def _stdout_gone(self) -> None:
        # The reader went away (`| head`): stop admission like Ctrl-C does,
        # and drop further output instead of failing on every write.
        self.stdout_closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        if self._engine is not None:
            self._engine.stop("standard output was closed")

    def _keep(self, outcome: Outcome, result: CommandResult | None) -> None:
        assert self._results is not None
        folder = self._results / f"{outcome.seq + 1:06d}-{outcome.key[:16]}"
        target = folder
        # Each file is replaced whole, so a killed run or a second run over
        # the same folder never leaves a torn file. The run's lock on the
        # folder makes the second run wait. No syncs: a lost file after a
        # power loss costs less than a sync per file.
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / "stdout"
            with atomic_writer(target, durable=False) as out:
                if result is not None:
                    result.write_stdout_to(out)
                elif outcome.value is not None:
                    out.write(self._value_line(outcome.value))
            target = folder / "stderr"
            with atomic_writer(target, durable=False) as err:
                if result is not None:
                    result.write_stderr_to(err)
            target = folder / "exit_status"
            status = self._redact(_status_text(outcome, result))
            atomic_write(target, status + "\n", durable=False)
        except OSError as error:
            cause = error.strerror or str(error)
            raise OSError(f"cannot write {target}: {cause}") from error

    def _redact(self, text: str) -> str:
        return text if self._redactor is None else self._redactor.redact(text)

    def _value_line(self, value: Any) -> bytes:
        """Return a Python task's value as the line written for it."""
        return f"{self._redact(str(value))}\n".encode("utf-8", "surrogateescape")


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _for_terminal(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _result_of(outcome: Outcome) -> CommandResult | None:
    if isinstance(outcome.value, CommandResult):
        return outcome.value
    error = outcome.error
    if isinstance(error, CommandFailedError) and isinstance(
        error.result, CommandResult
    ):
        return error.result
    return None


def _status_text(outcome: Outcome, result: CommandResult | None) -> str:
    if result is not None:
        return str(result.exit_status)
    if outcome.state is State.SUCCEEDED:
        return "0"
    return f"{outcome.state.value}: {outcome.error or outcome.reason}"
