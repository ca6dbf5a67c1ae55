"""Tests of read_many, write_many and their streaming forms, on real files.

The descriptor bound is checked in child interpreters whose RLIMIT_NOFILE
is lowered to 64, where exceeding the bound shows up as EMFILE errors.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchtools import ConfigurationError
from batchtools.fs.batch import (
    FileResult,
    iter_read_many,
    iter_write_many,
    read_many,
    write_many,
)

WAIT = 60.0
"""Seconds a child may take; far more than it needs unless the code is broken."""


def make_files(folder: Path, count: int) -> list[Path]:
    paths = [folder / f"{n:05}.txt" for n in range(count)]
    for n, path in enumerate(paths):
        path.write_text(f"file {n}\n")
    return paths


def worker_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("batchtools-files-")
    ]


class CountingPaths:
    """An iterator over paths that counts how many were taken from it."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = iter(paths)
        self.taken = 0

    def __iter__(self) -> Iterator[Path]:
        return self

    def __next__(self) -> Path:
        path = next(self._paths)
        self.taken += 1
        return path


# -- reading -------------------------------------------------------------


def test_read_many_returns_contents_in_input_order(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 200)

    results = read_many(reversed(paths), concurrency=8)

    assert [result.path for result in results] == list(reversed(paths))
    assert [result.index for result in results] == list(range(200))
    for result in results:
        assert result.ok
        assert result.error is None
        assert result.data == Path(result.path).read_bytes()
        assert result.size == len(Path(result.path).read_bytes())


