"""Transactions from a job file: ``batchtools run -f JOB.toml`` with ``[transaction]``.

The file names the journal and lists the operations::

    [transaction]
    journal = "runs/moves.db"
    roll_forward = false        # after a crash in commit: roll back (default)
    retries = 2                 # per prepare, commit and rollback call
    jobs = 8                    # prepares at once
    timeout = "30s"             # per prepare

    [[transaction.operations]]
    step = "myapp.steps:MoveFile"
    state = { src = "in/a.csv", dst = "done/a.csv" }

`Transaction` does the work. This module validates the table, prints what
happened, and returns the exit status. That is 0 when every operation
committed, 1 when the transaction rolled back or a rollback failed, 2 for
a bad job file, and 3 when the journal cannot be used.
"""

from __future__ import annotations

import os
import sys
import tomllib
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, ValidationError

from batchtools._exceptions import ConfigurationError, JournalError
from batchtools.cli._jobfile import (
    Count,
    Duration,
    RequiredPathText,
    Retries,
    read_toml,
    schema_error,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNUSABLE = 0, 1, 2, 3


class OperationTable(BaseModel):
    """One ``[[transaction.operations]]`` table."""

    model_config = ConfigDict(extra="forbid", strict=True)

    step: str
    state: Any = None


class TransactionTable(BaseModel):
    """The ``[transaction]`` table of a job file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    journal: RequiredPathText
    roll_forward: bool = False
    retries: Retries = None
    jobs: Count = None
    timeout: Duration = None
    operations: list[OperationTable]


def is_transaction_job(path: str) -> bool:
    """Return whether the job file at ``path`` has a ``[transaction]`` table."""
    try:
        with open(path, "rb") as stream:
            return "transaction" in tomllib.load(stream)
    except (OSError, ValueError, RecursionError):
        # ValueError covers TOMLDecodeError and a file that is not UTF-8.
        return False  # the run command reports the file's problem


def run_transaction_job(path: str, *, quiet: bool, verbose: int) -> int:
    """Run the transaction that the job file at ``path`` describes.

    Returns:
        The exit status; see the module docstring.
    """
    from batchtools.cli._recover_command import describe
    from batchtools.flow.transaction import Transaction

    try:
        table = _load(path)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        transaction = Transaction(
            table.journal,
            roll_forward=table.roll_forward,
            retry=table.retries,
            timeout=table.timeout,
            concurrency=table.jobs,
        )
        for operation in table.operations:
            transaction.add(operation.step, operation.state)
    except ConfigurationError as error:
        click.echo(f"Error: {error}", err=True)
        return EXIT_USAGE
    try:
        report = transaction.run()
    except JournalError as error:
        click.echo(f"Error: {error}", err=True)
        return EXIT_UNUSABLE
    if not quiet:
        for earlier in report.recoveries:
            for line in describe(earlier, verbose=verbose > 0):
                click.echo(line, err=True)
        for line in describe(report, verbose=verbose > 0):
            click.echo(line, err=True)
    return EXIT_OK if report.committed else EXIT_FAILED


def _load(path: str) -> TransactionTable:
    """Read and check the ``[transaction]`` table of the job file at ``path``.

    Raises:
        ConfigurationError: The file is unreadable, or the table is invalid;
            the message names the file and the key.
    """
    data = read_toml(path)
    others = sorted(set(data) - {"transaction"})
    if others:
        raise ConfigurationError(
            f"job file {path!r} describes a transaction, which takes no "
            f"{', '.join(f'[{name}]' for name in others)} table; remove it"
        )
    try:
        return TransactionTable.model_validate(data["transaction"])
    except ValidationError as error:
        raise schema_error(path, error, ["transaction"]) from None
