"""`grep`: agreement with GNU grep, line rules, binary files, walking, early stop.

The comparison tests run GNU grep with ``LC_ALL=C`` on folders of the
interpreter's standard library and compare the sets of (file, line number)
pairs. Tests that need the worker processes lower `IN_PROCESS_FILES`, a
threshold read in this process only, so that a small tree still goes to
real worker processes.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import pytest

import batchtools.fs.grep as grep_module
from batchtools import ConfigurationError
from batchtools.fs._grep_worker import BLOCK_BYTES, LINES, NOT_READ, TEXT
from batchtools.fs.grep import Diagnostic, FileResult, Search, grep

STDLIB = Path(sysconfig.get_paths()["stdlib"])
GNU_GREP = shutil.which("grep")

Pairs = set[tuple[str, int]]


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every search with jobs > 1 to worker processes, in small chunks."""
    monkeypatch.setattr(grep_module, "IN_PROCESS_FILES", 0)
    monkeypatch.setattr(grep_module, "FIRST_CHUNK_FILES", 2)
    monkeypatch.setattr(grep_module, "CHUNK_FILES", 2)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path to content) under ``root``; return root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def pairs(search: Search) -> Pairs:
    return {
        (match.path, match.line_number) for result in search for match in result.matches
    }


def lines_of(pattern: str, path: Path, **options: object) -> list[tuple[int, bytes]]:
    """Return (line number, line) of every match in one file."""
    with grep(pattern, [path], jobs=1, **options) as search:  # type: ignore[arg-type]
        return [
            (match.line_number, match.line)
            for result in search
            for match in result.matches
        ]


def has_nul(path: str) -> bool:
    with open(path, "rb") as file:
        return b"\0" in file.read()


def gnu_grep_pairs(pattern: str, folder: Path, *flags: str) -> Pairs:
    """Run ``LC_ALL=C grep -rnIE`` and return its (file, line) pairs.

    grep -I skips a file with a NUL byte in the first block it reads, but
    prints the matches before a later NUL, so files with a NUL anywhere are
    dropped here too: ours skips those whole.
    """
    assert GNU_GREP is not None
    completed = subprocess.run(
        [GNU_GREP, "-rnIE", *flags, "--", pattern, str(folder)],
        env={**os.environ, "LC_ALL": "C"},
        capture_output=True,
        check=False,
    )
    assert completed.returncode in (0, 1), completed.stderr
    found: Pairs = set()
    for line in completed.stdout.splitlines():
        path, number, _ = line.split(b":", 2)
        found.add((os.fsdecode(path), int(number)))
    late_binary = {path for path, _ in found if has_nul(path)}
    return {pair for pair in found if pair[0] not in late_binary}


needs_gnu_grep = pytest.mark.skipif(GNU_GREP is None, reason="grep is not installed")

COMPARISONS = [
    ("json", r"def [a-z_]+\(self\)", ()),
    ("email", r"^import (os|sys)$", ()),
    ("asyncio", r"TODO|FIXME", ()),
    ("email", r"content-type", ("-i",)),
    ("json", r"^\s*$", ()),
    ("asyncio", r"self\.[a-z]+ = None$", ()),
]


@needs_gnu_grep
@pytest.mark.parametrize(("folder", "pattern", "flags"), COMPARISONS)
def test_grep_agrees_with_gnu_grep_in_process(
    folder: str, pattern: str, flags: tuple[str, ...]
) -> None:
    expected = gnu_grep_pairs(pattern, STDLIB / folder, *flags)
    search = grep(pattern, [STDLIB / folder], ignore_case=bool(flags), jobs=1)
    found = pairs(search)
    assert expected, "the comparison needs some matches"
    assert found == expected


@needs_gnu_grep
@pytest.mark.parametrize(("folder", "pattern", "flags"), COMPARISONS[:3])
@pytest.mark.usefixtures("workers")
def test_grep_agrees_with_gnu_grep_in_workers(
    folder: str, pattern: str, flags: tuple[str, ...]
) -> None:
    expected = gnu_grep_pairs(pattern, STDLIB / folder, *flags)
    search = grep(pattern, [STDLIB / folder], jobs=2)
    found = pairs(search)
    assert search.statistics.workers >= 1
    assert found == expected


