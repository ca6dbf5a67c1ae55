"""Runs at the limits: few file descriptors, huge items, many items, deep graphs.

Every run is the real CLI in a subprocess, most of them with a real
journal. The graph is built with the library instead, and the journal's own
memory is measured by `journal_memory.py` in a child process. Sizes come
from the campaign: the subset runs 100,000 items and a chain of 10,000
tasks, the whole campaign a million items and a chain of 100,000.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import batchtools
from batchtools.journal import iter_items
from tests.cli.support import (
    Argument,
    cli_argv,
    cli_environment,
    error_lines,
    integrity_check,
    kill_tree,
    run_cli,
)
from tests.reliability.campaign import CAMPAIGN, REPOSITORY, Campaign, ScenarioRecord

DESCRIPTOR_LIMIT = 64
RUN_LIMIT = CAMPAIGN.size(120.0, 1500.0)
"""Seconds one CLI run of this module may take before the test fails."""

HUGE_ITEM = 10 * 1024 * 1024
SAVE_TASK = "tests.reliability.tasks:save_item"
FLAT_SHARE = 0.10
FLAT_SLACK = 20 * 1024 * 1024
"""Flat memory: the peak at the end is at most 10 percent plus 20 MB above
the peak after a tenth of the items."""

SAMPLE_INTERVAL = 0.01
"""Seconds between two samples of the CLI's resident memory."""


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))


