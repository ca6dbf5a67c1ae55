"""Tests of FileLock with real files, threads, coroutines and processes.

Cross-process cases run child interpreters that take the lock and report
on their standard output. The test waits for those reports, never for a
fixed time. A wait that ends only when the code is broken has a generous
bound, so the test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchtools import ConfigurationError
from batchtools._exceptions import LockTimeoutError
from batchtools.fs.lock import FileLock

WAIT = 30.0
"""Seconds a test waits for something that happens at once unless the code is broken."""

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import filelock
    from batchtools.fs.lock import FileLock

    command, path = sys.argv[1], sys.argv[2]

    def inode_of(path):
        try:
            return os.stat(path).st_ino
        except FileNotFoundError:
            return -1

    def append(log, text):
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, text.encode())
        finally:
            os.close(descriptor)

    if command == "hold":
        # Hold the lock until standard input closes.
        with FileLock(path):
            print("held", flush=True)
            sys.stdin.read()
    elif command == "hold-without-record":
        # Hold the lock file the way another program using filelock would.
        with filelock.UnixFileLock(path, preserve_lock_file=True):
            print("held", flush=True)
            sys.stdin.read()
    elif command == "fork-and-exit":
        # Exit holding the lock, leaving a forked child that lives until
        # standard input closes.
        FileLock(path).acquire()
        if os.fork() == 0:
            sys.stdin.read()
            os._exit(0)
        print("forked", flush=True)
        os._exit(0)
    elif command == "contend":
        log, rounds = sys.argv[3], int(sys.argv[4])
        lock = FileLock(path, poll_interval=0.001)
        print("ready", flush=True)
        sys.stdin.readline()
        pid = os.getpid()
        for _ in range(rounds):
            with lock:
                append(log, f"enter {pid} {inode_of(path)}\\n")
                os.sched_yield()
                append(log, f"exit {pid} {inode_of(path)}\\n")
            time.sleep(0.0005)  # leaves room for the other processes
        print("done", flush=True)
    """
)