@needs_gnu_grep
def test_grep_agrees_with_gnu_grep_on_whole_stdlib() -> None:
    pattern = r"def [a-z_]+\(self\)"
    expected = gnu_grep_pairs(pattern, STDLIB)
    found = pairs(grep(pattern, [STDLIB]))
    assert len(found) > 1000
    assert found == expected


def test_last_line_without_newline_matches(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"one\ntwo"}) / "f"
    assert lines_of("two$", path) == [(2, b"two")]


def test_empty_pattern_matches_every_line_once(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"a\n\nb\n"}) / "f"
    assert lines_of("", path) == [(1, b"a"), (2, b""), (3, b"b")]


def test_empty_file_has_no_lines(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b""}) / "f"
    assert lines_of("", path) == []


def test_match_never_spans_lines(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"a\nb\nxa byz\n"}) / "f"
    assert lines_of(r"a\sb", path) == [(3, b"xa byz")]
    assert lines_of(r"a[^z]*b", path) == [(3, b"xa byz")]


def test_line_found_after_spanning_candidate(tmp_path: Path) -> None:
    # The first candidate starts on line 1 and runs into line 2; line 1
    # alone has no match, and line 2 has one of its own.
    path = make_tree(tmp_path, {"f": b"ab\ncd ab cd\n"}) / "f"
    assert lines_of(r"b\s*c", path) == [(2, b"cd ab cd")]


def test_anchors_apply_to_each_line(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"abc\nabd\nxabc\n"}) / "f"
    assert lines_of("^abc$", path) == [(1, b"abc")]
    assert lines_of("c$", path) == [(1, b"abc"), (3, b"xabc")]


def test_ignore_case_folds_ascii_letters(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"Hello\nHELLO\nhello\n"}) / "f"
    assert [number for number, _ in lines_of("hello", path)] == [3]
    folded = lines_of("hello", path, ignore_case=True)
    assert [number for number, _ in folded] == [1, 2, 3]


def test_line_numbers_across_blocks(tmp_path: Path) -> None:
    line = b"x" * 99 + b"\n"
    lines_total = 3 * BLOCK_BYTES // len(line) + 7
    wanted = {1, 10_486, 10_487, 20_000, lines_total}
    content = b"".join(
        b"needle" + line[6:] if number in wanted else line
        for number in range(1, lines_total + 1)
    )
    path = make_tree(tmp_path, {"f": content}) / "f"
    found = lines_of("needle", path)
    assert [number for number, _ in found] == sorted(wanted)
    assert all(text == b"needle" + b"x" * 93 for _, text in found)


def test_line_longer_than_a_block(tmp_path: Path) -> None:
    long_line = b"y" * (2 * BLOCK_BYTES + 5) + b"needle"
    path = make_tree(tmp_path, {"f": b"first\n" + long_line + b"\nlast needle"}) / "f"
    found = lines_of("needle", path)
    assert [number for number, _ in found] == [2, 3]
    assert found[0][1] == long_line


BINARY_TREE = {
    "early.bin": b"match\0\n",
    "late.txt": b"match on line one\n" + b"z" * (2 * BLOCK_BYTES) + b"\n\0match\n",
    "plain.txt": b"no\nmatch\n",
}


@pytest.mark.parametrize("output", ["lines", "files", "counts"])
def test_binary_files_skipped_in_every_mode(tmp_path: Path, output: str) -> None:
    make_tree(tmp_path, BINARY_TREE)
    with grep("match", [tmp_path], output=output, jobs=1) as search:  # type: ignore[arg-type]
        results = list(search)
    assert [result.path for result in results] == [f"{tmp_path}/plain.txt"]
    assert search.statistics.binary_files == 2
    assert search.statistics.files_searched == 1


