"""Transactions from job files: a [transaction] table run by ``batchtools run -f``."""

from __future__ import annotations

from pathlib import Path

from tests.cli.support import error_lines, run_cli


def _job(tmp_path: Path, fail_second: bool = False) -> Path:
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    failing = ', fail = ["commit"]' if fail_second else ""
    job = tmp_path / "moves.toml"
    job.write_text(
        '[transaction]\njournal = "moves.db"\nretries = 0\n'
        "[[transaction.operations]]\n"
        'step = "tests.flow.txn_steps:MoveFile"\n'
        'state = { src = "a", dst = "done/a" }\n'
        "[[transaction.operations]]\n"
        'step = "tests.flow.txn_steps:MoveFile"\n'
        f'state = {{ src = "b", dst = "done/b"{failing} }}\n'
    )
    return job


def test_transaction_job_commits_every_operation(tmp_path: Path) -> None:
    job = _job(tmp_path)

    result = run_cli(["run", "-f", job], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "done" / "a").read_text() == "a"
    assert (tmp_path / "done" / "b").read_text() == "b"
    assert b"now committed" in result.stderr


def test_failed_commit_rolls_the_others_back(tmp_path: Path) -> None:
    job = _job(tmp_path, fail_second=True)

    result = run_cli(["run", "-f", job], tmp_path)

    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert (tmp_path / "a").read_text() == "a"
    assert (tmp_path / "b").read_text() == "b"
    assert not (tmp_path / "done" / "a").exists()
    assert b"now rolled back" in result.stderr


def test_bad_transaction_table_exits_2_before_anything_runs(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.write_text(job.read_text().replace("retries = 0", "retries = -1"))

    result = run_cli(["run", "-f", job], tmp_path)

    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "transaction.retries" in line
    assert (tmp_path / "a").exists()
    assert not (tmp_path / "moves.db").exists()


def test_nul_in_journal_path_exits_2(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.write_text(job.read_text().replace('"moves.db"', '"moves\\u0000.db"'))

    result = run_cli(["run", "-f", job], tmp_path)

    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "transaction.journal: a path cannot contain a NUL character" in line
    assert (tmp_path / "a").exists()


def test_unknown_step_exits_2(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.write_text(
        job.read_text().replace("txn_steps:MoveFile", "txn_steps:Missing", 1)
    )

    result = run_cli(["run", "-f", job], tmp_path)

    assert result.returncode == 2
    assert b"Missing" in result.stderr
