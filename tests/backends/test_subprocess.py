"""Tests of SubprocessBackend with real commands, driven directly with asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from batchtools._exceptions import (
    AttemptTimeoutError,
    CommandFailedError,
    RunAbortedError,
    TemplateError,
)
from batchtools.backends._base import Call, Context
from batchtools.backends._command import CommandTemplate
from batchtools.backends._subprocess import (
    MEMORY_LIMIT,
    STDERR_TAIL_SIZE,
    CapturedOutput,
    CommandResult,
    SubprocessBackend,
)
from tests.backends.test_command import HOSTILE_ITEMS

T = TypeVar("T")

# Generous bound for "returns promptly": far below the 60 s the test
# commands would otherwise run.
PROMPT = 20.0

PRINT_WORDS = ["printf", "%s\\0"]  # prints each argument NUL-terminated


def make_call(payload: Any, seq: int = 0) -> Call:
    context = Context("run", f"key{seq}", 1, seq, f"run:key{seq}")
    return Call(payload, context)


def backend_for(
    template: str | Sequence[str | bytes],
    concurrency: int = 1,
    *,
    shell: bool = False,
    **options: Any,
) -> SubprocessBackend:
    return SubprocessBackend(
        CommandTemplate.parse(template, shell=shell), concurrency, **options
    )


async def execute_one(backend: SubprocessBackend, payload: Any) -> CommandResult:
    result = await backend.execute(make_call(payload))
    assert isinstance(result, CommandResult)
    return result


def run(
    backend: SubprocessBackend,
    scenario: Callable[[SubprocessBackend], Awaitable[T]],
) -> T:
    """Run ``scenario`` on a fresh loop, then close the backend, killing leftovers."""

    async def main() -> T:
        await backend.start()
        try:
            return await scenario(backend)
        finally:
            await backend.aclose(cancel=True)

    return asyncio.run(main())


def run_one(backend: SubprocessBackend, payload: Any) -> CommandResult:
    return run(backend, lambda backend: execute_one(backend, payload))


def words(output: bytes) -> list[bytes]:
    assert output.endswith(b"\0") or output == b""
    return output.split(b"\0")[:-1]


def is_alive(process: psutil.Process) -> bool:
    # The test machine's init may not reap orphans, so a zombie counts as gone.
    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def our_descendants() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if is_alive(p)]


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + PROMPT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {description}")
        await asyncio.sleep(0.01)


def kill_survivors(tree: list[psutil.Process]) -> list[int]:
    """Kill the processes of ``tree`` still alive, so a failing test leaks none.

    Returns:
        The pids of the processes that were still alive.
    """
    survivors = [process for process in tree if is_alive(process)]
    for process in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [process.pid for process in survivors]


def count_sleeps() -> int:
    return sum(1 for p in our_descendants() if p.name() == "sleep")


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


# Arguments ----------------------------------------------------------------


def test_hostile_items_reach_program_intact() -> None:
    async def scenario(backend: SubprocessBackend) -> list[list[bytes]]:
        return [
            words((await execute_one(backend, item)).stdout) for item in HOSTILE_ITEMS
        ]

    outputs = run(backend_for([*PRINT_WORDS, "{}"]), scenario)
    for item, output in zip(HOSTILE_ITEMS, outputs, strict=True):
        assert output == [item], item


def test_hostile_items_appended_intact() -> None:
    async def scenario(backend: SubprocessBackend) -> list[list[bytes]]:
        return [
            words((await execute_one(backend, (item, item))).stdout)
            for item in HOSTILE_ITEMS
        ]

    outputs = run(backend_for(PRINT_WORDS), scenario)
    for item, output in zip(HOSTILE_ITEMS, outputs, strict=True):
        assert output == [item, item], item


def test_shell_hostile_items_intact(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"")
    script = f"cd '{tmp_path}' && printf '%s\\0' {{}} pre{{}}post"

    async def scenario(backend: SubprocessBackend) -> list[list[bytes]]:
        return [
            words((await execute_one(backend, item)).stdout) for item in HOSTILE_ITEMS
        ]

    outputs = run(backend_for(script, shell=True), scenario)
    for item, output in zip(HOSTILE_ITEMS, outputs, strict=True):
        assert output == [item, b"pre" + item + b"post"], item
    assert not (tmp_path / "pwned").exists()


def test_batch_whole_word_expands() -> None:
    backend = backend_for([*PRINT_WORDS, "{}", "{2}"], batched=True)
    result = run_one(backend, [b"a b", b"\xb2\x97", b"-n"])
    assert words(result.stdout) == [b"a b", b"\xb2\x97", b"-n", b"\xb2\x97"]


def test_batch_short_last_batch() -> None:
    backend = backend_for([*PRINT_WORDS, "{1}", "{2}"], batched=True)
    result = run_one(backend, ["only"])
    assert words(result.stdout) == [b"only", b""]


def test_sequence_number_from_context() -> None:
    backend = backend_for([*PRINT_WORDS, "{#}"])

    async def scenario(backend: SubprocessBackend) -> bytes:
        result = await backend.execute(make_call("x", seq=6))
        assert isinstance(result, CommandResult)
        return result.stdout

    assert words(run(backend, scenario)) == [b"7"]


def test_template_error_releases_slot() -> None:
    async def scenario(backend: SubprocessBackend) -> CommandResult:
        with pytest.raises(TemplateError, match="column"):
            await execute_one(backend, None)
        return await execute_one(backend, "fine")

    result = run(backend_for([*PRINT_WORDS, "{}"]), scenario)
    assert words(result.stdout) == [b"fine"]


# Environment of the child ---------------------------------------------------


def test_stdin_is_devnull() -> None:
    result = run_one(backend_for(["readlink", "/proc/self/fd/0"]), ())
    assert result.stdout == b"/dev/null\n"


def test_cat_sees_empty_stdin() -> None:
    assert run_one(backend_for(["cat"]), ()).stdout == b""


def test_child_has_own_process_group() -> None:
    script = "echo $$; cut -d' ' -f5 /proc/$$/stat"
    result = run_one(backend_for(["sh", "-c", script]), ())
    pid, process_group = result.stdout.split()
    assert pid == process_group
    assert int(process_group) != os.getpgrp()


def test_sigpipe_default_in_child() -> None:
    result = run_one(backend_for(["sh", "-c", "yes | head -c 4"]), ())
    assert result.stdout == b"y\ny\n"
    assert result.stderr == b""


def test_env_replaces_environment() -> None:
    backend = backend_for(
        ["sh", "-c", 'printf %s "$BATCHTOOLS_PROBE:$HOME"'],
        env={"BATCHTOOLS_PROBE": "value", "PATH": os.environ["PATH"]},
    )
    assert run_one(backend, ()).stdout == b"value:"


def test_capture_off_writes_to_our_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    result = run_one(backend_for(["echo", "not-captured"], capture=False), ())
    assert result.stdout == b""
    assert "not-captured" in capfd.readouterr().out


# Output ---------------------------------------------------------------------


def test_output_bytes_kept_exactly() -> None:
    script = "printf '\\262\\227'; printf 'later\\n'; printf '\\262' >&2"
    result = run_one(backend_for(["sh", "-c", script]), ())
    assert result.stdout == b"\xb2\x97later\n"
    assert result.stderr == b"\xb2"


def test_later_output_after_invalid_bytes_kept() -> None:
    code = (
        "import sys; out = sys.stdout.buffer; out.write(b'\\xb2\\x97'); out.flush(); "
        "out.write(b'x' * 300000 + b'end')"
    )
    result = run_one(backend_for([sys.executable, "-c", code]), ())
    assert result.stdout == b"\xb2\x97" + b"x" * 300000 + b"end"


def test_large_output_spills_and_reads_back(tmp_path: Path) -> None:
    data = os.urandom(20_000_000)
    source = tmp_path / "data"
    source.write_bytes(data)
    result = run_one(backend_for(["cat", str(source)]), ())
    spill = result.captured_stdout.path
    assert spill is not None
    assert result.captured_stdout.size == len(data)
    assert result.read_stdout() == data
    copy = io.BytesIO()
    result.write_stdout_to(copy)
    assert copy.getvalue() == data
    assert result.captured_stdout.tail(5) == data[-5:]
    result.close()
    assert not os.path.exists(spill)


def test_small_output_stays_in_memory() -> None:
    result = run_one(backend_for(["echo", "small"]), ())
    assert result.captured_stdout.path is None
    copy = io.BytesIO()
    result.write_stdout_to(copy)
    assert copy.getvalue() == b"small\n"


def test_large_stderr_tail_on_failure(tmp_path: Path) -> None:
    data = os.urandom(MEMORY_LIMIT + 12345)
    source = tmp_path / "data"
    source.write_bytes(data)
    backend = backend_for(["sh", "-c", 'cat "$0" >&2; exit 4', str(source)])

    async def scenario(backend: SubprocessBackend) -> CommandFailedError:
        with pytest.raises(CommandFailedError) as caught:
            await backend.execute(make_call(()))
        return caught.value

    error = run(backend, scenario)
    assert error.exit_status == 4
    assert error.stderr_tail == data[-STDERR_TAIL_SIZE:]
    assert isinstance(error.result, CommandResult)
    assert error.result.captured_stderr.path is not None
    assert error.result.read_stderr() == data
    error.result.close()


def test_captured_output_spills_past_limit() -> None:
    output = CapturedOutput(memory_limit=10)
    output.append(b"12345")
    assert output.path is None
    output.append(b"678901")
    assert output.path is not None
    output.append(b"\xb2")
    assert output.read() == b"12345678901\xb2"
    output.finish()
    assert output.tail(3) == b"01\xb2"
    assert output.size == 12
    path = output.path
    output.close()
    assert not os.path.exists(path)


def test_captured_output_append_after_finish() -> None:
    output = CapturedOutput()
    output.append(b"a")
    output.finish()
    with pytest.raises(ValueError, match="finished"):
        output.append(b"b")
    assert output.read() == b"a"


def test_captured_output_read_after_close() -> None:
    output = CapturedOutput(memory_limit=1)
    output.append(b"spilled")
    output.finish()
    output.close()
    with pytest.raises(ValueError, match="closed"):
        output.read()


def test_captured_output_counts_lost_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temporary directory that does not exist makes the spill fail.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    output = CapturedOutput(memory_limit=4)
    output.append(b"abc")
    output.append(b"defgh")
    output.finish()
    assert output.lost_bytes == 5
    assert isinstance(output.error, FileNotFoundError)
    assert output.path is None
    assert output.read() == b"abc"
    assert output.size == 3


def test_captured_output_removed_on_collection() -> None:
    output = CapturedOutput(memory_limit=1)
    output.append(b"spilled")
    output.finish()
    path = output.path
    assert path is not None
    del output
    assert not os.path.exists(path)


def test_result_pickles_with_output() -> None:
    result = run_one(backend_for(["sh", "-c", "echo out; echo err >&2"]), ())
    copy = pickle.loads(pickle.dumps(result))
    assert copy.stdout == b"out\n"
    assert copy.stderr == b"err\n"
    assert copy.exit_status == 0
    assert copy.argv == result.argv


def test_background_holder_does_not_block_exit() -> None:
    # The background sleep keeps stdout open, and the result must not wait.
    backend = backend_for(["sh", "-c", "echo hi; sleep 30 & echo $!"])
    started = time.monotonic()
    result = run_one(backend, ())
    elapsed = time.monotonic() - started
    first, pid = result.stdout.split()
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)
    assert first == b"hi"
    assert elapsed < PROMPT


def test_background_writer_does_not_block_exit() -> None:
    # A background loop writes forever. The pipes are closed about one second
    # after the command exits, and the writer then dies of SIGPIPE.
    writer = "sh -c 'echo $$; while :; do echo x; sleep 0.01; done' &"
    backend = backend_for(["sh", "-c", writer])
    started = time.monotonic()
    result = run_one(backend, ())
    elapsed = time.monotonic() - started
    pid = int(result.stdout.split(b"\n", 1)[0])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    assert elapsed < PROMPT
    assert result.stdout.count(b"x\n") >= 1


# Exit status ----------------------------------------------------------------


def failure_of(backend: SubprocessBackend, payload: Any = ()) -> CommandFailedError:
    async def scenario(backend: SubprocessBackend) -> CommandFailedError:
        with pytest.raises(CommandFailedError) as caught:
            await backend.execute(make_call(payload))
        return caught.value

    return run(backend, scenario)


def test_nonzero_exit_raises() -> None:
    error = failure_of(backend_for(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert error.exit_status == 3
    assert str(error) == "exit status 3"
    assert error.stderr_tail == b"err\n"
    assert isinstance(error.result, CommandResult)
    assert error.result.exit_status == 3
    assert error.result.stdout == b"out\n"


@pytest.mark.parametrize(("name", "number"), [("TERM", 15), ("KILL", 9)])
def test_signal_reported_negative(name: str, number: int) -> None:
    error = failure_of(backend_for(["sh", "-c", f"kill -{name} $$"]))
    assert error.exit_status == -number
    assert str(error) == f"killed by SIG{name}"


def test_missing_program_exit_127() -> None:
    error = failure_of(backend_for(["batchtools-no-such-program", "{}"]), "x")
    assert error.exit_status == 127
    assert error.stderr_tail == b"batchtools-no-such-program: command not found\n"
    assert isinstance(error.result, CommandResult)
    assert error.result.exit_status == 127


def test_missing_path_exit_127(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    error = failure_of(backend_for([missing]))
    assert error.exit_status == 127
    assert error.stderr_tail == f"{missing}: No such file or directory\n".encode()


def test_not_executable_exit_126(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_text("echo hi\n")
    program.chmod(0o644)
    error = failure_of(backend_for([str(program)]))
    assert error.exit_status == 126
    assert b"Permission denied" in error.stderr_tail


def test_script_without_shebang_runs_with_sh(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_text('printf "%s\\0" "$@"\n')
    program.chmod(0o755)
    result = run_one(backend_for([str(program), "{}"]), "a b")
    assert words(result.stdout) == [b"a b"]


def test_program_found_on_env_path(tmp_path: Path) -> None:
    program = tmp_path / "batchtools-probe"
    program.write_text("#!/bin/sh\necho found\n")
    program.chmod(0o755)
    backend = backend_for(["batchtools-probe"], env={"PATH": str(tmp_path)})
    assert run_one(backend, ()).stdout == b"found\n"


# Stopping -------------------------------------------------------------------


def stop_and_check(
    backend: SubprocessBackend,
    ready: Callable[[], bool],
    description: str,
) -> float:
    """Start a command, cancel it once ``ready``, and return the seconds it took.

    Checks that execute raised the cancel error and that no process of the
    command's tree is left alive.
    """

    async def scenario(backend: SubprocessBackend) -> float:
        call = make_call(())
        task = asyncio.create_task(backend.execute(call))
        await wait_until(ready, description)
        tree = our_descendants()
        started = time.monotonic()
        backend.cancel(call, AttemptTimeoutError(1.0))
        with pytest.raises(AttemptTimeoutError):
            await task
        elapsed = time.monotonic() - started
        assert kill_survivors(tree) == []
        return elapsed

    return run(backend, scenario)


def test_cancel_background_and_foreground_sleep() -> None:
    backend = backend_for(["sh", "-c", "sleep 60 & sleep 60"], kill_grace=5.0)
    elapsed = stop_and_check(backend, lambda: count_sleeps() == 2, "both sleeps run")
    assert elapsed < 5.0


def test_cancel_shell_waiting_on_background() -> None:
    backend = backend_for(["sh", "-c", "sleep 30 & wait"], kill_grace=5.0)
    elapsed = stop_and_check(backend, lambda: count_sleeps() == 1, "the sleep runs")
    assert elapsed < 5.0


def in_other_session() -> bool:
    session = os.getsid(0)
    return any(
        p.name() == "sleep" and os.getsid(p.pid) != session for p in our_descendants()
    )


def test_cancel_kills_setsid_grandchild() -> None:
    backend = backend_for(["sh", "-c", "setsid sleep 60 & wait"], kill_grace=5.0)
    elapsed = stop_and_check(backend, in_other_session, "the setsid sleep runs")
    assert elapsed < 5.0


def test_cancel_kills_grandchild_ignoring_sigterm() -> None:
    # The grandchild ignores SIGTERM, left the process group and keeps the
    # output pipes open, so only SIGKILL after the grace period ends it.
    script = "setsid sh -c 'trap \"\" TERM; exec sleep 60' & wait"
    backend = backend_for(["sh", "-c", script], kill_grace=0.5)
    elapsed = stop_and_check(backend, in_other_session, "the setsid sleep runs")
    assert elapsed < PROMPT


def test_cancel_child_ignoring_sigterm() -> None:
    script = "trap '' TERM; echo ready; sleep 60"
    backend = backend_for(["sh", "-c", script], kill_grace=0.5)
    elapsed = stop_and_check(backend, lambda: count_sleeps() == 1, "the sleep runs")
    assert elapsed < PROMPT


def test_cancel_with_pidfd_fallback() -> None:
    backend = backend_for(["sh", "-c", "sleep 60 & sleep 60"], kill_grace=5.0)
    backend._use_pidfd = False
    elapsed = stop_and_check(backend, lambda: count_sleeps() == 2, "both sleeps run")
    assert elapsed < 5.0


def test_exit_status_with_pidfd_fallback() -> None:
    backend = backend_for(["sh", "-c", "echo done; exit 5"])
    backend._use_pidfd = False
    error = failure_of(backend)
    assert error.exit_status == 5
    assert isinstance(error.result, CommandResult)
    assert error.result.stdout == b"done\n"


def test_cancel_before_start_raises() -> None:
    async def scenario(backend: SubprocessBackend) -> None:
        call = make_call(())
        backend.cancel(call, AttemptTimeoutError(2.0))
        with pytest.raises(AttemptTimeoutError):
            await backend.execute(call)

    run(backend_for(["true"]), scenario)


def test_cancel_while_waiting_for_slot() -> None:
    async def scenario(backend: SubprocessBackend) -> None:
        running = make_call(())
        waiting = make_call(())
        first = asyncio.create_task(backend.execute(running))
        await wait_until(lambda: count_sleeps() == 1, "the first command runs")
        second = asyncio.create_task(backend.execute(waiting))
        await asyncio.sleep(0)
        backend.cancel(waiting, AttemptTimeoutError(3.0))
        with pytest.raises(AttemptTimeoutError):
            await second
        assert not first.done()
        backend.cancel(running, AttemptTimeoutError(4.0))
        with pytest.raises(AttemptTimeoutError):
            await first

    run(backend_for(["sleep", "60"]), scenario)


def test_stop_queued_fails_waiting_calls() -> None:
    async def scenario(backend: SubprocessBackend) -> None:
        running = make_call(())
        first = asyncio.create_task(backend.execute(running))
        await wait_until(lambda: count_sleeps() == 1, "the first command runs")
        second = asyncio.create_task(backend.execute(make_call(())))
        await asyncio.sleep(0)
        backend.stop_queued(RunAbortedError("stopped"))
        with pytest.raises(RunAbortedError, match="stopped"):
            await second
        assert not first.done()
        backend.cancel(running, AttemptTimeoutError(4.0))
        with pytest.raises(AttemptTimeoutError):
            await first

    run(backend_for(["sleep", "60"]), scenario)


def test_task_cancellation_stops_tree() -> None:
    async def scenario(backend: SubprocessBackend) -> list[int]:
        task = asyncio.create_task(backend.execute(make_call(())))
        await wait_until(lambda: count_sleeps() == 2, "both sleeps run")
        tree = our_descendants()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await backend.aclose(cancel=False)
        return kill_survivors(tree)

    backend = backend_for(["sh", "-c", "sleep 60 & sleep 60"])
    assert run(backend, scenario) == []


# Slots and closing ----------------------------------------------------------


def test_slots_never_shared(tmp_path: Path) -> None:
    # mkdir fails if another running command has created the same slot directory.
    script = 'mkdir "$0/slot-$1" || exit 9; sleep 0.01; rmdir "$0/slot-$1"'
    backend = backend_for(["sh", "-c", script, str(tmp_path), "{%}"], 2)

    async def scenario(backend: SubprocessBackend) -> list[bytes]:
        payloads = iter(range(40))
        slots: list[bytes] = []

        async def worker() -> None:
            for seq in payloads:
                result = await backend.execute(make_call(seq, seq))
                assert isinstance(result, CommandResult)
                slots.append(result.argv[-1])

        await asyncio.gather(*(worker() for _ in range(4)))
        return slots

    slots = run(backend, scenario)
    assert len(slots) == 40
    assert set(slots) <= {b"1", b"2"}


def test_lowest_free_slot_first() -> None:
    backend = backend_for([*PRINT_WORDS, "{%}"], 3)

    async def scenario(backend: SubprocessBackend) -> list[bytes]:
        return [(await execute_one(backend, ())).stdout for _ in range(3)]

    assert run(backend, scenario) == [b"1\0", b"1\0", b"1\0"]


def test_aclose_cancel_leaves_nothing() -> None:
    async def scenario() -> tuple[set[int], set[int], list[int]]:
        baseline = open_fds()
        backend = backend_for(["sh", "-c", "sleep 60 & sleep 60"], 2)
        await backend.start()
        tasks = [
            asyncio.create_task(backend.execute(make_call((), seq))) for seq in (0, 1)
        ]
        await wait_until(lambda: count_sleeps() == 4, "four sleeps run")
        tree = our_descendants()
        await backend.aclose(cancel=True)
        for task in tasks:
            with pytest.raises(RunAbortedError):
                await task
        return baseline, open_fds(), kill_survivors(tree)

    baseline, after, survivors = asyncio.run(scenario())
    assert survivors == []
    assert psutil.Process().children() == []
    assert after == baseline


def test_aclose_waits_for_running(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    script = 'while [ ! -e "$0" ]; do sleep 0.01; done; echo finished'

    async def scenario() -> tuple[bytes, set[int], set[int]]:
        baseline = open_fds()
        backend = backend_for(["sh", "-c", script, str(flag)])
        await backend.start()
        task = asyncio.create_task(backend.execute(make_call(())))
        await wait_until(lambda: bool(our_descendants()), "the command runs")
        closing = asyncio.create_task(backend.aclose(cancel=False))
        await asyncio.sleep(0.05)
        assert not closing.done()
        flag.write_bytes(b"")
        await closing
        result = await task
        assert isinstance(result, CommandResult)
        return result.stdout, baseline, open_fds()

    stdout, baseline, after = asyncio.run(scenario())
    assert stdout == b"finished\n"
    assert after == baseline
    assert psutil.Process().children() == []


def test_execute_after_aclose_rejected() -> None:
    async def scenario() -> None:
        backend = backend_for(["true"])
        await backend.aclose(cancel=False)
        with pytest.raises(RunAbortedError, match="closed"):
            await backend.execute(make_call(()))

    asyncio.run(scenario())


def test_many_commands_leave_no_fds() -> None:
    async def scenario() -> tuple[set[int], set[int]]:
        baseline = open_fds()
        backend = backend_for(["sh", "-c", "echo $0; echo err >&2"], 2)
        await backend.start()

        async def one(seq: int) -> None:
            result = await backend.execute(make_call(seq, seq))
            assert isinstance(result, CommandResult)
            assert result.stdout == f"{seq}\n".encode()

        await asyncio.gather(*(one(seq) for seq in range(50)))
        await backend.aclose(cancel=False)
        return baseline, open_fds()

    baseline, after = asyncio.run(scenario())
    assert after == baseline
    assert psutil.Process().children() == []


def test_constructor_rejects_bad_values() -> None:
    template = CommandTemplate.parse("true")
    with pytest.raises(ValueError, match="concurrency"):
        SubprocessBackend(template, 0)
    with pytest.raises(ValueError, match="kill_grace"):
        SubprocessBackend(template, 1, kill_grace=-1)