@pytest.mark.usefixtures("workers")
def test_binary_rule_same_in_workers(tmp_path: Path) -> None:
    make_tree(tmp_path, BINARY_TREE)
    with grep("match", [tmp_path], output="counts", jobs=2) as search:
        results = list(search)
    assert search.statistics.workers >= 1
    assert [(r.path, r.count) for r in results] == [(f"{tmp_path}/plain.txt", 1)]
    assert search.statistics.binary_files == 2


def test_output_modes_report_counts(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\nhit\n", "b": b"miss\n", "c": b"hit\n"})
    files = list(grep("hit", [tmp_path], output="files", jobs=1))
    counts = list(grep("hit", [tmp_path], output="counts", jobs=1))
    assert [(r.path, r.count, r.matches) for r in files] == [
        (f"{tmp_path}/a", 1, ()),
        (f"{tmp_path}/c", 1, ()),
    ]
    assert [(r.path, r.count) for r in counts] == [
        (f"{tmp_path}/a", 2),
        (f"{tmp_path}/b", 0),
        (f"{tmp_path}/c", 1),
    ]


ORDER_TREE = {
    "b.txt": b"hit\n",
    "a.txt": b"hit\n",
    "a/z.txt": b"hit\n",
    "a-b/c.txt": b"hit\n",
    "A.txt": b"hit\n",
    "a/b/c.txt": b"hit\nno\nhit\n",
}


def test_results_sorted_by_path_then_line(tmp_path: Path) -> None:
    make_tree(tmp_path, ORDER_TREE)
    found = [
        (match.path, match.line_number)
        for result in grep("hit", [tmp_path], jobs=1)
        for match in result.matches
    ]
    assert found == sorted(found)
    assert len(found) == 7


@pytest.mark.usefixtures("workers")
def test_order_same_in_workers(tmp_path: Path) -> None:
    make_tree(tmp_path, {**ORDER_TREE, **{f"m/{n:03}": b"hit\n" for n in range(60)}})
    here = [r.path for r in grep("hit", [tmp_path], jobs=1)]
    search = grep("hit", [tmp_path], jobs=2)
    there = [r.path for r in search]
    assert search.statistics.workers >= 1
    assert there == here


def test_operands_keep_their_order(tmp_path: Path) -> None:
    make_tree(tmp_path, {"x/1": b"hit\n", "y/1": b"hit\n"})
    found = [r.path for r in grep("hit", [tmp_path / "y", tmp_path / "x"], jobs=1)]
    assert found == [f"{tmp_path}/y/1", f"{tmp_path}/x/1"]


def test_default_path_has_no_dot_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, {"sub/f": b"hit\n", "g": b"hit\n"})
    monkeypatch.chdir(tmp_path)
    assert [r.path for r in grep("hit", jobs=1)] == ["g", "sub/f"]
    assert [r.path for r in grep("hit", ".", jobs=1)] == ["./g", "./sub/f"]
    assert [r.path for r in grep("hit", "sub//", jobs=1)] == ["sub/f"]


FILTER_TREE = {
    "a.py": b"hit\n",
    "b.txt": b"hit\n",
    ".hidden.py": b"hit\n",
    "sub/c.py": b"hit\n",
    "skip/d.py": b"hit\n",
    "skip/inner/e.py": b"hit\n",
}


def relative_paths(search: Search, root: Path) -> list[str]:
    return [os.path.relpath(result.path, root) for result in search]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"include": "*.py"},
            [".hidden.py", "a.py", "skip/d.py", "skip/inner/e.py", "sub/c.py"],
        ),
        ({"exclude": ["*.py"]}, ["b.txt"]),
        ({"exclude_dir": ["skip"]}, [".hidden.py", "a.py", "b.txt", "sub/c.py"]),
        ({"include": ["*.txt", "c.*"]}, ["b.txt", "sub/c.py"]),
        (
            {"include": "*.py", "exclude": "[a-c].py"},
            [".hidden.py", "skip/d.py", "skip/inner/e.py"],
        ),
        # Globs match the base name, so a glob with a slash matches nothing.
        ({"include": "sub/*.py"}, []),
        (
            {"exclude_dir": "inn*"},
            [".hidden.py", "a.py", "b.txt", "skip/d.py", "sub/c.py"],
        ),
    ],
)
def test_include_and_exclude_globs(
    tmp_path: Path, options: dict[str, object], expected: list[str]
) -> None:
    make_tree(tmp_path, FILTER_TREE)
    search = grep("hit", [tmp_path], jobs=1, **options)  # type: ignore[arg-type]
    assert relative_paths(search, tmp_path) == expected