def test_read_many_decodes_with_encoding(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("grüße", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")

    first, second = read_many([good, bad], encoding="utf-8")

    assert first.data == "grüße"
    assert first.size == len("grüße".encode())
    assert isinstance(second.error, UnicodeDecodeError)
    assert second.data is None
    assert second.size == 0


def test_read_failures_are_results(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 3)
    missing = tmp_path / "missing.txt"
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block without O_NONBLOCK

    results = read_many([paths[0], missing, folder, fifo, Path("/dev/null"), paths[2]])

    ok = [result.ok for result in results]
    assert ok == [True, False, False, False, False, True]
    assert isinstance(results[1].error, FileNotFoundError)
    assert str(missing) in str(results[1].error)
    assert isinstance(results[2].error, IsADirectoryError)
    assert str(folder) in str(results[2].error)
    assert isinstance(results[3].error, OSError)
    assert "not a regular file but a FIFO" in str(results[3].error)
    assert "not a regular file but a device" in str(results[4].error)
    assert results[5].data == b"file 2\n"


def test_symlink_to_file_is_read(tmp_path: Path) -> None:
    (target,) = make_files(tmp_path, 1)
    link = tmp_path / "link.txt"
    link.symlink_to(target)

    (result,) = read_many([link])

    assert result.data == b"file 0\n"


# -- writing -------------------------------------------------------------


@pytest.mark.parametrize("atomic", [True, False])
def test_write_many_writes_mapping(tmp_path: Path, atomic: bool) -> None:
    files: dict[str | os.PathLike[str], Any] = {
        tmp_path / "a.txt": "alpha",
        str(tmp_path / "b.bin"): b"\x00\x01",
        tmp_path / "c.bin": bytearray(b"xyz"),
        tmp_path / "d.bin": memoryview(b"view"),
        tmp_path / "e.txt": "grüße",
    }

    results = write_many(files, atomic=atomic, concurrency=3)

    assert [result.path for result in results] == list(files)
    assert all(result.ok for result in results)
    assert [result.size for result in results] == [5, 2, 3, 4, 7]
    assert (tmp_path / "a.txt").read_text() == "alpha"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"xyz"
    assert (tmp_path / "d.bin").read_bytes() == b"view"
    assert (tmp_path / "e.txt").read_text(encoding="utf-8") == "grüße"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.bin", "d.bin", "e.txt"]


def test_write_many_takes_pairs_with_encoding(tmp_path: Path) -> None:
    pairs = ((tmp_path / f"{n}.txt", f"é{n}") for n in range(50))

    results = write_many(pairs, encoding="latin-1")

    assert all(result.ok for result in results)
    assert (tmp_path / "7.txt").read_bytes() == "é7".encode("latin-1")


def test_atomic_write_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "config.txt"
    target.write_text("old")
    target.chmod(0o640)
    old_inode = target.stat().st_ino

    (result,) = write_many({target: "new"})

    assert result.ok
    assert target.read_text() == "new"
    assert target.stat().st_ino != old_inode  # a new file was renamed in
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["config.txt"]


def test_plain_write_truncates_in_place(tmp_path: Path) -> None:
    target = tmp_path / "config.txt"
    target.write_text("old and longer")
    old_inode = target.stat().st_ino

    (result,) = write_many({target: "new"}, atomic=False)

    assert result.ok
    assert target.read_text() == "new"
    assert target.stat().st_ino == old_inode


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_many({tmp_path / "new.txt": "x"})
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize("atomic", [True, False])
def test_write_failures_are_results(tmp_path: Path, atomic: bool) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    files: list[tuple[str | os.PathLike[str], Any]] = [
        (tmp_path / "good.txt", "good"),
        (tmp_path / "no-such-folder" / "a.txt", "lost"),
        (folder, "a folder is not a file"),
        (tmp_path / "number.txt", 42),
        (tmp_path / "last.txt", b"last"),
    ]

    results = write_many(files, atomic=atomic)

    assert [result.ok for result in results] == [True, False, False, False, True]
    assert isinstance(results[1].error, FileNotFoundError)
    assert isinstance(results[2].error, IsADirectoryError)
    assert isinstance(results[3].error, TypeError)
    assert "is int; give bytes or str" in str(results[3].error)
    assert [result.size for result in results] == [4, 0, 0, 0, 4]
    assert not (tmp_path / "number.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["folder", "good.txt", "last.txt"]
    assert os.listdir(folder) == []


def test_malformed_pair_raises_after_earlier_files(tmp_path: Path) -> None:
    files: list[Any] = [(tmp_path / "a.txt", "a"), "not a pair"]

    with pytest.raises(TypeError, match="element 1 of files is 'not a pair'"):
        write_many(files)
    assert (tmp_path / "a.txt").read_text() == "a"


# -- input and options ---------------------------------------------------


def test_input_error_is_raised_after_earlier_results(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 3)

    def failing_paths() -> Iterator[Path]:
        yield from paths
        raise RuntimeError("listing failed")

    received: list[FileResult[bytes]] = []
    with (
        pytest.raises(RuntimeError, match="listing failed"),
        iter_read_many(failing_paths(), concurrency=2) as results,
    ):
        received.extend(results)
    assert sorted(result.index for result in received) == [0, 1, 2]

    with pytest.raises(RuntimeError, match="listing failed"):
        read_many(failing_paths())


def test_single_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is one path; give a list"):
        read_many(str(tmp_path / "a.txt"))
    with pytest.raises(ConfigurationError, match="is one path; give a list"):
        write_many(tmp_path)  # type: ignore[arg-type]  # a mistake on purpose


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency=0 is invalid"),
        ({"concurrency": 2.5}, "concurrency=2.5 is invalid"),
        ({"max_open": 0}, "max_open=0 is invalid; give an int of at least 1"),
    ],
)
def test_read_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        read_many([], **options)


def test_max_open_of_one_writes_every_file(tmp_path: Path) -> None:
    files = {tmp_path / f"{n}.txt": str(n) for n in range(20)}

    results = write_many(files, max_open=1, concurrency=8)

    assert all(result.ok for result in results)
    assert len(os.listdir(tmp_path)) == 20


def test_write_through_symlink_replaces_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)

    (result,) = write_many({link: "new"})

    assert result.ok
    assert link.is_symlink()
    assert target.read_text() == "new"


def test_empty_input_gives_no_results() -> None:
    assert read_many([]) == []
    assert write_many({}) == []


