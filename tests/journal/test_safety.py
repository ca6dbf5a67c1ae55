"""Journal files that must be rejected, and the permissions of new ones."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import batchtools
from batchtools import JournalError, JournalLockedError

HOLDER_LIMIT = 60.0
"""Seconds to wait for the child process that keeps a journal locked."""


def double(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def test_symlink_journal_rejected(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    batchtools.run([1], double, backend="thread", journal=real)
    link = tmp_path / "link.db"
    link.symlink_to(real)

    with pytest.raises(JournalError, match="symbolic link"):
        batchtools.run([1], double, backend="thread", journal=link)


def test_nul_in_journal_path_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a\0b.db"

    with pytest.raises(JournalError, match="cannot contain a NUL character"):
        batchtools.run([1], double, backend="thread", journal=path)


def test_dangling_symlink_journal_rejected(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    link = tmp_path / "link.db"
    link.symlink_to(target)

    with pytest.raises(JournalError, match="symbolic link"):
        batchtools.run([1], double, backend="thread", journal=link)

    assert not target.exists()


HOLDER_SCRIPT = """
import sys
from batchtools.journal import Journal

journal = Journal.create(sys.argv[1], run_id="holder", signature="s", spec={})
print("locked", flush=True)
sys.stdin.read()
journal.close()
"""


def test_journal_locked_by_other_process(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline() == "locked\n"

            with pytest.raises(
                JournalLockedError, match=rf"in use by process {holder.pid};"
            ) as caught:
                batchtools.run([1], double, backend="thread", journal=path)
            assert caught.value.holder_pid == holder.pid
        finally:
            holder.stdin.close()
            holder.wait(HOLDER_LIMIT)
    assert holder.returncode == 0


def test_journal_locked_by_open_stream(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    with batchtools.stream(range(3), double, backend="thread", journal=path) as held:
        with pytest.raises(
            JournalLockedError, match=rf"in use by process {os.getpid()}"
        ):
            batchtools.run([1], double, backend="thread", journal=path)
        values = sorted(outcome.value for outcome in held)

    assert values == [0, 2, 4]
    report = batchtools.run(range(3), double, backend="thread", journal=path)
    assert report.from_journal == 3


def test_foreign_sqlite_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (body TEXT)")
    connection.commit()
    connection.close()

    with pytest.raises(JournalError, match="not a batchtools journal"):
        batchtools.run([1], double, backend="thread", journal=path)


def test_non_sqlite_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are not the droids\n" * 100)

    with pytest.raises(JournalError, match=r"not a journal|not a database"):
        batchtools.run([1], double, backend="thread", journal=path)


def test_newer_schema_version_rejected(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    batchtools.run([1], double, backend="thread", journal=path)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version=99")
    connection.commit()
    connection.close()

    with pytest.raises(
        JournalError, match=r"schema version 99, newer than this batchtools"
    ):
        batchtools.run([1], double, backend="thread", journal=path)


def test_journal_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new-folder" / "run.db"

    batchtools.run([1], double, backend="thread", journal=path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_other_task_journal_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    batchtools.run([1], double, backend="thread", journal=path)

    def triple(x: int) -> int:
        return 3 * x

    with pytest.raises(batchtools.JournalMismatchError, match="different run"):
        batchtools.run([1], triple, backend="thread", journal=path)


def test_header_cut_short_rejected(tmp_path: Path) -> None:
    whole = tmp_path / "whole.db"
    batchtools.run([1], double, backend="thread", journal=whole)
    cut = tmp_path / "cut.db"
    cut.write_bytes(whole.read_bytes()[:50])

    with pytest.raises(JournalError, match="shorter than an SQLite header") as caught:
        batchtools.run([1], double, backend="thread", journal=cut)
    assert not caught.value.resumable
    assert cut.read_bytes() == whole.read_bytes()[:50]