class Child:
    """A child interpreter running one command of CHILD."""

    def __init__(self, *args: str | Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def expect(self, line: str) -> None:
        """Wait until the child prints ``line``; fail if it prints something else."""
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == line

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        """Close the child's standard input and return its exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(WAIT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "work.lock"


def holding_child(children: list[Child], path: Path, command: str = "hold") -> Child:
    child = Child(command, path)
    children.append(child)
    child.expect("held")
    return child


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(WAIT)
    return process.pid


# -- processes -----------------------------------------------------------


def test_killed_holder_leaves_lock_free(children: list[Child], lock_path: Path) -> None:
    holder = holding_child(children, lock_path)
    lock = FileLock(lock_path, timeout=0)
    with pytest.raises(LockTimeoutError):
        lock.acquire()
    assert lock.holder_pid() == holder.pid

    holder.process.send_signal(signal.SIGKILL)
    assert holder.process.wait(WAIT) == -signal.SIGKILL

    # The kernel dropped the flock, and the sidecar names a dead process.
    assert lock_path.with_name("work.lock.pid").exists()
    assert lock.holder_pid() is None
    lock.acquire()
    assert lock.holder_pid() == os.getpid()
    lock.release()
    assert not lock_path.with_name("work.lock.pid").exists()


def test_forked_child_of_dead_holder_keeps_no_lock(
    children: list[Child], lock_path: Path
) -> None:
    child = Child("fork-and-exit", lock_path)
    children.append(child)
    child.expect("forked")
    assert child.process.wait(WAIT) == 0

    # The forked child still runs, with a copy of the holder's descriptors.
    lock = FileLock(lock_path, timeout=0)
    lock.acquire()
    lock.release()


def test_contending_processes_never_overlap(
    children: list[Child], lock_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "enter-exit.log"
    rounds = 150
    inode = None
    with FileLock(lock_path):
        inode = lock_path.stat().st_ino
        for _ in range(3):
            children.append(Child("contend", lock_path, log, str(rounds)))
        for child in children:
            child.expect("ready")
            child.send("go")
        # The children now wait for this holder to release.
    for child in children:
        child.expect("done")
        assert child.finish() == 0

    lines = log.read_text().splitlines()
    assert len(lines) == 3 * 2 * rounds
    for enter, exit in zip(lines[::2], lines[1::2], strict=True):
        enter_word, enter_pid, enter_inode = enter.split()
        exit_word, exit_pid, exit_inode = exit.split()
        assert (enter_word, exit_word) == ("enter", "exit"), (enter, exit)
        assert enter_pid == exit_pid, (enter, exit)
        assert int(enter_inode) == int(exit_inode) == inode
    pids = [line.split()[1] for line in lines[::2]]
    assert {pids.count(str(child.pid)) for child in children} == {rounds}
    assert lock_path.stat().st_ino == inode


def test_timeout_names_holder_pid(children: list[Child], lock_path: Path) -> None:
    holder = holding_child(children, lock_path)
    lock = FileLock(lock_path, timeout=0.2)

    with pytest.raises(LockTimeoutError) as caught:
        lock.acquire()

    error = caught.value
    assert error.holder_pid == holder.pid
    assert error.path == str(lock_path)
    assert error.timeout == 0.2
    assert isinstance(error, TimeoutError)
    assert str(error) == (
        f"lock file '{lock_path}' was not free within 0.2 s because process "
        f"{holder.pid} holds it; wait for it to finish or stop it, or give a "
        "longer timeout"
    )
    assert not lock.is_locked

    assert holder.finish() == 0
    with lock:
        assert lock.is_locked


def test_stale_sidecar_is_not_named_as_holder(
    children: list[Child], lock_path: Path
) -> None:
    # The holder records no pid, and the sidecar left behind names a
    # process that has exited.
    holding_child(children, lock_path, "hold-without-record")
    lock_path.with_name("work.lock.pid").write_text(f"{dead_pid()} 1.0\n")

    with pytest.raises(LockTimeoutError, match="because another process holds"):
        FileLock(lock_path, timeout=0).acquire()


def test_reused_pid_is_not_named_as_holder(lock_path: Path) -> None:
    # This process is alive, but it started long after the recorded time.
    lock_path.with_name("work.lock.pid").write_text(f"{os.getpid()} 1.0\n")
    assert FileLock(lock_path).holder_pid() is None


def test_garbled_sidecar_is_ignored(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    sidecar = lock_path.with_name("work.lock.pid")
    for text in ["", "not a pid\n", "12 34 56\n", "-1 1.0\n"]:
        sidecar.write_text(text)
        assert lock.holder_pid() is None, text


def test_async_wait_for_process_times_out(
    children: list[Child], lock_path: Path
) -> None:
    holder = holding_child(children, lock_path)
    lock = FileLock(lock_path, poll_interval=0.01)

    async def scenario() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        with pytest.raises(LockTimeoutError) as caught:
            await lock.acquire_async(timeout=0.3)
        ticker.cancel()
        assert caught.value.holder_pid == holder.pid
        return ticks

    # The loop kept running other tasks while the lock was polled.
    assert asyncio.run(scenario()) > 3


# -- symbolic links ------------------------------------------------------


def test_symlink_at_lock_path_is_rejected(lock_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock_path.symlink_to(target)

    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        FileLock(lock_path)
    assert target.read_text() == "keep me"


def test_symlink_planted_after_construction_is_rejected(
    lock_path: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock = FileLock(lock_path)
    with lock:
        pass
    lock_path.unlink()
    lock_path.symlink_to(target)

    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        lock.acquire()
    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        asyncio.run(lock.acquire_async())

    assert target.read_text() == "keep me"
    assert not lock.is_locked


def test_dangling_symlink_creates_no_file(lock_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted.txt"
    lock = FileLock(lock_path)
    lock_path.symlink_to(target)

    with pytest.raises(ConfigurationError, match="it is a symbolic link"):
        lock.acquire()
    assert not target.exists()


def test_symlink_at_sidecar_is_replaced(lock_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    sidecar = lock_path.with_name("work.lock.pid")
    sidecar.symlink_to(target)
    lock = FileLock(lock_path)

    assert lock.holder_pid() is None  # the link is not read
    with lock:
        assert not sidecar.is_symlink()
        assert lock.holder_pid() == os.getpid()
    assert target.read_text() == "keep me"


def test_hard_link_at_lock_path_is_rejected(lock_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.link(target, lock_path)

    with pytest.raises(ConfigurationError, match="it has 1 other hard links"):
        FileLock(lock_path)


# -- threads and coroutines ----------------------------------------------


def test_threads_sharing_one_lock_exclude_each_other(lock_path: Path) -> None:
    lock = FileLock(lock_path, poll_interval=0.001)
    inside = 0
    max_inside = 0
    counter_mutex = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        nonlocal inside, max_inside
        start.wait(WAIT)
        for _ in range(50):
            with lock:
                with counter_mutex:
                    inside += 1
                    max_inside = max(max_inside, inside)
                os.sched_yield()
                with counter_mutex:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)

    assert max_inside == 1
    assert not lock.is_locked


def test_two_objects_on_one_path_exclude_each_other(lock_path: Path) -> None:
    first = FileLock(lock_path)
    second = FileLock(lock_path, timeout=0)
    with (
        first,
        pytest.raises(LockTimeoutError, match=f"process {os.getpid()} holds"),
    ):
        second.acquire()
    with second:
        assert second.is_locked


def test_release_from_another_thread(lock_path: Path) -> None:
    lock = FileLock(lock_path, timeout=0)
    lock.acquire()
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    releaser.join(WAIT)

    assert not lock.is_locked
    lock.acquire()
    lock.release()


def test_release_without_hold_raises(lock_path: Path) -> None:
    with pytest.raises(RuntimeError, match="which this object does not hold"):
        FileLock(lock_path).release()


def test_coroutine_waits_without_blocking_loop(lock_path: Path) -> None:
    lock = FileLock(lock_path, poll_interval=0.001)

    async def scenario() -> list[str]:
        events: list[str] = []
        held = asyncio.Event()
        other_ran = asyncio.Event()

        async def first() -> None:
            async with lock:
                held.set()
                await other_ran.wait()
                events.append("first releases")

        async def second() -> None:
            await held.wait()
            async with lock:
                events.append("second holds")

        async def other() -> None:
            await held.wait()
            events.append("other runs")
            other_ran.set()

        async with asyncio.timeout(WAIT):
            await asyncio.gather(first(), second(), other())
        return events

    assert asyncio.run(scenario()) == ["other runs", "first releases", "second holds"]
    assert not lock.is_locked


def test_cancelled_waiter_leaves_lock_free(lock_path: Path) -> None:
    lock = FileLock(lock_path, poll_interval=0.001)

    async def scenario() -> None:
        await lock.acquire_async()
        waiter = asyncio.create_task(lock.acquire_async())
        for _ in range(3):
            await asyncio.sleep(0)  # lets the waiter try and start its pause
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        lock.release()
        await lock.acquire_async(timeout=0)
        lock.release()

    asyncio.run(scenario())
    assert not lock.is_locked


def test_sync_acquire_in_event_loop_raises(lock_path: Path) -> None:
    lock = FileLock(lock_path)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="would block the running event loop"):
            lock.acquire()
        lock.acquire(timeout=0)  # a single try never blocks
        lock.release()

    asyncio.run(scenario())


def test_forked_child_does_not_hold_parent_lock(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    with lock:
        pid = os.fork()
        if pid == 0:  # the child reports through its exit status only
            status = 0
            try:
                if lock.is_locked:
                    status = 1
                try:
                    lock.release()
                    status = 2
                except RuntimeError:
                    pass
                try:
                    lock.acquire(timeout=0)
                    status = 3
                except LockTimeoutError:
                    pass
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0
        assert lock.is_locked
    assert not lock.is_locked


# -- options, pickling and files -----------------------------------------


def test_lock_pickles_released(lock_path: Path) -> None:
    lock = FileLock(lock_path, timeout="2s", poll_interval=0.01)
    with lock:
        copy = pickle.loads(pickle.dumps(lock))
        assert not copy.is_locked
        with pytest.raises(LockTimeoutError):
            copy.acquire(timeout=0)
    assert copy.path == lock.path
    assert copy.timeout == 2.0
    assert copy.poll_interval == 0.01


def test_timeout_error_pickles(lock_path: Path) -> None:
    error = LockTimeoutError(str(lock_path), 1.5, 4242)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.timeout, copy.holder_pid) == (str(lock_path), 1.5, 4242)
    assert str(copy) == str(error)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"poll_interval": 0}, "poll_interval"),
    ],
)
def test_invalid_options_are_rejected(
    lock_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FileLock(lock_path, **options)  # type: ignore[arg-type]  # invalid on purpose


def test_folder_as_lock_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="it is a directory"):
        FileLock(tmp_path)


def test_missing_folder_is_created_private(tmp_path: Path) -> None:
    lock_path = tmp_path / "new" / "folder" / "work.lock"
    with FileLock(lock_path):
        pass

    assert stat.S_IMODE(lock_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(lock_path.stat().st_mode) == 0o600
    assert sorted(os.listdir(lock_path.parent)) == ["work.lock"]


def test_lock_file_stays_after_release(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    with lock:
        inode = lock_path.stat().st_ino
    assert lock_path.stat().st_ino == inode
    with lock:
        assert lock_path.stat().st_ino == inode
