"""The ``batchtools bench`` command, run as a real process on small samples."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.cli.support import (
    Argument,
    error_lines,
    probe_command,
    read_probe_ledger,
    run_cli,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NAMESPACE = "{http://www.w3.org/2000/svg}"


def test_bench_prints_table_and_writes_png(tmp_path: Path) -> None:
    result = run_cli(
        ["bench", "--jobs", "1,2", "--sample", "20", "--plot", "x.png", "--", "true"],
        tmp_path,
    )

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    lines = result.stdout.decode().splitlines()
    header = lines[0].split("  ")
    assert [cell.strip() for cell in header if cell] == [
        "jobs",
        "items/s",
        "p50",
        "p99",
        "errors",
        "peak RSS",
        "note",
    ]
    assert lines[1].split()[0] == "1"
    assert lines[2].split()[0] == "2"
    assert lines[3].startswith("Recommended: --jobs ")
    assert "2 jobs: warm-up of 4 items, then 3 samples of 20" in stderr
    data = (tmp_path / "x.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_bench_writes_svg_with_drawn_paths(tmp_path: Path) -> None:
    result = run_cli(
        ["bench", "-q", "--jobs", "1,2", "--sample", "5", "--plot", "x.svg", "true"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b""
    root = ElementTree.parse(tmp_path / "x.svg").getroot()
    assert root.tag == f"{SVG_NAMESPACE}svg"
    assert len(list(root.iter(f"{SVG_NAMESPACE}path"))) > 20


def test_bench_json_reports_every_level(tmp_path: Path) -> None:
    arguments: list[Argument] = ["bench", "-q", "--json", "-j", "2,1"]
    arguments += ["--sample", "4", "--repeat", "2", "true"]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    data = json.loads(result.stdout)
    assert [level["jobs"] for level in data["levels"]] == [1, 2]
    assert [level["items"] for level in data["levels"]] == [8, 8]
    assert data["recommended"] in (1, 2)
    assert data["levels"][0]["peak_rss"] > 0


def test_default_items_are_sample_positions(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    arguments: list[Argument] = ["bench", "-q", "-j", "1", "--sample", "3"]
    arguments += ["--repeat", "1", "--warmup", "0", *probe_command(ledger), "{}"]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    calls = sorted(call.argv for call in read_probe_ledger(ledger))
    assert calls == [(b"1",), (b"2",), (b"3",)]


def test_command_without_replacement_runs_as_written(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    arguments: list[Argument] = ["bench", "-q", "-j", "1", "--sample", "2"]
    arguments += ["--repeat", "1", "--warmup", "0", *probe_command(ledger)]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert [call.argv for call in read_probe_ledger(ledger)] == [(), ()]


def test_items_after_marker_are_used_in_turn(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    arguments: list[Argument] = ["bench", "-q", "-j", "1", "--sample", "3"]
    arguments += ["--repeat", "1", "--warmup", "0", *probe_command(ledger)]
    arguments += ["{}", ":::", "a", "b"]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    calls = sorted(call.argv for call in read_probe_ledger(ledger))
    assert calls == [(b"a",), (b"a",), (b"b",)]


def test_items_from_stdin(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    arguments: list[Argument] = ["bench", "-q", "-j", "1", "--sample", "2"]
    arguments += ["--repeat", "1", "--warmup", "0", "--stdin"]
    arguments += [*probe_command(ledger), "{}"]

    result = run_cli(arguments, tmp_path, stdin=b"x\ny\n")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    calls = sorted(call.argv for call in read_probe_ledger(ledger))
    assert calls == [(b"x",), (b"y",)]


def test_failing_command_counts_errors(tmp_path: Path) -> None:
    result = run_cli(
        ["bench", "-q", "--json", "-j", "1", "--sample", "3", "--repeat", "1", "false"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    level = json.loads(result.stdout)["levels"][0]
    assert level["errors"] == 3
    assert level["error_rate"] == 1.0


def test_call_measures_python_function(tmp_path: Path) -> None:
    arguments: list[Argument] = ["bench", "-q", "--json", "-j", "1", "--sample", "4"]
    arguments += ["--repeat", "1", "--warmup", "0"]
    arguments += ["--call", "tests.cli.call_tasks:primary", ":::", "good", "bad"]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    level = json.loads(result.stdout)["levels"][0]
    assert level["items"] == 4
    assert level["errors"] == 2


def test_no_level_within_limits_exits_1(tmp_path: Path) -> None:
    arguments: list[Argument] = ["bench", "-j", "1", "--sample", "2", "--repeat", "1"]
    arguments += ["--max-errors", "0", "false"]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 1, result.stderr.decode(errors="replace")
    stdout = result.stdout.decode()
    assert "No level was within the limits (error rate at most 0%)" in stdout
    assert "error rate 100% is above 0%" in stdout


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--jobs", "0"], "the level 0 must be at least 1"),
        (["--jobs", "\u00b2"], "is not a whole number"),
        (["--jobs", "a"], "'a' is not a whole number"),
        (["--jobs", ""], "--jobs is empty"),
        (["--jobs", "1,,2"], "'' is not a whole number"),
        (["--jobs", "2,2"], "the level 2 is given more than once"),
        (["--sample", "0"], "'--sample'"),
        (["--max-p99", "soon"], "invalid --max-p99 'soon'"),
        (["--timeout", "0s"], "invalid --timeout '0s'"),
        (["--max-errors", "150"], "--max-errors '150'"),
        (["--plot", "x.gif"], "must end in .png or .svg"),
    ],
)
def test_bad_option_exits_2_with_one_line(
    tmp_path: Path, options: list[str], expected: str
) -> None:
    ledger = tmp_path / "ledger"

    result = run_cli(["bench", *options, *probe_command(ledger)], tmp_path)

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, stderr
    assert expected in errors[0]
    assert "Traceback" not in stderr
    assert not ledger.exists()


def test_missing_command_exits_2(tmp_path: Path) -> None:
    result = run_cli(["bench", "--jobs", "1"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "missing command" in errors[0]
