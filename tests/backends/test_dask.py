"""Tests of the dask backend on real Dask clusters with worker processes.

Most tests share one local cluster of two worker processes, started once for
this module and listening on 127.0.0.1 only. Its scope ends with the module
rather than the session, because later tests check that a run leaves no
child processes behind. Tests of a lost scheduler start a scheduler of
their own in a separate process and kill it. Waits poll a condition up to a
deadline; no test sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client

import batchtools
from batchtools import (
    AttemptTimeoutError,
    CommandFailedError,
    ConfigurationError,
    DaskCluster,
    DaskWorkerLostError,
    RunAbortedError,
)
from batchtools.backends._dask import start_local_cluster
from batchtools.engine._engine import Engine
from batchtools.engine._outcome import Outcome, Report
from batchtools.journal import count_states
from tests.backends import dask_tasks
from tests.cli.support import (
    REPOSITORY,
    RUN_TIMEOUT,
    cli_environment,
    error_lines,
    run_cli,
    started_cli,
    wait_until,
)

TASKS = "tests.backends.dask_tasks"


@dataclass(frozen=True)
class SharedCluster:
    """The module's local cluster and a client of the test's own."""

    address: str
    client: Client

    def options(self, **extra: Any) -> DaskCluster:
        """Return the backend options that run on this cluster."""
        return DaskCluster(scheduler=self.address, **extra)

    def worker_pids(self) -> dict[str, int]:
        """Return the pid of each worker process, by worker address."""
        pids: dict[str, int] = self.client.run(os.getpid)
        return pids


@pytest.fixture(scope="module")
def cluster() -> Iterator[SharedCluster]:
    local = start_local_cluster(2, 1)
    client = Client(local, set_as_default=False)  # type: ignore[no-untyped-call]
    try:
        yield SharedCluster(local.scheduler_address, client)
    finally:
        client.close()  # type: ignore[no-untyped-call]
        local.close()


class AfterOutcomes:
    """An observer that calls ``action`` once, when ``count`` outcomes arrived."""

    def __init__(self, count: int, action: Callable[[], None]) -> None:
        self.count = count
        self.action = action
        self.seen = 0
        self.engine: Engine | None = None

    def on_start(self, engine: Engine) -> None:
        self.engine = engine

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.seen += 1
        if self.seen == self.count:
            self.action()

    def on_finish(self, report: Report) -> None:
        return None


def journal_rows(path: Path) -> list[tuple[str, str, int]]:
    """Return ``(key, state, attempts)`` of every item in the journal."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        rows: list[tuple[str, str, int]] = connection.execute(
            "SELECT key, state, attempts FROM items ORDER BY seq"
        ).fetchall()
    return rows


