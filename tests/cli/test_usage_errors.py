"""Invalid usage: exit status 2, one ``Error:`` line, no traceback, nothing run.

Every case would run the probe program if it got that far, so an empty
ledger proves that nothing ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchtools.cli.main import main
from tests.cli.support import Argument, error_lines, probe_command, run_cli


def _other_journal(tmp_path: Path) -> list[Argument]:
    journal = tmp_path / "other.db"
    first_run = run_cli(
        ["run", "-q", "--journal", journal, "true", ":::", "x"], tmp_path
    )
    assert first_run.returncode == 0, first_run.stderr.decode(errors="replace")
    return ["--journal", journal]


def _bad_job_file(text: str) -> Callable[[Path], list[Argument]]:
    def write(tmp_path: Path) -> list[Argument]:
        path = tmp_path / "job.toml"
        path.write_text(text)
        return ["-f", path]

    return write


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain-file"
    path.write_text("")
    return path


def _no_options(tmp_path: Path) -> list[Argument]:
    return []


# Each case: options before the command, words after it (None: no command),
# and a piece of text the error must contain.
CASES: dict[str, tuple[Callable[[Path], list[Argument]], list[str] | None, str]] = {
    "unknown option": (
        lambda _: ["--jurnal", "x.db"],
        [":::", "a"],
        "Did you mean",
    ),
    "missing command": (_no_options, None, "missing command"),
    "missing command before items": (lambda _: [":::", "a"], None, "missing command"),
    "no items after marker": (_no_options, [":::"], "':::'"),
    "missing input file": (_no_options, ["::::", "missing.txt"], "missing.txt"),
    "journal of another command": (_other_journal, [":::", "a"], "different run"),
    "invalid timeout": (lambda _: ["--timeout", "soon"], [":::", "a"], "soon"),
    "zero grace": (lambda _: ["--grace", "0"], [":::", "a"], "--grace '0'"),
    "job file grace": (
        _bad_job_file('[run]\ngrace = "later"\n'),
        [":::", "a"],
        "run.grace",
    ),
    "invalid halt": (lambda _: ["--halt", "later,fail=x"], [":::", "a"], "later"),
    "zero jobs": (lambda _: ["-j", "0"], [":::", "a"], "0"),
    "invalid colsep": (lambda _: ["--colsep", "("], [":::", "a"], "colsep"),
    "huge colsep count": (
        lambda _: ["--colsep", "{" + "9" * 5000 + "}"],
        [":::", "a"],
        "repetition count too large",
    ),
    "deep colsep groups": (
        lambda _: ["--colsep", "(" * 1000 + ")" * 1000],
        [":::", "a"],
        "nested too deeply",
    ),
    "job file not toml": (_bad_job_file("[run\n"), [":::", "a"], "job.toml"),
    "job file wrong type": (
        _bad_job_file('[run]\njobs = "many"\n'),
        [":::", "a"],
        "run.jobs",
    ),
    "job file unknown key": (
        _bad_job_file("[run]\nworkers = 3\n"),
        [":::", "a"],
        "run.workers",
    ),
    "job file invalid timeout": (
        _bad_job_file('[run]\ntimeout = "soon"\n'),
        [":::", "a"],
        "soon",
    ),
    "missing job file": (lambda _: ["-f", "missing.toml"], [":::", "a"], "missing"),
    "invalid memfree": (lambda _: ["--memfree", "lots"], [":::", "a"], "--memfree"),
    "worker memory limit on commands": (
        lambda _: ["--max-memory", "1G"],
        [":::", "a"],
        "not to commands",
    ),
    "memfree above the machine": (
        lambda _: ["--memfree", "1000T"],
        [":::", "a"],
        "more than this machine's",
    ),
    "journal is a folder": (
        lambda tmp: ["--journal", str(tmp)],
        [":::", "a"],
        "is a folder",
    ),
    "journal in a missing folder": (
        lambda tmp: ["--journal", str(tmp / "missing" / "j.db")],
        [":::", "a"],
        "does not exist",
    ),
    "journal under a file": (
        lambda tmp: ["--journal", str(_a_file(tmp) / "j.db")],
        [":::", "a"],
        "is not a folder",
    ),
    "setup without call": (
        lambda _: ["--setup", "tests.cli.call_tasks:connect"],
        [":::", "a"],
        "needs --call",
    ),
    "invalid jobs": (lambda _: ["-j", "many"], [":::", "a"], "'many'"),
    "cache on a command": (lambda _: ["--cache", "c.db"], [":::", "a"], "Python tasks"),
    "job file invalid size": (
        _bad_job_file('[run]\nmem_per_item = "big"\n'),
        [":::", "a"],
        "run.mem_per_item",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_before_running(tmp_path: Path, case: str) -> None:
    options, words, expected = CASES[case]
    ledger = tmp_path / "ledger"
    arguments: list[Argument] = ["run", *options(tmp_path)]
    if words is not None:
        arguments += [*probe_command(ledger), "{}", *words]

    result = run_cli(arguments, tmp_path)

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, stderr
    assert expected in errors[0]
    assert "Traceback" not in stderr
    assert result.stdout == b""
    assert not ledger.exists()
    assert not (tmp_path / ".batchtools").exists()


def test_invalid_template_field_exits_2(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"

    result = run_cli(["run", *probe_command(ledger), "{0}", ":::", "a"], tmp_path)

    assert result.returncode == 2, result.stderr.decode(errors="replace")
    assert len(error_lines(result.stderr)) == 1
    assert not ledger.exists()


def test_resume_of_missing_journal_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli(["resume", tmp_path / "missing.db"], tmp_path)

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 3, stderr  # the journal is unusable
    assert len(error_lines(result.stderr)) == 1, stderr
    assert "Traceback" not in stderr


def test_unknown_option_suggests_close_name() -> None:
    result = CliRunner().invoke(main, ["run", "--retires", "2", "true"])

    assert result.exit_code == 2
    assert "--retires" in result.output
    assert "Did you mean" in result.output
    assert "--retries" in result.output


@pytest.mark.parametrize(
    "options",
    [
        ["--memfree", "-5"],
        ["--max-memory", "abc"],
        ["--cache-ttl", "xyz", "--cache", "c.db"],
        ["--max-memory", "1G"],
    ],
)
def test_dry_run_checks_every_option(tmp_path: Path, options: list[str]) -> None:
    result = run_cli(["run", "--dry-run", *options, "echo", ":::", "a"], tmp_path)

    assert result.returncode == 2, result.stderr.decode(errors="replace")
    assert result.stdout == b""
    assert not (tmp_path / "c.db").exists()


def test_module_that_fails_to_import_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('import blew up')\n")

    result = run_cli(["run", "--call", "broken_module:f", ":::", "a"], tmp_path)

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "importing 'broken_module' failed (RuntimeError: import blew up)" in stderr
    assert "Traceback" not in stderr


def test_journal_and_cache_on_one_file_exit_2(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--journal",
            "same.db",
            "--cache",
            "same.db",
            "--call",
            "tests.cli.call_tasks:backup",
            ":::",
            "a",
        ],
        tmp_path,
    )

    assert result.returncode == 2
    assert b"--journal and --cache both name" in result.stderr
    assert not (tmp_path / "same.db").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--priority", "{}", "--priority-aging", "nan"], "finite number"),
        (["--priority", "{}", "--priority-aging", "inf"], "finite number"),
        (["--serialize-by", ""], "--serialize-by is empty"),
        (["--priority", " "], "--priority is empty"),
    ],
)
def test_flow_options_are_checked(
    tmp_path: Path, options: list[str], fragment: str
) -> None:
    result = run_cli(["run", *options, "echo", ":::", "a"], tmp_path)

    assert result.returncode == 2, result.stderr.decode(errors="replace")
    assert fragment in result.stderr.decode()


def test_graph_journal_that_is_a_folder_exits_2(tmp_path: Path) -> None:
    job = tmp_path / "graph.toml"
    job.write_text('[tasks.a]\ncommand = ["true"]\n')

    result = run_cli(["graph", "--journal", str(tmp_path), str(job)], tmp_path)

    assert result.returncode == 2
    assert b"is a folder" in result.stderr