def test_named_file_searched_despite_globs(tmp_path: Path) -> None:
    make_tree(tmp_path, FILTER_TREE)
    search = grep("hit", [tmp_path / "b.txt"], include="*.py", jobs=1)
    assert relative_paths(search, tmp_path) == ["b.txt"]


def test_fifo_inside_folder_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n"})
    os.mkfifo(tmp_path / "pipe")
    assert relative_paths(grep("hit", [tmp_path], jobs=1), tmp_path) == ["a"]


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    """A tree with a link to a file, links to a folder, and a loop."""
    root = make_tree(tmp_path / "root", {"real/f": b"hit\n", "top": b"hit\n"})
    make_tree(tmp_path / "outside", {"g": b"hit\n"})
    (root / "file-link").symlink_to(root / "top")
    (root / "outside-link").symlink_to(tmp_path / "outside")
    (root / "real" / "loop").symlink_to("..")
    return root


def test_symlinks_not_followed_by_default(linked_tree: Path) -> None:
    search = grep("hit", [linked_tree], jobs=1)
    assert relative_paths(search, linked_tree) == ["real/f", "top"]
    assert search.diagnostics == []


def test_named_symlink_followed(linked_tree: Path) -> None:
    search = grep("hit", [linked_tree / "outside-link"], jobs=1)
    assert [r.path for r in search] == [f"{linked_tree}/outside-link/g"]


def test_follow_reports_loop_once(linked_tree: Path) -> None:
    search = grep("hit", [linked_tree], follow_symlinks=True, jobs=1)
    assert relative_paths(search, linked_tree) == [
        "file-link",
        "outside-link/g",
        "real/f",
        "top",
    ]
    assert search.diagnostics == [
        Diagnostic(
            f"{linked_tree}/real/loop",
            "recursive directory loop; not searched again",
            "warning",
        )
    ]
    assert search.statistics.errors == 0


def test_follow_searches_each_folder_once(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"data/f": b"hit\n"})
    (root / "link1").symlink_to("data")
    (root / "link2").symlink_to("data")
    search = grep("hit", [root], follow_symlinks=True, jobs=1)
    assert relative_paths(search, root) == ["data/f"]
    assert search.diagnostics == []


@pytest.mark.usefixtures("workers")
def test_follow_loop_in_workers(linked_tree: Path) -> None:
    search = grep("hit", [linked_tree], follow_symlinks=True, jobs=2)
    assert len(relative_paths(search, linked_tree)) == 4
    assert [d.severity for d in search.diagnostics] == ["warning"]


