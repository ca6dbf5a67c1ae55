"""The ``batchtools recover`` command: finish the transactions a crash left open.

`Transaction.recover` does the work. This module checks the path, prints
one block per transaction, and turns the outcome into the exit status.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import click

from batchtools._exceptions import JournalError
from batchtools.flow.transaction import (
    Transaction,
    TransactionReport,
    TransactionStatus,
)
from batchtools.journal import check_path

EXIT_ROLLBACK_FAILED, EXIT_USAGE, EXIT_UNUSABLE = 1, 2, 3


class _PathError(click.ClickException):
    """JOURNAL is not a file that could be a journal; exits with status 2."""

    exit_code = EXIT_USAGE


class _UnusableJournalError(click.ClickException):
    """The journal cannot be used; exits with status 3."""

    exit_code = EXIT_UNUSABLE


@click.command("recover")
@click.argument("journal", metavar="JOURNAL")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Print the traceback of each failed call, and the library's log.",
)
@click.pass_context
def recover_command(context: click.Context, journal: str, verbose: bool) -> None:
    """Finish the transactions that a crash or kill left unfinished in JOURNAL.

    A transaction that was preparing or committing is rolled back. One that
    was committing with roll_forward, after every prepare had succeeded, is
    committed. Rollbacks that failed before are called again. Steps are
    imported by name, with the current folder on the import path.

    Exit status: 0 when every transaction is committed or rolled back. 1
    when a rollback error remains, or a step cannot be imported; run
    recover again once it is fixed. 2 when JOURNAL is not a regular file. 3
    when the journal cannot be used: another process holds it, or it is
    damaged or not a transaction journal.
    """
    path = Path(journal)
    _check_journal_path(path)
    _setup_logging(verbose)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        reports = Transaction.recover(path)
    except JournalError as error:
        raise _UnusableJournalError(str(error)) from None
    if not reports:
        click.echo(f"no unfinished transactions in {path}")
    for report in reports:
        for line in describe(report, verbose=verbose):
            click.echo(line)
    if any(not report.status.is_final for report in reports):
        context.exit(EXIT_ROLLBACK_FAILED)


def describe(report: TransactionReport, *, verbose: bool = False) -> list[str]:
    """Return the lines that tell what recovery did to one transaction."""
    found = report.recovered_from
    if found is not None and found is report.status:
        state = f"still {_words(found)}"
    else:
        was = f"was {_words(found)}" if found is not None else "ran"
        state = f"{was}, now {_words(report.status)}"
    lines = [f"transaction {report.transaction_id}: {state}"]
    for phase in ("commit", "rollback"):
        count = sum(1 for op in report.operations if phase in op.calls)
        if count:
            noun = "operation" if count == 1 else "operations"
            lines.append(f"  called {phase} on {count} {noun}")
    for error in report.errors:
        lines.append(f"  {error}")
        if verbose:
            lines.extend("    " + line for line in error.traceback.splitlines())
    if report.status is TransactionStatus.ROLLBACK_FAILED:
        lines.append("  fix the failing rollback, then run 'batchtools recover' again")
    return lines


def _words(status: TransactionStatus) -> str:
    return status.value.replace("_", " ")


def _check_journal_path(path: Path) -> None:
    """Reject a JOURNAL that is missing, a symbolic link or not a regular file."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise _PathError(f"journal {path}: no such file") from None
    except OSError as error:
        raise _PathError(
            f"journal {path}: it cannot be read ({error.strerror})"
        ) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise _PathError(
            f"journal {path}: it is {kind}; give the path of the transaction journal"
        )
    try:
        check_path(path)
    except JournalError as error:
        raise _PathError(str(error)) from None


def _setup_logging(verbose: bool) -> None:
    """Send the library's errors to stderr, and with -v its progress too.

    Its warnings are left out, because they repeat what the command prints.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("batchtools: %(message)s"))
    root = logging.getLogger("batchtools")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if verbose else logging.ERROR)
