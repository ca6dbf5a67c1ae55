"""The audit log: record contents, flushing, crash safety, rotation and permissions.

Library tests run real engines with `AuditLog` as an observer; CLI tests run
the ``batchtools`` command as a real process, killed with SIGKILL where a
crash is the point. Nothing waits a fixed time: tests poll the file, or hold
events and locks, with generous bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import filelock
import pytest

import batchtools
from batchtools._exceptions import ConfigurationError
from batchtools.observe.audit import AuditLog
from tests.cli.support import (
    REPOSITORY,
    RUN_TIMEOUT,
    error_lines,
    kill_tree,
    run_cli,
    started_cli,
    wait_until,
)

_COMMON_FIELDS = ("event", "time", "epoch", "run_id", "user", "uid", "host", "pid")


def _records(path: Path) -> list[dict[str, Any]]:
    """Return the lines of ``path`` parsed as JSON; fail on a line that is not JSON."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of {path} is not JSON: {line!r}")
    return records


def _events(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [record for record in records if record["event"] == event]


def _rotated_files(path: Path) -> list[Path]:
    """Return PATH.N ... PATH.1 that exist, oldest first, then PATH."""
    numbered = sorted(
        (int(found.name.rsplit(".", 1)[1]), found)
        for found in path.parent.glob(path.name + ".*")
        if found.name.rsplit(".", 1)[1].isdigit()
    )
    return [found for _, found in reversed(numbered)] + [path]


def _fail_multiples_of_three(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(f"item {x} is a multiple of three")
    return x


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# -- record contents ------------------------------------------------------------


def test_normal_run_writes_start_and_finish(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    with AuditLog(path, task="tests.observe:task") as audit:
        report = batchtools.run(range(10), _fail_multiples_of_three, observers=[audit])

    records = _records(path)
    start, finish = records[0], records[-1]
    assert start["event"] == "run_started"
    assert finish["event"] == "run_finished"
    assert start["run_id"] == report.run_id
    assert finish["run_id"] == report.run_id
    assert start["task"] == "tests.observe:task"
    assert start["argv"] == sys.argv
    assert finish["status"] == "completed"
    assert finish["counts"] == {
        "succeeded": 6,
        "failed": 4,
        "skipped": 0,
        "cancelled": 0,
        "total": 10,
    }
    for record in (start, finish):
        for name in _COMMON_FIELDS:
            assert name in record, f"{record['event']} has no {name!r}"
        assert record["pid"] == os.getpid()
        assert record["uid"] == os.getuid()
        moment = datetime.fromisoformat(record["time"])
        assert moment.utcoffset() == timedelta(0)
        assert abs(moment.timestamp() - record["epoch"]) < 1e-3


def test_one_record_per_failed_item(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    calls: dict[int, int] = {}

    def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x == 1 and calls[x] < 2:
            raise OSError("transient")  # Succeeds on its retry.
        if x in (2, 5):
            raise KeyError(f"missing {x}")
        return x

    with AuditLog(path) as audit:
        report = batchtools.run(
            range(7), flaky, retry=2, observers=[audit], journal=tmp_path / "j.db"
        )

    failed = _events(_records(path), "item_failed")
    assert sorted(record["seq"] for record in failed) == [2, 5]
    by_key = {outcome.key: outcome for outcome in report.failed()}
    assert {record["key"] for record in failed} == set(by_key)
    for record in failed:
        assert record["attempts"] == 3
        assert record["error"]["type"] == "KeyError"
        assert record["error"]["message"] == f"'missing {record['seq']}'"
        assert record["run_id"] == report.run_id


def test_command_failure_records_exit_status(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    with AuditLog(path) as audit:
        batchtools.run(["0", "7"], ["sh", "-c", "exit $0", "{}"], observers=[audit])

    (failed,) = _events(_records(path), "item_failed")
    assert failed["seq"] == 1
    assert failed["error"]["exit_status"] == 7
    assert failed["error"]["message"] == "exit status 7"


def test_redact_applies_to_error_messages(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    def leak(x: int) -> None:
        raise PermissionError(f"token hunter2 rejected for item {x}")

    with AuditLog(path, redact=lambda text: text.replace("hunter2", "***")) as audit:
        batchtools.run(range(3), leak, observers=[audit])

    text = path.read_text()
    assert "hunter2" not in text
    failed = _events(_records(path), "item_failed")
    assert len(failed) == 3
    for record in failed:
        assert record["error"]["message"].startswith("token *** rejected")


def test_raising_redact_masks_text_and_keeps_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"

    def broken(text: str) -> str:
        raise RuntimeError("redaction bug")

    def leak(x: int) -> None:
        raise ValueError("secret-value")

    with (
        caplog.at_level(logging.ERROR, logger="batchtools.audit"),
        AuditLog(path, redact=broken) as audit,
    ):
        batchtools.run([1], leak, observers=[audit])

    assert "secret-value" not in path.read_text()
    (failed,) = _events(_records(path), "item_failed")
    assert failed["error"]["message"] == "<redaction failed>"
    assert "redaction function raised" in caplog.text


# -- flushing ---------------------------------------------------------------------


def test_records_written_on_interval_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    release = threading.Event()

    def task(x: int) -> None:
        if x == 99:
            # Holds the run open until the test has seen the other failures.
            assert release.wait(60), "the test never released the last item"
            return
        raise ValueError(f"bad {x}")

    def failures_on_disk() -> bool:
        if not path.exists():
            return False
        return len(_events(_records(path), "item_failed")) == 4

    audit = AuditLog(path, flush_interval="20ms")
    runner = threading.Thread(
        target=batchtools.run,
        args=([1, 2, 3, 4, 99], task),
        kwargs={"observers": [audit], "concurrency": 2},
    )
    runner.start()
    try:
        wait_until(failures_on_disk, "4 failure records in the audit log")
        assert not _events(_records(path), "run_finished")
    finally:
        release.set()
        runner.join(RUN_TIMEOUT)
        audit.close()

    assert not runner.is_alive()
    assert _records(path)[-1]["event"] == "run_finished"


def test_engine_not_blocked_by_held_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, flush_interval="10ms")
    # Another writer holds the lock, so no write can happen meanwhile.
    other_writer = filelock.UnixFileLock(f"{path}.lock", thread_local=False)

    def fail(x: int) -> None:
        raise ValueError(f"bad {x}")

    other_writer.acquire()
    try:
        with batchtools.stream(range(20), fail, observers=[audit]) as outcomes:
            iterator = iter(outcomes)
            seen = [next(iterator) for _ in range(19)]
            assert path.read_text() == ""
            other_writer.release()
            seen.extend(iterator)
    finally:
        if other_writer.is_locked:
            other_writer.release()
    audit.close()

    assert len(seen) == 20
    records = _records(path)
    assert records[0]["event"] == "run_started"
    assert len(_events(records, "item_failed")) == 20
    assert records[-1]["event"] == "run_finished"


def test_close_after_cancelled_run_writes_aborted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)

    async def main() -> None:
        started = asyncio.Event()

        async def hang(x: int) -> None:
            started.set()
            await asyncio.Event().wait()

        running = asyncio.create_task(
            batchtools.arun(range(3), hang, observers=[audit], concurrency=1)
        )
        await asyncio.wait_for(started.wait(), 60)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(main())
    audit.close()
    audit.close()

    records = _records(path)
    assert [record["event"] for record in records] == ["run_started", "run_finished"]
    assert records[-1]["status"] == "aborted"


def test_exit_handler_writes_unclosed_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # Cancels a run and exits without closing the log; the flush interval is
    # far longer than the process lives.
    script = (
        "import asyncio, sys, batchtools\n"
        "from batchtools.observe.audit import AuditLog\n"
        "audit = AuditLog(sys.argv[1], flush_interval=3600)\n"
        "async def main():\n"
        "    started = asyncio.Event()\n"
        "    async def hang(x):\n"
        "        started.set()\n"
        "        await asyncio.Event().wait()\n"
        "    running = asyncio.create_task(batchtools.arun([1], hang, "
        "observers=[audit]))\n"
        "    await started.wait()\n"
        "    running.cancel()\n"
        "    await asyncio.gather(running, return_exceptions=True)\n"
        "asyncio.run(main())\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPOSITORY,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    records = _records(path)
    assert [record["event"] for record in records] == ["run_started", "run_finished"]
    assert records[-1]["status"] == "aborted"


def test_partial_last_line_stays_isolated(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"event": "run_started", "ti')  # A writer killed mid-write.
    path.chmod(0o600)

    with AuditLog(path) as audit:
        batchtools.run([0], _fail_multiples_of_three, observers=[audit])

    lines = path.read_text().splitlines()
    assert lines[0] == '{"event": "run_started", "ti'
    records = [json.loads(line) for line in lines[1:]]
    assert [record["event"] for record in records] == [
        "run_started",
        "item_failed",
        "run_finished",
    ]


# -- rotation ---------------------------------------------------------------------


def _flush_then_fail(audit: AuditLog) -> Any:
    """Return a task that writes the log before failing, so it rotates often."""

    def task(x: int) -> None:
        audit.flush()
        raise ValueError(f"bad {x}")

    return task


def test_rotation_keeps_every_record_across_files(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1500, backups=100)

    with audit:
        for _ in range(3):
            batchtools.run(range(10), _flush_then_fail(audit), observers=[audit])

    files = _rotated_files(path)
    assert len(files) > 3
    records = [record for found in files for record in _records(found)]
    assert len(_events(records, "run_started")) == 3
    assert len(_events(records, "item_failed")) == 30
    assert len(_events(records, "run_finished")) == 3
    epochs = [record["epoch"] for record in records]
    assert epochs == sorted(epochs), "rotated files are out of order"
    for found in files:
        assert stat.S_IMODE(found.stat().st_mode) == 0o600, found


def test_rotation_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1000, backups=2)

    with audit:
        batchtools.run(range(30), _flush_then_fail(audit), observers=[audit])

    assert _rotated_files(path) == [
        tmp_path / "audit.jsonl.2",
        tmp_path / "audit.jsonl.1",
        path,
    ]
    assert _records(path)[-1]["event"] == "run_finished"


def test_two_processes_share_rotating_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = (
        "import sys, batchtools\n"
        "from batchtools.observe.audit import AuditLog\n"
        "audit = AuditLog(sys.argv[1], max_bytes=3000, backups=1000)\n"
        "def fail(x):\n"
        "    audit.flush()\n"
        "    raise ValueError(x)\n"
        "with audit:\n"
        "    batchtools.run(range(150), fail, observers=[audit])\n"
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            cwd=REPOSITORY,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=RUN_TIMEOUT)
        assert writer.returncode == 0, stderr.decode(errors="replace")

    records = [record for found in _rotated_files(path) for record in _records(found)]
    for pid in {writer.pid for writer in writers}:
        own = [record for record in records if record["pid"] == pid]
        assert len(_events(own, "item_failed")) == 150, f"records of {pid} lost"
        assert len(_events(own, "run_started")) == 1
        assert len(_events(own, "run_finished")) == 1


# -- permissions and paths ----------------------------------------------------------


def test_file_mode_0600_with_umask_0(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "audit.jsonl"

    with AuditLog(path) as audit:
        batchtools.run([3], _fail_multiples_of_three, observers=[audit])

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{path}.lock").stat().st_mode) == 0o600


def test_existing_wide_mode_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="batchtools.audit"):
        AuditLog(path).close()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "changed it to 0600" in caplog.text


def test_other_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/sh\n")
    other.chmod(0o644)

    with pytest.raises(ConfigurationError, match="some other file"):
        AuditLog(other)

    assert other.read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert stat.S_IMODE(other.stat().st_mode) == 0o644


def test_hard_linked_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    os.link(path, tmp_path / "second-name")

    with pytest.raises(ConfigurationError, match="hard links"):
        AuditLog(path)


@pytest.mark.parametrize("target_exists", [True, False])
def test_symlink_path_rejected(tmp_path: Path, target_exists: bool) -> None:
    target = tmp_path / "elsewhere"
    if target_exists:
        target.write_text("kept\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)

    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        AuditLog(link)

    assert not target_exists or target.read_text() == "kept\n"
    assert target_exists or not target.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"flush_interval": 0}, "flush interval 0"),
        ({"flush_interval": "soon"}, "flush interval 'soon'"),
        ({"max_bytes": "lots"}, "audit log size 'lots'"),
        ({"backups": -1}, "backups=-1"),
    ],
)
def test_invalid_options_rejected(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AuditLog(tmp_path / "audit.jsonl", **arguments)


def test_missing_folder_or_folder_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist; create it first"):
        AuditLog(tmp_path / "missing" / "audit.jsonl")
    with pytest.raises(ConfigurationError, match="is not a regular file"):
        AuditLog(tmp_path)


# -- the command line -----------------------------------------------------------------


def test_cli_symlink_exits_2_before_running(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "audit.jsonl").symlink_to(target)
    marker = tmp_path / "ran"

    result = run_cli(
        ["run", "--audit", "audit.jsonl", "touch", str(marker), ":::", "x"],
        tmp_path,
    )

    assert result.returncode == 2, result.stderr.decode(errors="replace")
    (line,) = error_lines(result.stderr)
    assert "is a symbolic link" in line
    assert not marker.exists()
    assert target.read_text() == ""


def test_cli_audit_option_without_path_exits_2(tmp_path: Path) -> None:
    result = run_cli(["run", "--audit-flush", "1s", "true", ":::", "x"], tmp_path)

    assert result.returncode == 2
    assert error_lines(result.stderr) == ["Error: --audit-flush needs --audit PATH"]


def test_cli_kill_9_keeps_flushed_records(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    gate = tmp_path / "gate"
    journal = tmp_path / "run.db"
    # Items 1 to 5 fail at once; item "wait" runs until the gate exists, for
    # at most a minute.
    script = (
        '[ "$1" = wait ] || exit 1; n=0; '
        'while [ ! -e "$2" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done'
    )
    command = ["sh", "-c", script, "sh", "{}", str(gate)]
    options = ["-q", "-j", "2", "--journal", str(journal), "--audit", "audit.jsonl"]

    def failures_on_disk() -> bool:
        if not audit.exists():
            return False
        return len(_events(_records(audit), "item_failed")) == 5

    arguments = ["run", *options, "--audit-flush", "0.2s", *command]
    with started_cli(
        [*arguments, ":::", "1", "2", "wait", "3", "4", "5"], tmp_path
    ) as process:
        wait_until(failures_on_disk, "5 failure records", process=process)
        kill_tree(process.pid)
        process.wait(RUN_TIMEOUT)

    records = _records(audit)
    assert records[0]["event"] == "run_started"
    assert records[0]["task"] == ["sh", "-c", script, "sh", "{}", str(gate)]
    assert sorted(record["seq"] for record in _events(records, "item_failed")) == [
        0,
        1,
        3,
        4,
        5,
    ]
    assert not _events(records, "run_finished")

    # resume appends to the same file without --audit, and records no
    # failure again for the items that failed before the kill.
    gate.write_text("")
    resumed = run_cli(["resume", "-q", journal], tmp_path)
    assert resumed.returncode == 1, resumed.stderr.decode(errors="replace")
    after = _records(audit)[len(records) :]
    assert [record["event"] for record in after] == ["run_started", "run_finished"]
    assert after[0]["session"] == 2
    assert after[1]["counts"]["succeeded"] == 1
    assert after[1]["counts"]["failed"] == 5

    # retry with --audit writes to that file instead, for this session only.
    other = tmp_path / "other.jsonl"
    retried = run_cli(["retry", "-q", "--audit", other, journal], tmp_path)
    assert retried.returncode == 1, retried.stderr.decode(errors="replace")
    assert len(_records(audit)) == len(records) + 2
    assert len(_events(_records(other), "item_failed")) == 5


def test_cli_rotation_options(tmp_path: Path) -> None:
    items = [str(number) for number in range(10)]
    options = ["--audit", "audit.jsonl", "--audit-max-size", "2K"]
    arguments = ["run", "--no-journal", *options, "--audit-backups", "1"]

    # Each run writes more than 2 KiB, so the next one starts a new file.
    for _ in range(3):
        result = run_cli([*arguments, "false", ":::", *items], tmp_path)
        assert result.returncode == 1, result.stderr.decode(errors="replace")

    path = tmp_path / "audit.jsonl"
    assert _rotated_files(path) == [tmp_path / "audit.jsonl.1", path]
    records = _records(tmp_path / "audit.jsonl.1") + _records(path)
    assert records[-1]["event"] == "run_finished"
    assert len(_events(records, "item_failed")) >= 10
