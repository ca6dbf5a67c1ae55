"""The ``batchtools grep`` command: print the lines that match, like ``grep -rn``.

`batchtools.fs.grep.grep` does the search. This module turns the options
into its arguments, prints results and diagnostics, and sets the exit
status as grep does.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from typing import BinaryIO

import click

from batchtools._exceptions import ConfigurationError
from batchtools.fs.grep import Diagnostic, FileResult, Output, grep

EXIT_MATCHED, EXIT_NO_MATCH, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE


class _UsageError(click.ClickException):
    """Invalid options or pattern; exits with status 2 before any file is read."""

    exit_code = EXIT_ERROR


@click.command("grep")
@click.argument("pattern")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option(
    "-i", "--ignore-case", is_flag=True, help="Match ASCII letters of either case."
)
@click.option(
    "-l",
    "--files-with-matches",
    is_flag=True,
    help="Print the path of each file with a match, not the lines.",
)
@click.option(
    "-c",
    "--count",
    is_flag=True,
    help="Print each text file's path and its number of matching lines.",
)
@click.option(
    "-m",
    "--max-count",
    type=click.IntRange(min=0),
    metavar="N",
    default=None,
    help="Stop the whole search after N matching lines (N files with -l). "
    "Unlike grep's -m, the limit is for all files together.",
)
@click.option(
    "-n/-N",
    "--line-number/--no-line-number",
    default=True,
    help="Print each line's number after its path, or not.  [default: -n]",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Inside folders, search only files whose base name matches GLOB. Repeatable.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Inside folders, skip files whose base name matches GLOB. Repeatable.",
)
@click.option(
    "--exclude-dir",
    multiple=True,
    metavar="GLOB",
    help="Do not enter folders whose base name matches GLOB. Repeatable.",
)
@click.option(
    "-R",
    "--follow",
    is_flag=True,
    help="Follow symbolic links inside folders, as grep -R does. Links named "
    "as PATH are always followed.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per line: path, line_number and line for each "
    "match; path with -l; path and count with -c.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    metavar="N",
    default=None,
    help="Worker processes at most; small trees are searched without any.  "
    "[default: the number of CPUs]",
)
def grep_command(
    pattern: str,
    paths: tuple[str, ...],
    ignore_case: bool,
    files_with_matches: bool,
    count: bool,
    max_count: int | None,
    line_number: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    exclude_dir: tuple[str, ...],
    follow: bool,
    as_json: bool,
    jobs: int | None,
) -> None:
    """Search files and folders for lines that match PATTERN, in parallel.

    PATTERN is a Python regular expression, matched against the bytes of
    each line, as LC_ALL=C grep -E matches. Folders are searched
    recursively; without PATH, the current folder. Output is sorted by path,
    then line, and reads like grep -rn: PATH:LINE:TEXT. Files that contain
    a NUL byte are binary and are skipped. Errors go to stderr, one line
    per path, and the search goes on.

    Exit status: 0 when a line matched, 1 when none did, 2 on an error,
    even if lines matched, as grep does. 130 after SIGINT, and 141 when
    standard output was closed.
    """
    if files_with_matches and count:
        raise _UsageError("-l and -c cannot be used together; choose one")
    output: Output = "lines"
    if files_with_matches:
        output = "files"
    elif count:
        output = "counts"
    printer = _Printer(sys.stdout.buffer, output, as_json, line_number)
    try:
        search = grep(
            pattern,
            list(paths) if paths else None,
            ignore_case=ignore_case,
            include=include,
            exclude=exclude,
            exclude_dir=exclude_dir,
            follow_symlinks=follow,
            max_results=max_count,
            output=output,
            jobs=jobs,
            on_diagnostic=_print_diagnostic,
        )
    except ConfigurationError as error:
        raise _UsageError(str(error)) from None
    try:
        with search:
            for result in search:
                printer.print(result)
        printer.flush()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_OUTPUT_CLOSED)
    except KeyboardInterrupt:
        click.echo("Interrupted by SIGINT.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    statistics = search.statistics
    if statistics.errors:
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_MATCHED if statistics.matches else EXIT_NO_MATCH)


class _Printer:
    """Writes results to standard output as bytes, in grep's or JSON form."""

    def __init__(
        self, stream: BinaryIO, output: Output, as_json: bool, line_number: bool
    ) -> None:
        self._stream = stream
        self._output = output
        self._as_json = as_json
        self._line_number = line_number
        # On a terminal, each file's lines appear as soon as they are found.
        self._flush_each = stream.isatty()

    def print(self, result: FileResult) -> None:
        """Write one file's result."""
        if self._as_json:
            self._stream.write(self._json(result))
        else:
            self._stream.write(self._text(result))
        if self._flush_each:
            self._stream.flush()

    def flush(self) -> None:
        """Flush standard output."""
        self._stream.flush()

    def _text(self, result: FileResult) -> bytes:
        path = os.fsencode(result.path)
        if self._output == "files":
            return path + b"\n"
        if self._output == "counts":
            return b"%s:%d\n" % (path, result.count)
        if self._line_number:
            lines = [
                b"%s:%d:%s\n" % (path, m.line_number, m.line) for m in result.matches
            ]
        else:
            lines = [b"%s:%s\n" % (path, m.line) for m in result.matches]
        return b"".join(lines)

    def _json(self, result: FileResult) -> bytes:
        base: dict[str, object] = {**_text_field("path", os.fsencode(result.path))}
        records: list[dict[str, object]]
        if self._output == "files":
            records = [base]
        elif self._output == "counts":
            records = [{**base, "count": result.count}]
        else:
            records = [
                {**base, "line_number": m.line_number, **_text_field("line", m.line)}
                for m in result.matches
            ]
        return "".join(json.dumps(record) + "\n" for record in records).encode()


def _text_field(name: str, value: bytes) -> dict[str, str]:
    """Return ``{name: text}``, plus ``name_base64`` when ``value`` is not UTF-8.

    The text then has U+FFFD for each invalid byte, and the base64 field
    keeps the exact bytes.
    """
    try:
        return {name: value.decode("utf-8")}
    except UnicodeDecodeError:
        return {
            name: value.decode("utf-8", "replace"),
            f"{name}_base64": base64.b64encode(value).decode("ascii"),
        }


def _print_diagnostic(diagnostic: Diagnostic) -> None:
    label = "Warning" if diagnostic.severity == "warning" else "Error"
    click.echo(f"{label}: {diagnostic.path}: {diagnostic.message}", err=True)


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that exiting does not flush it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
