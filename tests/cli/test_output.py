"""Command output through the CLI: whole per command, in order with -k, exact bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.cli.support import run_cli, started_cli

LINES = 200
COMMANDS = 20

# Writes LINES lines tagged with the item, one write(2) each. Every other
# item leaves a file when it is done, and item 01 first waits for all of
# them, so that it finishes last.
_TAGGED_LINES = (
    'if [ "$1" = 01 ]; then n=0; '
    f'while [ "$(ls "$2" | wc -l)" -lt {COMMANDS - 1} ] && [ $n -lt 1200 ]; '
    "do sleep 0.05; n=$((n+1)); done; fi; "
    f'i=0; while [ $i -lt {LINES} ]; do echo "$1 $i"; i=$((i+1)); done; '
    'if [ "$1" != 01 ]; then : > "$2/$1"; fi'
)


def _blocks(stdout: bytes) -> list[tuple[str, list[str]]]:
    """Split output into runs of consecutive lines with the same tag."""
    blocks: list[tuple[str, list[str]]] = []
    for line in stdout.decode().splitlines():
        tag, number = line.split(" ")
        if not blocks or blocks[-1][0] != tag:
            blocks.append((tag, []))
        blocks[-1][1].append(number)
    return blocks


def _run_tagged(tmp_path: Path, *options: str) -> list[tuple[str, list[str]]]:
    items = [f"{number:02d}" for number in range(1, COMMANDS + 1)]
    done = tmp_path / "done"
    done.mkdir()
    command = ["sh", "-c", _TAGGED_LINES, "sh", "{}", str(done)]
    result = run_cli(
        ["run", "--no-journal", "-j", "8", *options, *command, ":::", *items],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    blocks = _blocks(result.stdout)
    assert sorted(tag for tag, _ in blocks) == items, "a command's lines are split"
    expected = [str(number) for number in range(LINES)]
    for tag, numbers in blocks:
        assert numbers == expected, f"the lines of {tag} are incomplete or reordered"
    return blocks


def test_output_of_each_command_is_contiguous(tmp_path: Path) -> None:
    blocks = _run_tagged(tmp_path)

    assert blocks[-1][0] == "01"


def test_keep_order_prints_in_input_order(tmp_path: Path) -> None:
    blocks = _run_tagged(tmp_path, "-k")

    assert [tag for tag, _ in blocks] == [f"{n:02d}" for n in range(1, COMMANDS + 1)]


# -- bytes that are not UTF-8 ---------------------------------------------------

_NOT_UTF8 = (
    r'printf "\262\227"; printf " then text\n"; printf "err \262\227\n" >&2; '
    'i=0; while [ $i -lt 5000 ]; do echo "more $i"; i=$((i+1)); done'
)
_EXPECTED_STDOUT = b"\xb2\x97 then text\n" + b"".join(
    b"more %d\n" % number for number in range(5000)
)


def test_invalid_utf8_output_kept_in_results(tmp_path: Path) -> None:
    results = tmp_path / "results"

    command = ["sh", "-c", _NOT_UTF8, "sh"]
    result = run_cli(
        ["run", "--no-journal", "--results", results, *command, ":::", "x"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == _EXPECTED_STDOUT
    assert b"err \xb2\x97\n" in result.stderr
    folders = [path for path in results.iterdir() if path.is_dir()]
    assert len(folders) == 1
    assert (folders[0] / "stdout").read_bytes() == _EXPECTED_STDOUT
    assert (folders[0] / "stderr").read_bytes() == b"err \xb2\x97\n"
    assert (folders[0] / "exit_status").read_text() == "0\n"


def test_invalid_utf8_output_to_file_is_exact(tmp_path: Path) -> None:
    output = tmp_path / "stdout"
    arguments = ["run", "--no-journal", "sh", "-c", _NOT_UTF8, "sh", ":::", "x"]

    with (
        open(output, "wb") as stdout,
        started_cli(arguments, tmp_path, stdout=stdout) as process,
    ):
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr.decode(errors="replace")
    assert output.read_bytes() == _EXPECTED_STDOUT


def test_summary_goes_to_stderr_only(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--no-journal", "sh", "-c", "echo out", "sh", ":::", "a", "b"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"out\nout\n"
    assert b"2 succeeded" in result.stderr


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_second_run_waits_for_a_shared_results_folder(tmp_path: Path) -> None:
    results = tmp_path / "results"
    first_log, second_log = tmp_path / "first.err", tmp_path / "second.err"
    # The first run's command marks that it started, then waits for the gate.
    gated = "echo first; : > started; while [ ! -e gate ]; do sleep 0.02; done"
    first_arguments: list[str | Path] = ["run", "--no-journal", "--results", results]
    first_arguments += ["sh", "-c", gated, "sh", ":::", "same"]
    second_arguments: list[str | Path] = ["run", "--no-journal", "--results", results]
    second_arguments += ["sh", "-c", "echo second", "sh", ":::", "same"]

    with (
        open(first_log, "wb") as first_err,
        open(second_log, "wb") as second_err,
        started_cli(first_arguments, tmp_path, stderr=first_err) as first,
    ):
        _wait_until((tmp_path / "started").exists, "the first command")
        with started_cli(second_arguments, tmp_path, stderr=second_err) as second:
            _wait_until(
                lambda: b"waiting for --results" in second_log.read_bytes(),
                "the second run to wait",
            )
            assert second.poll() is None
            (tmp_path / "gate").touch()
            assert first.wait(timeout=60) == 0
            assert second.wait(timeout=60) == 0

    [folder] = [path for path in results.iterdir() if path.is_dir()]
    assert (folder / "stdout").read_bytes() == b"second\n"
    assert (folder / "exit_status").read_text() == "0\n"
    assert sorted(path.name for path in folder.iterdir()) == [
        "exit_status",
        "stderr",
        "stdout",
    ]
