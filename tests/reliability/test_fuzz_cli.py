"""Fuzzing through the real CLI process, and with atheris when it is installed.

The in-process fuzzers in `test_fuzz_parsers.py` cover the parsers fast.
Here a few random job files and option values go through the installed
``batchtools`` command in a subprocess. It must exit with status 2, or run
when the input happens to be valid, and never print a traceback.
The atheris campaign runs libFuzzer over the same parsers in a child
process; it is skipped when atheris is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.support import error_lines, run_cli
from tests.reliability.campaign import CAMPAIGN, REPOSITORY, ScenarioRecord

CLI_EXAMPLES = CAMPAIGN.size(4, 60)
CLI_FUZZ = settings(
    max_examples=CLI_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
ATHERIS_RUNS = CAMPAIGN.examples * 5
"""libFuzzer runs: the campaign's examples for each of the five parsers."""

pytestmark = pytest.mark.timeout(CAMPAIGN.size(120, 1800))

_JOB_FILES = st.binary(max_size=200) | st.sampled_from(
    [
        b"[run]\njobs = 1\n# \xff\n[task]\ncommand = ['echo']\n",
        b"a = " + b"[" * 3000,
        b"[input]\nfiles = []\n[task]\ncommand = ['echo']\n",
        b"[run]\nmemfree = '1" + b"0" * 400 + b"'\n[task]\ncommand = ['echo']\n",
        b"[task]\ncommand = ['echo', '{" + b"9" * 5000 + b"}']\n",
        b"[run]\npriority = '{}'\npriority_aging = inf\n[task]\ncommand = ['e']\n",
        b"[run]\ntimeout = " + b"9" * 5000 + b"\n[task]\ncommand = ['e']\n",
    ]
)
_OPTION_VALUES = st.tuples(
    st.sampled_from(["--timeout", "--memfree", "--halt", "--rate", "--breaker",
                     "--jobs", "--colsep", "--deadline", "--max-memory"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"),
            max_size=12)
    | st.sampled_from(["1" * 400, "1e400", "{" + "9" * 5000 + "}", "(", "-1",
                       "9" * 5000, "auto:1-" + "9" * 5000, "50%/" + "9" * 5000,
                       "now,fail=" + "9" * 5000, "(" * 1000 + ")" * 1000]),
)  # fmt: skip


def _check_no_crash(result_stderr: bytes, returncode: int) -> None:
    stderr = result_stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    assert returncode in (0, 1, 2), stderr[-3000:]
    if returncode == 2:
        assert len(error_lines(result_stderr)) == 1, stderr


def test_random_job_files_through_cli(tmp_path: Path, scenario: ScenarioRecord) -> None:
    job_file = tmp_path / "job.toml"

    @CLI_FUZZ
    @given(_JOB_FILES)
    def check(data: bytes) -> None:
        scenario.tried += 1
        job_file.write_bytes(data)
        result = run_cli(
            ["run", "--dry-run", "-f", job_file, "echo", ":::", "a"], tmp_path
        )
        _check_no_crash(result.stderr, result.returncode)

    check()


def test_random_option_values_through_cli(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    @CLI_FUZZ
    @given(_OPTION_VALUES)
    def check(option: tuple[str, str]) -> None:
        scenario.tried += 1
        name, value = option
        result = run_cli(
            ["run", "--dry-run", "--no-journal", f"{name}={value}", "echo", ":::", "a"],
            tmp_path,
        )
        _check_no_crash(result.stderr, result.returncode)

    check()


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris is not installed"
)
def test_atheris_parsers(tmp_path: Path, scenario: ScenarioRecord) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "tests.reliability.atheris_targets", str(tmp_path),
            f"-runs={ATHERIS_RUNS}", f"-seed={CAMPAIGN.seed % 2**31 + 1}",
            "-max_len=512", "-len_control=0", "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=REPOSITORY,
        capture_output=True,
        timeout=CAMPAIGN.size(110, 1700),
        check=False,
    )  # fmt: skip
    report = result.stderr.decode("utf-8", "replace")
    done = re.search(r"Done (\d+) runs", report)
    scenario.tried = int(done[1]) if done else 0
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    scenario.notes["crash_files"] = len(crashes)

    assert result.returncode == 0, report[-4000:]
    assert done is not None, report[-4000:]


@pytest.mark.parametrize("value", ["9" * 30, "50%/" + "9" * 30])
def test_huge_breaker_count_is_usage_error(
    tmp_path: Path, scenario: ScenarioRecord, value: str
) -> None:
    scenario.tried = 1

    result = run_cli(
        ["run", "--no-journal", "--breaker", value, "echo", ":::", "a"], tmp_path
    )

    assert "Traceback" not in result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1


def test_deadline_before_first_item_is_not_success(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    journal = tmp_path / "run.db"
    scenario.tried = 1

    result = run_cli(
        ["run", "--journal", journal, "--deadline", "0.000001", "echo", ":::", "a"],
        tmp_path,
    )
    status = run_cli(["status", "--json", journal], tmp_path)

    assert result.returncode != 0, result.stderr
    assert b'"state": "finished"' not in status.stdout
