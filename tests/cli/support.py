"""Helpers for tests that run the ``batchtools`` command as a real process.

The CLI runs from the console script installed next to the interpreter, in
a fresh working folder, with an environment cleared of ``BATCHTOOLS_*``
variables so that the developer's settings cannot change a test. Tests wait
for a condition by polling files or the journal up to a deadline, never by
sleeping for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from batchtools.journal import iter_items

REPOSITORY = Path(__file__).resolve().parents[2]
BATCHTOOLS = Path(sys.executable).parent / "batchtools"
PROBE = Path(__file__).with_name("probe.py")

RUN_TIMEOUT = 90.0
"""Seconds a CLI process may take before the test fails instead of hanging."""

WAIT_TIMEOUT = 60.0
"""Seconds `wait_until` polls before it fails."""

Argument = str | bytes | os.PathLike[str]


def cli_environment(**extra: str) -> dict[str, str]:
    """Return the environment for a CLI process: ours without ``BATCHTOOLS_*``.

    ``PYTHONPATH`` names the repository, so that ``--call tests.cli.…``
    imports in the CLI and in its worker processes.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("BATCHTOOLS_")
    }
    environment["PYTHONPATH"] = str(REPOSITORY)
    environment.update(extra)
    return environment


def cli_argv(arguments: Sequence[Argument]) -> list[str | bytes]:
    """Return the argv that runs ``batchtools`` with ``arguments``."""
    assert BATCHTOOLS.exists(), (
        f"{BATCHTOOLS} is missing; install the package into this interpreter's "
        "environment (pip install -e .)"
    )
    argv: list[str | bytes] = [str(BATCHTOOLS)]
    for argument in arguments:
        argv.append(argument if isinstance(argument, bytes) else os.fspath(argument))
    return argv


def run_cli(
    arguments: Sequence[Argument],
    cwd: Path,
    *,
    environment: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = RUN_TIMEOUT,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``batchtools`` to its end and return its exit status and output.

    ``preexec`` runs in the child before ``batchtools`` starts, to set a
    resource limit, say.

    Raises:
        AssertionError: It ran longer than ``timeout`` seconds, after which
            it and its descendants were killed.
    """
    with started_cli(
        arguments, cwd, environment=environment, preexec=preexec
    ) as process:
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.communicate()
            raise AssertionError(
                f"batchtools {arguments!r} did not end within {timeout} s"
            ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextlib.contextmanager
def started_cli(
    arguments: Sequence[Argument],
    cwd: Path,
    *,
    environment: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = subprocess.PIPE,
    stderr: IO[Any] | int | None = subprocess.PIPE,
    preexec: Callable[[], None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``batchtools`` in its own session, and kill its tree at the end.

    Standard input is a pipe, so that the CLI never reads the test's.
    """
    process = subprocess.Popen(
        cli_argv(arguments),
        cwd=cwd,
        env=dict(environment) if environment is not None else cli_environment(),
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=preexec,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=RUN_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and then every descendant it had.

    The process goes first, so that it cannot see a child die and record
    that as an outcome, which would make the kill look gentler than it is.
    """
    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)


def wait_until(
    condition: Callable[[], bool],
    description: str,
    *,
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.005,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``condition`` until it is true.

    Raises:
        AssertionError: ``timeout`` seconds passed, or ``process`` ended
            before the condition became true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"batchtools exited with status {process.returncode} while "
                f"waiting for {description}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {description}"
            )
        time.sleep(interval)


def error_lines(stderr: bytes) -> list[str]:
    """Return the lines of ``stderr`` that start with ``Error:``."""
    text = stderr.decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.startswith("Error:")]


# -- the probe program --------------------------------------------------------


@dataclass(frozen=True)
class ProbeCall:
    """One call of the probe program, read back from its ledger.

    Attributes:
        argv: The arguments it got after the ledger path, byte for byte.
        session: The ``PROBE_SESSION`` environment variable it saw.
    """

    argv: tuple[bytes, ...]
    session: str


def probe_command(ledger: Path) -> list[str]:
    """Return the command words that run the probe with ``ledger``."""
    return [sys.executable, str(PROBE), str(ledger)]


def read_probe_ledger(ledger: Path) -> list[ProbeCall]:
    """Return the probe's calls in the order they were recorded."""
    if not ledger.exists():
        return []
    calls = []
    for line in ledger.read_text(encoding="ascii").splitlines():
        record = json.loads(line)
        argv = tuple(bytes.fromhex(argument) for argument in record["argv"])
        calls.append(ProbeCall(argv, record["session"]))
    return calls


def count_lines(path: Path) -> int:
    """Return the number of complete lines in ``path``, or 0 if it is missing."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# -- reading a journal --------------------------------------------------------


def connect_read_only(journal: Path) -> sqlite3.Connection:
    """Open a journal file read-only, as `status` does while a run writes it."""
    return sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10.0)


def count_in_state(journal: Path, state: str) -> int:
    """Return how many items of ``journal`` are in ``state`` (0 before it exists)."""
    if not journal.exists():
        return 0
    connection = connect_read_only(journal)
    try:
        row = connection.execute(
            "SELECT count(*) FROM items WHERE state = ?", (state,)
        ).fetchone()
    except sqlite3.OperationalError:
        return 0  # The file exists but its tables are not created yet.
    finally:
        connection.close()
    return int(row[0])


def items_by_state(journal: Path) -> dict[bytes, str]:
    """Return each single-column item of ``journal`` with its state."""
    states = {}
    for row in iter_items(journal):
        assert isinstance(row.item, tuple), f"item {row.item!r} is not a CLI item"
        assert len(row.item) == 1, f"item {row.item!r} has several columns"
        states[row.item[0]] = row.state
    return states


def items_in_state(journal: Path, state: str) -> set[bytes]:
    """Return the single-column items of ``journal`` that are in ``state``."""
    return {item for item, found in items_by_state(journal).items() if found == state}


def succeeded_without_results(journal: Path, results: Path) -> list[str]:
    """Return the keys of succeeded items whose ``--results`` files are not whole.

    ``exit_status`` is the last file written for an item, and its newline
    ends it; a succeeded command's is ``0``.
    """
    missing = []
    for row in iter_items(journal):
        if row.state != "succeeded":
            continue
        status = results / f"{row.seq + 1:06d}-{row.key[:16]}" / "exit_status"
        if not status.exists() or status.read_bytes() != b"0\n":
            missing.append(row.key)
    return missing


def integrity_check(journal: Path) -> str:
    """Return the result of SQLite's ``PRAGMA integrity_check`` on ``journal``."""
    connection = connect_read_only(journal)
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
    finally:
        connection.close()
    return "; ".join(str(row[0]) for row in rows)


def processes_with_argument(argument: str) -> list[psutil.Process]:
    """Return the live, non-zombie processes that have ``argument`` in argv."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if argument in (info["cmdline"] or []):
            found.append(process)
    return found