def _run_limited(
    arguments: list[Argument], cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with at most `DESCRIPTOR_LIMIT` open file descriptors."""
    return run_cli(arguments, cwd, preexec=_limit_descriptors, timeout=RUN_LIMIT)


def _item_files(folder: Path, count: int) -> tuple[Path, set[bytes]]:
    """Write ``count`` small files and a list of their paths; return both."""
    folder.mkdir()
    contents = set()
    for number in range(count):
        content = b"content of file %d" % number
        (folder / f"f{number}").write_bytes(content + b"\n")
        contents.add(content)
    listing = folder.parent / "files.txt"
    listing.write_bytes(b"".join(b"files/f%d\n" % number for number in range(count)))
    return listing, contents


def _check_file_run(
    result: subprocess.CompletedProcess[bytes],
    contents: set[bytes],
    scenario: ScenarioRecord,
) -> None:
    lines = result.stdout.splitlines()
    scenario.tried = len(contents)
    scenario.items_lost = len(contents - set(lines))
    scenario.duplicates = len(lines) - len(set(lines))
    stderr = result.stderr.decode("utf-8", "replace")
    assert b"Too many open files" not in result.stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert result.returncode == 0, stderr[-2000:]
    assert scenario.items_lost == 0
    assert scenario.duplicates == 0


def test_file_items_with_64_descriptors(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    count = campaign.size(2000, 10_000)
    listing, contents = _item_files(tmp_path / "files", count)
    journal = tmp_path / "run.db"
    scenario.faults_injected = 1

    result = _run_limited(
        ["run", "-q", "-j", "4", "--journal", journal, "cat", "::::", listing],
        tmp_path,
    )

    _check_file_run(result, contents, scenario)
    assert integrity_check(journal) == "ok"


def test_file_items_with_64_descriptors_many_jobs(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    count = campaign.size(500, 10_000)
    listing, contents = _item_files(tmp_path / "files", count)
    scenario.faults_injected = 1

    result = _run_limited(
        ["run", "-q", "-j", "32", "--no-journal", "cat", "::::", listing], tmp_path
    )

    _check_file_run(result, contents, scenario)


@functools.cache
def _huge_item(campaign: Campaign) -> bytes:
    """Return 10 MB of every byte value but NUL and newline, invalid UTF-8 included."""
    generator = campaign.random("huge-item")
    data = bytearray(generator.randbytes(HUGE_ITEM))
    return bytes(data.replace(b"\0", b"\1").replace(b"\n", b"\2"))


@pytest.mark.parametrize("source", ["file", "stdin", "stdin-null"])
def test_huge_item_reaches_python_task_exactly(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord, source: str
) -> None:
    item = _huge_item(campaign)
    saved = tmp_path / "saved"
    journal = tmp_path / "run.db"
    end = b"\0" if source == "stdin-null" else b"\n"
    arguments: list[Argument] = ["run", "-q", "--journal", journal]
    if source == "stdin-null":
        arguments.append("-0")
    arguments += ["--call", SAVE_TASK]
    stdin = item + end
    if source == "file":
        listing = tmp_path / "items"
        listing.write_bytes(item + end)
        arguments += ["::::", listing]
        stdin = b""
    scenario.faults_injected = 1

    result = run_cli(
        arguments,
        tmp_path,
        environment=cli_environment(RELIABILITY_OUTPUT=str(saved)),
        stdin=stdin,
    )
    scenario.tried = 1

    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert saved.read_bytes() == item
    stored = [row.item for row in iter_items(journal)]
    assert stored == [(item,)]


def test_huge_item_as_argument_fails_clearly(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    item = _huge_item(campaign)
    listing = tmp_path / "items"
    listing.write_bytes(item + b"\n")
    journal = tmp_path / "run.db"
    scenario.faults_injected = 1

    result = run_cli(
        ["run", "--journal", journal, "wc", "-c", "::::", listing], tmp_path
    )
    failed = run_cli(["status", "--failed", "-0", journal], tmp_path)
    scenario.tried = 1

    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr
    assert result.returncode == 1, stderr[-2000:]
    # The kernel caps one argument at 128 KiB (MAX_ARG_STRLEN on Linux).
    assert "Argument list too long" in stderr
    assert error_lines(result.stderr) == []
    assert failed.stdout == item + b"\0"


class _MemorySampler:
    """Samples a process's resident memory on a thread until it ends."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                if self.process.status() == psutil.STATUS_ZOMBIE:
                    return
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(RUN_LIMIT + 60)
@pytest.mark.parametrize(
    "journaled",
    # With a journal, a million items take minutes: the subset runs only
    # test_journal_memory_flat_over_group_sizes for the journal's memory.
    [
        pytest.param(False, id="no-journal"),
        *([pytest.param(True, id="journal")] if CAMPAIGN.full else []),
    ],
)
@pytest.mark.parametrize(
    ("backend", "task"),
    [
        ("async", "tests.reliability.tasks:ignore_async"),
        ("thread", "tests.reliability.tasks:ignore"),
    ],
)
def test_many_items_from_stdin_flat_memory(
    tmp_path: Path,
    campaign: Campaign,
    scenario: ScenarioRecord,
    backend: str,
    task: str,
    journaled: bool,
) -> None:
    count = campaign.size(100_000, 1_000_000)
    journal: list[Argument] = ["--journal", tmp_path / "run.db"]
    arguments: list[Argument] = [
        "run", *(journal if journaled else ["--no-journal"]),
        "--backend", backend, "--call", task,
    ]  # fmt: skip
    process = subprocess.Popen(
        cli_argv(arguments),
        cwd=tmp_path,
        env=cli_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdin is not None and process.stderr is not None
    sampler = _MemorySampler(process.pid)
    errors: list[bytes] = []
    stderr = process.stderr
    reader = threading.Thread(target=lambda: errors.append(stderr.read()))
    reader.start()
    peak_at_tenth = 0
    block = 1000
    try:
        for start in range(0, count, block):
            lines = (b"item %095d\n" % n for n in range(start, start + block))
            process.stdin.write(b"".join(lines))
            if not peak_at_tenth and start + block >= count // 10:
                peak_at_tenth = sampler.peak
        process.stdin.close()
        process.wait(timeout=RUN_LIMIT)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
        sampler.stop()
        reader.join()
        stderr.close()
    scenario.tried = count
    bound = peak_at_tenth * (1 + FLAT_SHARE) + FLAT_SLACK
    scenario.notes["peak_at_tenth_mb"] = round(peak_at_tenth / 2**20, 1)
    scenario.notes["peak_at_end_mb"] = round(sampler.peak / 2**20, 1)
    scenario.notes["bound_mb"] = round(bound / 2**20, 1)

    summary = errors[0].decode("utf-8", "replace")
    assert process.returncode == 0, summary[-2000:]
    assert f"{count} items: {count} succeeded" in summary.replace(",", ""), summary
    assert peak_at_tenth > 0
    assert sampler.peak <= bound


def test_journal_memory_flat_over_group_sizes(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    groups = campaign.size(60, 300)
    first_size = campaign.size(1000, 1700)

    result = subprocess.run(
        [
            sys.executable, "-m", "tests.reliability.journal_memory",
            str(tmp_path / "run.db"), str(groups), str(first_size),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        timeout=RUN_LIMIT,
        check=True,
    )  # fmt: skip
    figures = json.loads(result.stdout)
    scenario.tried = figures["items"]
    bound = figures["after_first"] * (1 + FLAT_SHARE) + FLAT_SLACK
    scenario.notes["after_first_group_mb"] = round(figures["after_first"] / 2**20, 1)
    scenario.notes["after_last_group_mb"] = round(figures["after_last"] / 2**20, 1)

    assert figures["after_last"] <= bound


@pytest.mark.timeout(CAMPAIGN.size(120, 900))
def test_deep_graph_chain(campaign: Campaign, scenario: ScenarioRecord) -> None:
    depth = campaign.size(10_000, 100_000)
    graph = batchtools.Graph()
    order: list[int] = []
    for number in range(depth):
        needs = [number - 1] if number else []
        graph.add(number, _recorder(order, number), needs=needs)

    assert len(graph.levels()) == depth
    report = graph.run(concurrency=2)
    scenario.tried = depth
    scenario.items_lost = depth - len(set(order))
    scenario.duplicates = len(order) - len(set(order))

    assert report.ok
    assert order == list(range(depth))


@pytest.mark.timeout(CAMPAIGN.size(120, 900))
def test_deep_graph_chain_skips_after_failure(
    campaign: Campaign, scenario: ScenarioRecord
) -> None:
    depth = campaign.size(10_000, 100_000)
    graph = batchtools.Graph()
    graph.add(0, _fail)
    for number in range(1, depth):
        graph.add(number, _fail, needs=[number - 1])
    scenario.faults_injected = 1

    report = graph.run(concurrency=2)
    scenario.tried = depth

    assert report.counts["failed"] == 1
    assert report.counts["skipped"] == depth - 1


def _recorder(order: list[int], number: int) -> Callable[[], None]:
    """Return a task that appends ``number`` to ``order``."""

    def record() -> None:
        order.append(number)

    return record


def _fail() -> None:
    raise ValueError("the first task of the chain fails")
