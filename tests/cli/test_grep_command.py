"""`batchtools grep`: output formats, exit statuses, options and closed output.

Most tests invoke the click command in this process with CliRunner, on
real files. One runs the installed command as a process, to see it stop
when the reader of its output goes away.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batchtools.cli._grep_command import grep_command
from batchtools.cli.main import main
from tests.cli.support import cli_argv, cli_environment, kill_tree


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path to content) under ``root``; return root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def invoke(folder: Path, *arguments: str) -> Result:
    """Run ``batchtools grep`` with ``arguments`` in ``folder``, one job."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(grep_command, ["-j", "1", *arguments])
    finally:
        os.chdir(previous)


TREE = {
    "b.txt": b"alpha\nbeta hit\n",
    "a/one.py": b"hit one\nmiss\nhit two\n",
    "a/two.txt": b"nothing here\n",
    "binary.dat": b"hit\0\n",
    "late.dat": b"hit first\n" + b"x" * 100_000 + b"\n\0\n",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path, TREE)


def test_lines_printed_like_grep_rn(tree: Path) -> None:
    result = invoke(tree, "hit")
    assert result.exit_code == 0
    assert result.stdout == "a/one.py:1:hit one\na/one.py:3:hit two\nb.txt:2:beta hit\n"
    assert result.stderr == ""


def test_named_folder_prefixes_paths(tree: Path) -> None:
    result = invoke(tree, "hit", ".")
    assert result.stdout.splitlines()[0] == "./a/one.py:1:hit one"


def test_no_line_number(tree: Path) -> None:
    result = invoke(tree, "-N", "beta")
    assert result.stdout == "b.txt:beta hit\n"


def test_no_match_exits_1(tree: Path) -> None:
    result = invoke(tree, "absent")
    assert result.exit_code == 1
    assert result.stdout == ""


def test_error_exits_2_after_matches(tree: Path) -> None:
    result = invoke(tree, "beta", "b.txt", "missing.txt")
    assert result.exit_code == 2
    assert result.stdout == "b.txt:2:beta hit\n"
    assert result.stderr == "Error: missing.txt: No such file or directory\n"


def test_invalid_pattern_one_line_exit_2(tree: Path) -> None:
    result = invoke(tree, "hit(", "missing.txt")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "Error: the pattern 'hit(' is not a valid regular expression"
    )


def test_files_with_matches(tree: Path) -> None:
    result = invoke(tree, "-l", "hit")
    assert result.exit_code == 0
    assert result.stdout == "a/one.py\nb.txt\n"


def test_count_lists_every_text_file(tree: Path) -> None:
    result = invoke(tree, "-c", "hit")
    assert result.exit_code == 0
    assert result.stdout == "a/one.py:2\na/two.txt:0\nb.txt:1\n"


def test_count_and_files_rejected_together(tree: Path) -> None:
    result = invoke(tree, "-l", "-c", "hit")
    assert result.exit_code == 2
    assert "-l and -c cannot be used together" in result.stderr


@pytest.mark.parametrize(
    "options", [[], ["-l"], ["-c"], ["--json"], ["-l", "--json"], ["-c", "--json"]]
)
def test_binary_files_absent_in_every_mode(tree: Path, options: list[str]) -> None:
    result = invoke(tree, *options, "hit")
    assert result.exit_code == 0
    assert "binary.dat" not in result.stdout
    assert "late.dat" not in result.stdout
    assert "b.txt" in result.stdout


def test_json_lines(tree: Path) -> None:
    result = invoke(tree, "--json", "hit")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records == [
        {"path": "a/one.py", "line_number": 1, "line": "hit one"},
        {"path": "a/one.py", "line_number": 3, "line": "hit two"},
        {"path": "b.txt", "line_number": 2, "line": "beta hit"},
    ]


def test_json_counts_and_files(tree: Path) -> None:
    counts = invoke(tree, "--json", "-c", "hit").stdout.splitlines()
    files = invoke(tree, "--json", "-l", "hit").stdout.splitlines()
    assert json.loads(counts[0]) == {"path": "a/one.py", "count": 2}
    assert [json.loads(line) for line in files] == [
        {"path": "a/one.py"},
        {"path": "b.txt"},
    ]


def test_json_keeps_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    make_tree(tmp_path, {"f": b"caf\xe9 hit\n"})
    result = invoke(tmp_path, "--json", "hit")
    record = json.loads(result.stdout)
    assert record["line"] == "caf\ufffd hit"
    assert base64.b64decode(record["line_base64"]) == b"caf\xe9 hit"


def test_raw_bytes_kept_in_text_output(tmp_path: Path) -> None:
    make_tree(tmp_path, {"f": b"caf\xe9 hit\n"})
    result = invoke(tmp_path, "hit")
    assert result.stdout_bytes == b"f:1:caf\xe9 hit\n"


def test_max_count_for_whole_search(tree: Path) -> None:
    result = invoke(tree, "-m", "2", "hit")
    assert result.exit_code == 0
    assert result.stdout == "a/one.py:1:hit one\na/one.py:3:hit two\n"


def test_ignore_case(tree: Path) -> None:
    result = invoke(tree, "-i", "BETA")
    assert result.stdout == "b.txt:2:beta hit\n"


def test_include_exclude_and_exclude_dir(tree: Path) -> None:
    included = invoke(tree, "-l", "--include", "*.py", "hit")
    excluded = invoke(tree, "-l", "--exclude", "*.py", "--exclude", "*.dat", "hit")
    no_dir = invoke(tree, "-l", "--exclude-dir", "a", "hit")
    assert included.stdout == "a/one.py\n"
    assert excluded.stdout == "b.txt\n"
    assert no_dir.stdout == "b.txt\n"


def test_follow_warns_about_loop(tmp_path: Path) -> None:
    make_tree(tmp_path, {"d/f": b"hit\n"})
    (tmp_path / "d" / "up").symlink_to("..")
    plain = invoke(tmp_path, "hit")
    followed = invoke(tmp_path, "-R", "hit")
    assert plain.stdout == "d/f:1:hit\n"
    assert plain.stderr == ""
    assert followed.exit_code == 0
    assert followed.stdout == "d/f:1:hit\n"
    assert followed.stderr == (
        "Warning: d/up: recursive directory loop; not searched again\n"
    )


def test_registered_in_command_group(tree: Path) -> None:
    previous = Path.cwd()
    os.chdir(tree)
    try:
        result = CliRunner().invoke(main, ["grep", "-j", "1", "beta"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0
    assert result.stdout == "b.txt:2:beta hit\n"


def test_workers_give_same_output(tmp_path: Path) -> None:
    # 1500 files is more than a search keeps in one process.
    files = {f"d{n % 7}/f{n:04}.txt": b"x\nhit %d\n" % n for n in range(1500)}
    make_tree(tmp_path, files)
    alone = invoke(tmp_path, "hit")
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        parallel = CliRunner().invoke(grep_command, ["-j", "2", "hit"])
    finally:
        os.chdir(previous)
    assert parallel.exit_code == 0
    assert len(parallel.stdout.splitlines()) == 1500
    assert parallel.stdout == alone.stdout


def test_closed_output_stops_search(tmp_path: Path) -> None:
    make_tree(tmp_path, {f"f{n:03}": b"hit line\n" * 2000 for n in range(100)})
    process = subprocess.Popen(
        cli_argv(["grep", "hit", "."]),
        cwd=tmp_path,
        env=cli_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()
        status = process.wait(timeout=60)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert first == b"./f000:1:hit line\n"
    assert status == 141
    assert stderr == b""