# -- streaming -----------------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True])
def test_stream_takes_input_on_demand(tmp_path: Path, ordered: bool) -> None:
    paths = make_files(tmp_path, 300)
    source = CountingPaths(paths)
    concurrency = 4
    received = 0

    with iter_read_many(source, concurrency=concurrency, ordered=ordered) as results:
        for result in results:
            received += 1
            assert result.ok
            # In flight, queued or waiting to be reordered: never more.
            assert source.taken <= received + 2 * concurrency
            if received == 20:
                break
    assert received == 20
    assert source.taken <= 20 + 2 * concurrency
    assert worker_threads() == []


def test_ordered_stream_keeps_input_order(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 300)
    # Large files among small ones finish late without the reorder buffer.
    for path in paths[::7]:
        path.write_bytes(b"x" * 200_000)

    with iter_read_many(paths, concurrency=8, ordered=True) as results:
        indexes = [result.index for result in results]

    assert indexes == list(range(300))


def test_write_stream_yields_every_file(tmp_path: Path) -> None:
    pairs = ((tmp_path / f"{n}.txt", str(n)) for n in range(100))

    with iter_write_many(pairs, concurrency=4) as results:
        indexes = sorted(result.index for result in results)

    assert indexes == list(range(100))
    assert len(os.listdir(tmp_path)) == 100


def test_dropped_stream_stops_workers(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 100)
    source = CountingPaths(paths)

    for result in iter_read_many(source, concurrency=4):
        assert result.ok
        break
    gc.collect()

    assert worker_threads() == []
    assert source.taken < 100


def test_unstarted_stream_starts_no_workers(tmp_path: Path) -> None:
    stream = iter_read_many(make_files(tmp_path, 5))
    assert worker_threads() == []
    stream.close()
    assert list(stream) == []


# -- the descriptor bound, in child processes ----------------------------

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    import psutil
    from batchtools.fs.batch import default_max_open, read_many, write_many

    folder, count, free = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    max_open = None if sys.argv[4] == "default" else int(sys.argv[4])

    # A first small batch imports whatever the calls import lazily, so that
    # no module file is opened under the limit.
    warm = os.path.join(folder, "warm-up")
    write_many({warm: b"x"})
    read_many([warm])
    os.unlink(warm)

    limit = 64
    _, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard_limit))
    process = psutil.Process()
    fillers = []
    while limit - process.num_fds() > free:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
    free_now = limit - process.num_fds()

    paths = [os.path.join(folder, f"{n:05}.txt") for n in range(count)]
    contents = [f"file {n}\\n".encode() for n in range(count)]
    written = write_many(zip(paths, contents), concurrency=64, max_open=max_open)
    read = read_many(paths, concurrency=64, max_open=max_open)

    errors = {str(result.error) for result in written + read if result.error}
    print(json.dumps({
        "free": free_now,
        "default_max_open": default_max_open(),
        "written": sum(result.ok for result in written),
        "read": sum(result.data == data for result, data in zip(read, contents)),
        "errors": sorted(errors)[:5],
    }))
    """
)


def run_child(folder: Path, count: int, free: int, max_open: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(count), str(free), max_open],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, Any] = json.loads(completed.stdout)
    return report


def test_ten_thousand_files_under_limit_of_64(tmp_path: Path) -> None:
    report = run_child(tmp_path, 10_000, free=64, max_open="default")

    assert report["errors"] == []
    assert report["written"] == 10_000
    assert report["read"] == 10_000
    assert report["default_max_open"] <= report["free"] // 2


def test_default_leaves_descriptors_already_open(tmp_path: Path) -> None:
    # Only 12 descriptors are free when the calls start.
    report = run_child(tmp_path, 1_000, free=12, max_open="default")

    assert report["free"] == 12
    assert report["default_max_open"] == 6
    assert report["errors"] == []
    assert report["written"] == 1_000
    assert report["read"] == 1_000


def test_explicit_max_open_is_never_exceeded(tmp_path: Path) -> None:
    # The bound equals the free descriptors, so files opened past it fail
    # with EMFILE whenever enough of them overlap.
    report = run_child(tmp_path, 1_000, free=8, max_open="8")

    assert report["free"] == 8
    assert report["errors"] == []
    assert report["written"] == 1_000
    assert report["read"] == 1_000
