"""How items and templates reach a command: byte for byte, one argument each.

Every command here is the probe program (`tests/cli/probe.py`), which
records the arguments it got in a ledger, as bytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.cli.support import (
    Argument,
    cli_environment,
    count_in_state,
    probe_command,
    read_probe_ledger,
    run_cli,
)

HOSTILE_ITEMS = [
    b'say "hi"',
    b"it's",
    b"two  spaces ",
    b"$(touch pwned)",
    b"`touch pwned`",
    b"a; touch pwned",
    b"> pwned",
    b"| cat",
    b"*",
    b"~",
    b"$HOME",
    b"-n",
    b"--help",
    b"back\\slash",
    b"tab\there",
    b"\xb2\x97",
    b"caf\xc3\xa9",
]
"""Items that a shell would split, expand or run, and bytes that are not UTF-8."""


def _input_arguments(
    tmp_path: Path, source: str, items: list[bytes]
) -> tuple[list[Argument], list[Argument]]:
    """Return the options and the input arguments that give ``items``.

    The options go before the command, the input arguments after it.
    """
    if source == "args":
        return [], [":::", *items]
    path = tmp_path / "items"
    if source == "file":
        path.write_bytes(b"".join(item + b"\n" for item in items))
        return [], ["::::", path]
    path.write_bytes(b"".join(item + b"\0" for item in items))
    return ["-0"], ["::::", path]


@pytest.mark.parametrize("shell", [False, True], ids=["no-shell", "shell"])
@pytest.mark.parametrize("source", ["args", "file", "nul-file"])
def test_hostile_item_reaches_command_as_one_argument(
    tmp_path: Path, source: str, shell: bool
) -> None:
    ledger = tmp_path / "ledger"
    items = list(HOSTILE_ITEMS)
    if source != "file":
        items += [b"line one\nline two", b"\n", b""]
    options, inputs = _input_arguments(tmp_path, source, items)
    if shell:
        options.append("--shell")
    arguments: list[Argument] = [
        "run",
        "--no-journal",
        *options,
        *probe_command(ledger),
        "{}",
        *inputs,
    ]

    result = run_cli(arguments, tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    received = Counter(call.argv for call in read_probe_ledger(ledger))
    assert received == Counter((item,) for item in items)
    assert not (tmp_path / "pwned").exists()


def test_item_without_replacement_string_is_last_argument(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"

    result = run_cli(
        ["run", "--no-journal", *probe_command(ledger), "-x", ":::", "a b"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert [call.argv for call in read_probe_ledger(ledger)] == [(b"-x", b"a b")]


@pytest.mark.parametrize("source", ["args", "nul-file"])
def test_retry_reruns_failed_items_with_original_bytes(
    tmp_path: Path, source: str
) -> None:
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    fail_list = tmp_path / "fail-list"
    template_word = b"tab\tnewline\nnot-utf8\xff"
    items = [
        b"plain",
        b"tab\there",
        b"\xb2\x97",
        b"fail\tcolumn",
        b"fail\xb2\x97",
        b"fail -n",
    ]
    if source == "nul-file":
        items += [b"two\nlines", b"fail\nwith newline"]
    failing = [item for item in items if item.startswith(b"fail")]
    fail_list.write_text("".join(item.hex() + "\n" for item in failing))
    options, inputs = _input_arguments(tmp_path, source, items)
    arguments: list[Argument] = [
        "run",
        "--journal",
        journal,
        *options,
        *probe_command(ledger),
        template_word,
        "{}",
        *inputs,
    ]

    first = run_cli(
        arguments,
        tmp_path,
        environment=cli_environment(PROBE_SESSION="1", PROBE_FAIL_LIST=str(fail_list)),
    )
    assert first.returncode == 1, first.stderr.decode(errors="replace")
    assert count_in_state(journal, "failed") == len(failing)
    fail_list.unlink()

    second = run_cli(
        ["retry", journal],
        tmp_path,
        environment=cli_environment(PROBE_SESSION="2", PROBE_FAIL_LIST=str(fail_list)),
    )

    assert second.returncode == 0, second.stderr.decode(errors="replace")
    retried = [call.argv for call in read_probe_ledger(ledger) if call.session == "2"]
    assert Counter(retried) == Counter((template_word, item) for item in failing)
    assert count_in_state(journal, "succeeded") == len(items)


# -- replacement strings --------------------------------------------------------


def _calls(ledger: Path) -> list[tuple[str, ...]]:
    return [
        tuple(argument.decode() for argument in call.argv)
        for call in read_probe_ledger(ledger)
    ]


def test_replacement_strings_of_path_parts(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    template = ["{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}"]

    result = run_cli(
        [
            "run",
            "--no-journal",
            "-j",
            "2",
            *probe_command(ledger),
            *template,
            ":::",
            "dir/sub/file.tar.gz",
            "plain",
            "/abs/x.y",
        ],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    calls = {call[0]: call for call in _calls(ledger)}
    assert calls["dir/sub/file.tar.gz"][:6] == (
        "dir/sub/file.tar.gz",
        "dir/sub/file.tar",
        "file.tar.gz",
        "dir/sub",
        "file.tar",
        "1",
    )
    assert calls["plain"][:6] == ("plain", "plain", "plain", ".", "plain", "2")
    assert calls["/abs/x.y"][:6] == ("/abs/x.y", "/abs/x", "x.y", "/abs", "x", "3")
    slots = {call[6] for call in calls.values()}
    assert slots <= {"1", "2"}


def test_two_input_groups_give_product_first_slowest(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"

    result = run_cli(
        [
            "run",
            "--no-journal",
            *probe_command(ledger),
            "{#}",
            "{2}",
            "{1}",
            ":::",
            "a",
            "b",
            ":::",
            "x",
            "y",
            "z",
        ],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sorted(_calls(ledger), key=lambda call: int(call[0])) == [
        ("1", "x", "a"),
        ("2", "y", "a"),
        ("3", "z", "a"),
        ("4", "x", "b"),
        ("5", "y", "b"),
        ("6", "z", "b"),
    ]


def test_max_args_batches_items_per_call(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    items = ["a", "b", "c", "d", "e"]

    options = ["run", "--no-journal", "-n", "2"]

    whole = run_cli([*options, *probe_command(ledger), "{}", ":::", *items], tmp_path)
    assert whole.returncode == 0, whole.stderr.decode(errors="replace")
    assert sorted(_calls(ledger)) == [("a", "b"), ("c", "d"), ("e",)]
    ledger.unlink()

    positions = run_cli(
        [*options, *probe_command(ledger), "{2}", "{1}", ":::", *items], tmp_path
    )

    assert positions.returncode == 0, positions.stderr.decode(errors="replace")
    assert sorted(_calls(ledger)) == [("", "e"), ("b", "a"), ("d", "c")]


def test_colsep_splits_lines_into_columns(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    table = tmp_path / "table"
    table.write_text("a, b,c\none,two, three\n")

    options = ["run", "--no-journal", "--colsep", ", *"]

    result = run_cli(
        [*options, *probe_command(ledger), "{3}", "{1}", "{2}", "::::", table],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sorted(_calls(ledger)) == [("c", "a", "b"), ("three", "one", "two")]