def test_dangling_link_is_an_error_with_follow(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n"})
    (tmp_path / "b").symlink_to("nowhere")
    search = grep("hit", [tmp_path], follow_symlinks=True, jobs=1)
    assert relative_paths(search, tmp_path) == ["a"]
    assert search.diagnostics == [
        Diagnostic(f"{tmp_path}/b", "No such file or directory")
    ]
    assert search.statistics.errors == 1


def test_missing_operand_reported_and_others_searched(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n"})
    reported: list[Diagnostic] = []
    search = grep(
        "hit", [tmp_path / "nope", tmp_path], jobs=1, on_diagnostic=reported.append
    )
    assert relative_paths(search, tmp_path) == ["a"]
    assert reported == [Diagnostic(f"{tmp_path}/nope", "No such file or directory")]
    assert search.diagnostics == reported


def test_vanished_file_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n", "b": b"hit\n", "c": b"hit\n"})
    with grep("hit", [tmp_path], jobs=1) as search:
        first = next(search)
        (tmp_path / "b").unlink()  # listed with its folder, gone when opened
        rest = list(search)
    assert first.path == f"{tmp_path}/a"
    assert [r.path for r in rest] == [f"{tmp_path}/c"]
    assert search.diagnostics == [
        Diagnostic(f"{tmp_path}/b", "No such file or directory")
    ]


def test_path_through_file_reported(tmp_path: Path) -> None:
    # Permission bits do not stop root, but a path through a regular file
    # fails with ENOTDIR for every user.
    make_tree(tmp_path, {"a": b"hit\n"})
    search = grep("hit", [tmp_path / "a" / "x"], jobs=1)
    assert list(search) == []
    assert [d.message for d in search.diagnostics] == ["Not a directory"]


def many_files(root: Path, count: int) -> Path:
    return make_tree(root, {f"f{number:04}": b"hit\n" for number in range(count)})


def test_max_results_stops_reading(tmp_path: Path) -> None:
    many_files(tmp_path, 50)
    (tmp_path / "zz-dangling").symlink_to("nowhere")
    search = grep("hit", [tmp_path], max_results=3, follow_symlinks=True, jobs=1)
    found = relative_paths(search, tmp_path)
    assert found == ["f0000", "f0001", "f0002"]
    assert search.statistics.matches == 3
    assert search.statistics.files_read == 3
    assert search.diagnostics == []


@pytest.mark.usefixtures("workers")
def test_max_results_stops_workers(tmp_path: Path) -> None:
    many_files(tmp_path, 400)
    (tmp_path / "zz-dangling").symlink_to("nowhere")
    search = grep("hit", [tmp_path], max_results=1, follow_symlinks=True, jobs=2)
    found = relative_paths(search, tmp_path)
    assert found == ["f0000"]
    assert search.statistics.workers >= 1
    # At most the window of chunks (4 per worker, 2 files each) was read.
    assert search.statistics.files_read <= grep_module.WINDOW_PER_WORKER * 2 * 2
    assert search.diagnostics == []


def test_max_results_cuts_last_file(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\nhit\n", "b": b"hit\nhit\nhit\n", "c": b"hit\n"})
    search = grep("hit", [tmp_path], max_results=3, jobs=1)
    results = list(search)
    assert [(r.path, r.count, len(r.matches)) for r in results] == [
        (f"{tmp_path}/a", 2, 2),
        (f"{tmp_path}/b", 1, 1),
    ]
    counts = grep("hit", [tmp_path], max_results=3, output="counts", jobs=1)
    assert [r.count for r in counts] == [2, 1]
    files = grep("hit", [tmp_path], max_results=2, output="files", jobs=1)
    assert [os.path.basename(r.path) for r in files] == ["a", "b"]


def test_max_results_zero_reads_nothing(tmp_path: Path) -> None:
    many_files(tmp_path, 3)
    search = grep("hit", [tmp_path], max_results=0, jobs=1)
    assert list(search) == []
    assert search.statistics.files_read == 0


def worker_processes() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("_grep_worker" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.usefixtures("workers")
def test_close_stops_workers(tmp_path: Path) -> None:
    many_files(tmp_path, 100)
    with grep("hit", [tmp_path], jobs=2) as search:
        first = next(search)
        assert worker_processes()
    assert first.path == f"{tmp_path}/f0000"
    assert worker_processes() == []
    assert list(search) == []


@pytest.mark.usefixtures("workers")
def test_killed_worker_fails_its_files_only(tmp_path: Path) -> None:
    many_files(tmp_path, 100)
    with grep("hit", [tmp_path], jobs=2) as search:
        results: list[FileResult] = [next(search)]
        for process in worker_processes():
            process.send_signal(signal.SIGKILL)
        results.extend(search)
    paths = {r.path for r in results} | {d.path for d in search.diagnostics}
    assert paths == {f"{tmp_path}/f{number:04}" for number in range(100)}
    for diagnostic in search.diagnostics:
        assert (
            diagnostic.message == "not searched: the worker process killed by SIGKILL"
        )


def test_statistics_and_repr(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n", "b": b"\0hit\n", "c": b"miss\n"})
    search = grep("hit", [tmp_path], jobs=1)
    list(search)
    statistics = search.statistics
    assert statistics.matches == 1
    assert statistics.files_searched == 2
    assert statistics.binary_files == 1
    assert statistics.files_read == 3
    assert statistics.bytes_read == 14
    assert statistics.workers == 0
    assert repr(search) == ("<Search matches=1 files_searched=2 errors=0 workers=0>")


def test_bytes_pattern_and_non_utf8_lines(tmp_path: Path) -> None:
    path = make_tree(tmp_path, {"f": b"caf\xe9\nplain\n"}) / "f"
    assert lines_of(b"caf\xe9", path) == [(1, b"caf\xe9")]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a(", r"the pattern 'a\(' is not a valid regular expression: missing \)"),
        ("[z-a]", r"the pattern '\[z-a\]' is not a valid regular expression"),
        ("[[:digit:]]+", r"uses the POSIX class \[:digit:\]"),
        ("x{4294967296}", "has a repetition count too large"),
        ("x{" + "9" * 5000 + "}", "has a repetition count too large"),
        ("(" * 1000 + ")" * 1000, "groups nested too deeply"),
    ],
)
def test_invalid_pattern_rejected_before_reading(
    tmp_path: Path, pattern: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        grep(pattern, [tmp_path / "nope"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jobs": 0}, "jobs must be a whole number, 1 or more"),
        ({"max_results": -1}, "max_results must be a whole number, 0 or more"),
        ({"max_results": True}, "max_results must be a whole number"),
        ({"output": "lines-only"}, "output must be 'lines', 'files' or 'counts'"),
        ({"paths": []}, "paths is empty"),
        ({"paths": [3]}, "paths must hold str or os.PathLike values"),
        ({"include": [None]}, "include must hold str globs"),
    ],
)
def test_invalid_options_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        grep("x", **options)  # type: ignore[arg-type]


def test_abandoned_search_leaves_no_workers(tmp_path: Path, workers: None) -> None:
    many_files(tmp_path, 50)

    def first_result() -> Iterator[FileResult]:
        search = grep("hit", [tmp_path], jobs=2)
        yield next(search)

    assert [r.path for r in first_result()] == [f"{tmp_path}/f0000"]
    # The search object is gone, and its generator closed the pool with it.
    assert worker_processes() == []


def test_worker_skips_files_after_stop(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"hit\n", "b": b"hit\n"})
    stop_read, stop_write = os.pipe()
    to_worker_read, to_worker_write = os.pipe()
    from_worker_read, from_worker_write = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", grep_module.WORKER_SCRIPT, str(stop_read)],
        stdin=to_worker_read,
        stdout=from_worker_write,
        pass_fds=(stop_read,),
    )
    for fd in (stop_read, to_worker_read, from_worker_write):
        os.close(fd)
    inbox = Connection(to_worker_write, readable=False)
    outbox = Connection(from_worker_read, writable=False)
    try:
        inbox.send_bytes(pickle.dumps((b"hit", 0, LINES, None)))
        inbox.send_bytes(pickle.dumps([str(tmp_path / "a")]))
        before = pickle.loads(outbox.recv_bytes())
        os.close(stop_write)
        inbox.send_bytes(pickle.dumps([str(tmp_path / "b")]))
        after = pickle.loads(outbox.recv_bytes())
    finally:
        inbox.close()
        outbox.close()
        status = process.wait(timeout=30)
    assert before == [(TEXT, 1, [(1, b"hit")], 4, "")]
    assert after == [(NOT_READ, 0, [], 0, "")]
    assert status == 0


@pytest.mark.parametrize(
    ("pattern", "advice"),
    [
        (r"\<foo", r"write \b"),
        (r"\d+", "[0-9]"),
        (r"[\d]", "move it out"),
        (r"o+?", "drop the ?"),
        (r"x{2}?", "drop the ?"),
        (r"a\tb", "character itself"),
        (r"\Afoo", "^ or $"),
    ],
)
def test_patterns_read_differently_by_gnu_grep_are_refused(
    tmp_path: Path, pattern: str, advice: str
) -> None:
    (tmp_path / "a.txt").write_text("foo 12\n")

    with pytest.raises(ConfigurationError, match=re.escape(advice)):
        list(grep(pattern, tmp_path))
