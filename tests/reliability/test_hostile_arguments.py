"""Hostile items reach a command byte for byte, through every input path.

Items are built from pieces that a shell would split, expand or run
(quotes, spaces, newlines, ``$(...)``, ``;``, globs, leading dashes,
replacement strings) and from bytes that are not UTF-8, chosen at random
from the campaign seed. Each goes through ``:::`` arguments, a ``::::``
file, a NUL-separated ``::::`` file or NUL-separated standard input, with
and without ``--shell``, to `argv_probe.py`, which writes the arguments it
got to a file. The test compares them, as a multiset, with the items.
"""

from __future__ import annotations

import ast
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.cli.support import Argument, error_lines, run_cli
from tests.reliability.campaign import Campaign, ScenarioRecord

PROBE = Path(__file__).with_name("argv_probe.py")
PIECES = [
    b"'", b'"', b" ", b"  ", b"\t", b"$(touch pwned)", b"`touch pwned`",
    b"; touch pwned", b"&&", b"|", b"> pwned", b"<", b"*", b"?", b"[a-z]", b"~",
    b"$HOME", b"${IFS}", b"\\", b"-", b"--", b"-n", b"--help", b"{}", b"{.}",
    b"{#}", b"{1}", b":::", b"::::", b"%", b"!", b"#", b"=", b"a=b", b"\r",
    b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"caf\xc3\xa9", b"\x1b[31m",
    b"plain", b"dir/file.txt", b".hidden",
]  # fmt: skip
"""Pieces of hostile items; newlines and other bytes are added at random."""

SOURCES = ["args", "file", "null-file", "null-stdin"]


def _hostile_items(campaign: Campaign, source: str, count: int) -> list[bytes]:
    """Return ``count`` items that ``source`` can carry.

    No item contains a NUL byte, and items for newline-separated files
    contain no newline. Among arguments, ``:::`` and ``::::`` start a new
    input source, as in GNU parallel, so they are not items there.
    """
    generator = campaign.random(f"hostile-{source}")
    items = [b""]
    while len(items) < count:
        pieces = generator.choices(PIECES, k=generator.randint(1, 6))
        if generator.random() < 0.2:
            pieces.append(bytes([generator.randint(1, 255)]))
        if source != "file" and generator.random() < 0.2:
            pieces.insert(generator.randint(0, len(pieces)), b"\n")
        item = b"".join(pieces)
        if source == "file":
            item = item.replace(b"\n", b"")
        if source == "args" and item in (b":::", b"::::"):
            continue
        items.append(item)
    return items


def _input(
    tmp_path: Path, source: str, items: list[bytes]
) -> tuple[list[Argument], list[Argument], bytes]:
    """Return the options, input arguments and standard input that give ``items``."""
    path = tmp_path / "items"
    if source == "args":
        return [], [":::", *items], b""
    if source == "file":
        path.write_bytes(b"".join(item + b"\n" for item in items))
        return [], ["::::", path], b""
    data = b"".join(item + b"\0" for item in items)
    if source == "null-file":
        path.write_bytes(data)
        return ["-0"], ["::::", path], b""
    return ["-0"], [], data


def _read_calls(folder: Path) -> list[tuple[bytes, ...]]:
    calls = []
    for path in folder.iterdir():
        arguments = ast.literal_eval(path.read_text(encoding="ascii"))
        calls.append(tuple(arguments))
    return calls


@pytest.mark.parametrize("shell", [False, True], ids=["no-shell", "shell"])
@pytest.mark.parametrize("source", SOURCES)
def test_hostile_items_reach_command_exactly(
    tmp_path: Path,
    campaign: Campaign,
    scenario: ScenarioRecord,
    source: str,
    shell: bool,
) -> None:
    items = _hostile_items(campaign, source, campaign.size(25, 1000))
    calls_folder = tmp_path / "calls"
    calls_folder.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    options, inputs, stdin = _input(tmp_path, source, items)
    command: list[Argument] = [sys.executable, "-I", "-S", PROBE, calls_folder]
    command += ["{}", "pre{}post"]
    if shell:
        options.append("--shell")
        command = [shlex.quote(str(word)) for word in command[:-2]] + command[-2:]
    scenario.faults_injected = len(items)

    result = run_cli(
        ["run", "--no-journal", "-q", *options, *command, *inputs], work, stdin=stdin
    )

    calls: Counter[tuple[bytes, ...]] = Counter(_read_calls(calls_folder))
    expected: Counter[tuple[bytes, ...]] = Counter(
        (item, b"pre" + item + b"post") for item in items
    )
    scenario.tried = len(items)
    scenario.items_lost = sum((expected - calls).values())
    scenario.duplicates = sum((calls - expected).values())
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert error_lines(result.stderr) == []
    assert calls == expected
    assert list(work.iterdir()) == [], "an item ran as shell code"