def failed_attempt_types(path: Path) -> list[str]:
    """Return the error type of every failed attempt in the journal."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        texts = connection.execute("SELECT error FROM attempts").fetchall()
    return [json.loads(text)["type"] for (text,) in texts]


def succeeded_count(path: Path) -> int:
    """Return how many items the journal records as succeeded (0 before it exists)."""
    if not path.exists():
        return 0
    try:
        return count_states(path).get("succeeded", 0)
    except batchtools.JournalError:
        return 0


def wait_for_workers(cluster: SharedCluster, count: int, without: str) -> None:
    """Wait until the cluster has ``count`` workers again, none at ``without``."""

    def ready() -> bool:
        workers = set(cluster.client.nthreads())  # type: ignore[no-untyped-call]
        return len(workers) == count and without not in workers

    wait_until(ready, f"{count} workers other than {without}", interval=0.05)


@contextlib.contextmanager
def separate_scheduler() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `tests.backends.dask_scheduler` and yield its address and process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.backends.dask_scheduler"],
        cwd=REPOSITORY,
        env=cli_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        yield address, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=RUN_TIMEOUT)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


# -- options and imports -----------------------------------------------------


def test_cluster_options_rejected_when_contradictory() -> None:
    with pytest.raises(ConfigurationError, match="give one"):
        DaskCluster(scheduler="tcp://127.0.0.1:8786", local_cluster=2)
    with pytest.raises(ConfigurationError, match="at least 1"):
        DaskCluster(local_cluster=0)
    with pytest.raises(ConfigurationError, match="more than 1,024 worker processes"):
        DaskCluster(local_cluster=10**4000)
    with pytest.raises(ConfigurationError, match="is invalid"):
        DaskCluster(scheduler="tcp://127.0.0.1:8786 extra")
    with pytest.raises(ConfigurationError, match="schemes: tcp"):
        DaskCluster(scheduler="garbage://127.0.0.1:8786")
    with pytest.raises(ConfigurationError, match="async backend"):
        batchtools.run([1], dask_tasks.double_async, backend="dask")


def test_job_slot_rejected_for_commands() -> None:
    with pytest.raises(ConfigurationError, match="job slot"):
        batchtools.run(["a"], ["echo", "{%}"], backend=DaskCluster(local_cluster=1))


def test_other_backends_never_import_dask() -> None:
    script = (
        "import sys, batchtools\n"
        f"from {TASKS} import double\n"
        "report = batchtools.run(range(10), double, backend='thread')\n"
        "assert report.ok\n"
        "import batchtools.cli.main\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('dask', 'distributed')))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPOSITORY,
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )

    assert completed.stdout.strip() == "[]"


def test_missing_dask_is_usage_error(tmp_path: Path) -> None:
    # The interpreter behaves as if dask were not installed.
    script = (
        "import sys\n"
        "sys.modules['dask'] = None\n"
        "sys.modules['distributed'] = None\n"
        "from batchtools.cli.main import cli_main\n"
        "sys.argv[0] = 'batchtools'\n"
        "cli_main()\n"
    )
    completed = subprocess.run(
        [
            *(sys.executable, "-c", script, "run", "--backend", "dask"),
            *("--local-cluster", "1", "--call", f"{TASKS}:double", ":::", "1"),
        ],
        cwd=tmp_path,
        env=cli_environment(),
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )

    errors = error_lines(completed.stderr)
    assert completed.returncode == 2
    assert len(errors) == 1
    assert "pip install 'pybatchtools[dask]'" in errors[0]
    assert not (tmp_path / ".batchtools").exists()


def test_cli_rejects_cluster_options_with_other_backend(tmp_path: Path) -> None:
    result = run_cli(
        [
            *("run", "--backend", "thread", "--scheduler", "tcp://127.0.0.1:8786"),
            *("--call", f"{TASKS}:double", ":::", "1"),
        ],
        tmp_path,
    )

    assert result.returncode == 2
    assert "--backend dask" in error_lines(result.stderr)[0]


def test_silent_scheduler_aborts_run() -> None:
    # A socket that accepts connections but never speaks Dask's protocol.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        options = DaskCluster(scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=1)
        with pytest.raises(RunAbortedError, match="cannot connect to the Dask"):
            batchtools.run([1], dask_tasks.double, backend=options)


# -- Python tasks -------------------------------------------------------------


def test_values_and_context_reach_workers(cluster: SharedCluster) -> None:
    report = batchtools.run(range(40), dask_tasks.describe, backend=cluster.options())

    worker_pids = set(cluster.worker_pids().values())
    assert report.ok
    for outcome in report.outcomes:
        seen = outcome.value
        assert seen["value"] == 2 * outcome.item
        assert seen["key"] == outcome.key
        assert seen["seq"] == outcome.seq
        assert seen["run_id"] == report.run_id
        assert seen["attempt"] == 1
        assert seen["pid"] in worker_pids
    assert os.getpid() not in worker_pids


def test_tiny_items_travel_in_chunks(cluster: SharedCluster) -> None:
    probe = AfterOutcomes(0, lambda: None)
    report = batchtools.run(
        range(2000), dask_tasks.double, backend=cluster.options(), observers=[probe]
    )

    assert probe.engine is not None
    chunks = probe.engine.backend.chunks_sent  # type: ignore[attr-defined]
    assert report.ok
    assert [outcome.value for outcome in report.outcomes] == [
        2 * x for x in range(2000)
    ]
    assert chunks < 200


def test_in_flight_limit_of_one_runs_one_item_at_a_time(
    cluster: SharedCluster,
) -> None:
    report = batchtools.run(
        range(20), dask_tasks.record_interval, backend=cluster.options(max_in_flight=1)
    )

    intervals = sorted(outcome.value for outcome in report.outcomes)
    assert report.ok
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start


def test_engine_decides_retries(cluster: SharedCluster, tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    report = batchtools.run(
        range(30),
        dask_tasks.succeed_on_third_attempt,
        backend=cluster.options(),
        retry=batchtools.Retry(
            attempts=3, backoff=batchtools.Backoff(initial=0, maximum=0)
        ),
        journal=journal,
    )

    assert report.ok
    assert [outcome.value for outcome in report.outcomes] == [[x, 3] for x in range(30)]
    assert {attempts for _, _, attempts in journal_rows(journal)} == {3}
    assert failed_attempt_types(journal) == ["builtins.ValueError"] * 60


def test_worker_killed_mid_run_fails_only_its_attempts(
    cluster: SharedCluster, tmp_path: Path
) -> None:
    journal = tmp_path / "run.db"
    address, pid = sorted(cluster.worker_pids().items())[0]
    killer = AfterOutcomes(500, lambda: os.kill(pid, signal.SIGKILL))

    report = batchtools.run(
        range(2000),
        dask_tasks.double_slowly,
        backend=cluster.options(),
        journal=journal,
        observers=[killer],
    )
    wait_for_workers(cluster, 2, without=address)

    rows = journal_rows(journal)
    lost = [
        error
        for outcome in report.outcomes
        for attempt in outcome.attempts
        if (error := attempt.error) is not None
    ]
    assert report.ok
    assert [outcome.value for outcome in report.outcomes] == [
        2 * x for x in range(2000)
    ]
    assert report.workers_lost == 1
    assert len(rows) == 2000
    assert len({key for key, _, _ in rows}) == 2000
    assert {state for _, state, _ in rows} == {"succeeded"}
    assert lost
    assert all(isinstance(error, DaskWorkerLostError) for error in lost)
    assert {
        error.address for error in lost if isinstance(error, DaskWorkerLostError)
    } == {address}
    assert set(failed_attempt_types(journal)) == {
        "batchtools._exceptions.DaskWorkerLostError"
    }
    assert sum(attempts for _, _, attempts in rows) == 2000 + len(lost)


@pytest.mark.slow
def test_campaign_of_worker_kills(cluster: SharedCluster, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"kill points drawn with seed {seed}")
    chooser = random.Random(seed)
    count = 20_000
    kill_points = sorted(chooser.sample(range(1000, count - 3000), 3))
    journal = tmp_path / "run.db"
    killed: list[str] = []

    with batchtools.stream(
        range(count),
        dask_tasks.double_slowly,
        backend=cluster.options(),
        journal=journal,
    ) as outcomes:
        for number, outcome in enumerate(outcomes, start=1):
            assert outcome.ok, outcome.error
            if kill_points and number >= kill_points[0]:
                kill_points.pop(0)
                if killed:
                    wait_for_workers(cluster, 2, without=killed[-1])
                address, pid = chooser.choice(sorted(cluster.worker_pids().items()))
                os.kill(pid, signal.SIGKILL)
                killed.append(address)
        report = outcomes.report
    wait_for_workers(cluster, 2, without=killed[-1])

    rows = journal_rows(journal)
    assert report is not None
    assert report.total == count
    assert len(killed) == 3
    # A worker that had just joined may hold no attempt when it is killed.
    assert 1 <= report.workers_lost <= 3
    assert len(rows) == count
    assert {state for _, state, _ in rows} == {"succeeded"}
    assert len({key for key, _, _ in rows}) == count


def test_timed_out_task_gets_cancel_on_worker(
    cluster: SharedCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "cancelled"

    report = batchtools.run(
        [str(marker)],
        dask_tasks.wait_for_cancel,
        backend=cluster.options(),
        timeout=0.5,
    )
    wait_until(marker.exists, "the task to see its cancel", interval=0.05)

    outcome = report.outcomes[0]
    assert outcome.state is batchtools.State.FAILED
    assert isinstance(outcome.error, AttemptTimeoutError)
    assert int(marker.read_text()) in cluster.worker_pids().values()


def test_setup_and_teardown_run_once_per_worker(
    cluster: SharedCluster, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    report = batchtools.run(
        range(40),
        dask_tasks.describe,
        backend=cluster.options(),
        setup=functools.partial(dask_tasks.open_state, folder),
        teardown=functools.partial(dask_tasks.close_state, folder),
    )

    pids = set(cluster.worker_pids().values())
    assert report.ok
    for outcome in report.outcomes:
        assert outcome.value["state"] == f"state of {outcome.value['pid']}"
    assert {path.name for path in tmp_path.glob("setup-*")} == {
        f"setup-{pid}" for pid in pids
    }
    for pid in pids:
        assert (tmp_path / f"teardown-{pid}").read_text() == f"state of {pid}"


def test_failing_setup_is_configuration_error(cluster: SharedCluster) -> None:
    with pytest.raises(ConfigurationError, match="refused the connection"):
        batchtools.run(
            [1],
            dask_tasks.double,
            backend=cluster.options(),
            setup=dask_tasks.fail_setup,
        )

    report = batchtools.run([1], dask_tasks.double, backend=cluster.options())
    assert report.ok


# -- commands -----------------------------------------------------------------


def test_commands_run_on_workers(cluster: SharedCluster) -> None:
    report = batchtools.run(
        ["a", "b c", "d"],
        ["printf", "%s|%s\n", "{}", "{#}"],
        backend=cluster.options(),
    )

    assert report.ok
    assert [outcome.value.stdout for outcome in report.outcomes] == [
        b"a|1\n",
        b"b c|2\n",
        b"d|3\n",
    ]


def test_failed_command_keeps_status_and_output(cluster: SharedCluster) -> None:
    report = batchtools.run(
        ["x"],
        ["sh", "-c", "echo out; echo err >&2; exit 3"],
        backend=cluster.options(),
    )

    error = report.outcomes[0].error
    assert isinstance(error, CommandFailedError)
    assert error.exit_status == 3
    assert error.stderr_tail == b"err\n"
    assert error.result is not None
    assert error.result.stdout == b"out\n"


def test_command_batches_give_one_result(cluster: SharedCluster) -> None:
    report = batchtools.run(
        ["a", "b", "c"], ["echo", "{}"], backend=cluster.options(), batch_size=2
    )

    values = [outcome.value for outcome in report.outcomes]
    assert report.ok
    assert values[0].stdout == b"a b\n"
    assert values[1] is None
    assert values[2].stdout == b"c\n"


def test_commands_get_secrets_and_redact_them(cluster: SharedCluster) -> None:
    secrets = batchtools.SecretStore()
    secrets.add_value("API_TOKEN", "tok-5f8e2a91")
    script = 'test "$API_TOKEN" = tok-5f8e2a91 && echo "token $API_TOKEN"'

    report = batchtools.run(
        ["a"], ["sh", "-c", script], backend=cluster.options(), secrets=secrets
    )

    assert report.ok, report.outcomes[0].error
    assert report.outcomes[0].value.stdout == b"token ***\n"


def test_timed_out_command_is_killed_on_worker(cluster: SharedCluster) -> None:
    duration = "30.123"  # identifies the command among the machine's processes

    def still_running() -> list[int]:
        return [
            process.pid
            for process in psutil.process_iter(["cmdline"])
            if process.info["cmdline"] == ["sleep", duration]
        ]

    report = batchtools.run(
        [duration], ["sleep", "{}"], backend=cluster.options(), timeout=0.5
    )

    assert isinstance(report.outcomes[0].error, AttemptTimeoutError)
    wait_until(lambda: not still_running(), "the command to be killed", interval=0.05)


# -- resume across backends ---------------------------------------------------


def test_thread_run_resumes_on_dask(cluster: SharedCluster, tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    with batchtools.stream(
        range(300),
        dask_tasks.pid_of_worker,
        backend="thread",
        concurrency=2,
        journal=journal,
    ) as outcomes:
        for number, _ in enumerate(outcomes, start=1):
            if number == 100:
                break
    done_before = succeeded_count(journal)

    report = batchtools.run(
        range(300), dask_tasks.pid_of_worker, backend=cluster.options(), journal=journal
    )

    worker_pids = set(cluster.worker_pids().values())
    ran_now = [outcome for outcome in report.outcomes if outcome.source != "journal"]
    assert 100 <= done_before < 300
    assert report.ok
    assert report.total == 300
    assert report.from_journal == done_before
    assert len(ran_now) == 300 - done_before
    assert {outcome.value[1] for outcome in ran_now} <= worker_pids
    assert {state for _, state, _ in journal_rows(journal)} == {"succeeded"}


def test_lost_scheduler_aborts_and_resumes_on_threads(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    with separate_scheduler() as (address, process):
        killer = AfterOutcomes(50, process.kill)
        with pytest.raises(RunAbortedError, match="Dask scheduler"):
            batchtools.run(
                range(400),
                dask_tasks.double_slowly,
                backend=DaskCluster(scheduler=address),
                journal=journal,
                observers=[killer],
            )
    states = count_states(journal)
    done_before = states.get("succeeded", 0)

    report = batchtools.run(
        range(400), dask_tasks.double_slowly, backend="thread", journal=journal
    )

    rows = journal_rows(journal)
    assert states.get("failed", 0) == 0
    assert 50 <= done_before < 400
    assert report.ok
    assert report.from_journal == done_before
    assert [outcome.value for outcome in report.outcomes] == [2 * x for x in range(400)]
    assert len({key for key, _, _ in rows}) == 400
    assert {state for _, state, _ in rows} == {"succeeded"}


def test_cli_lost_scheduler_exits_3_and_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    items = [str(x) for x in range(300)]
    with separate_scheduler() as (address, scheduler):
        arguments: list[str | Path] = ["run", "-q", "--journal", journal]
        arguments += ["--scheduler", address, "--call", f"{TASKS}:double_slowly"]
        arguments += [":::", *items]
        with started_cli(arguments, tmp_path) as cli:
            wait_until(
                lambda: succeeded_count(journal) >= 20,
                "20 items committed",
                process=cli,
                interval=0.02,
            )
            scheduler.kill()
            _, stderr = cli.communicate(timeout=RUN_TIMEOUT)

    errors = error_lines(stderr)
    assert cli.returncode == 3
    assert len(errors) == 1
    assert "connection to the Dask scheduler" in errors[0]
    assert f"batchtools resume {journal}".encode() in stderr

    resumed = run_cli(["resume", "-q", "--backend", "thread", journal], tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert count_states(journal) == {"succeeded": 300}


def test_cli_job_file_starts_local_cluster(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        "[run]\n"
        "local_cluster = 2\n"
        'journal = "run.db"\n'
        "[input]\n"
        'args = ["a", "b", "c"]\n'
        "[task]\n"
        'command = ["echo", "item", "{}"]\n'
        'backend = "dask"\n'
    )

    result = run_cli(["run", "-q", "-f", "job.toml"], tmp_path)

    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [b"item a", b"item b", b"item c"]
    run = batchtools.journal.read_run(tmp_path / "run.db")
    assert run.spec["backend"] == "dask"
    assert run.spec["cli"]["local_cluster"] == 2
