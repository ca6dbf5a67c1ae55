"""Secrets in runs: tasks read them, commands get them, nothing written shows them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import batchtools
from batchtools import CommandFailedError, ConfigurationError, State
from batchtools.backends._subprocess import CommandResult
from batchtools.observe._summary import summary_lines
from batchtools.secrets import SecretExpiredError, SecretMissingError, SecretStore
from batchtools.testing import FakeClock, fast_retries
from tests.secrets import tasks

TOKEN = "tok-7f3a9c2e51"
LEAKY_COMMAND = [sys.executable, str(Path(__file__).with_name("leaky_command.py"))]


def token_store(
    clock: FakeClock | None = None, ttl: float | None = None
) -> SecretStore:
    store = SecretStore(clock=clock) if clock is not None else SecretStore()
    store.add_value("TOKEN", TOKEN, ttl=ttl)
    return store


def files_containing(folder: Path, data: bytes) -> list[str]:
    """Return the files under ``folder`` whose bytes contain ``data``."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and data in path.read_bytes()
    )


async def read_token_async(item: int, context: batchtools.Context) -> str:
    return f"{item}:{len(context.secret('TOKEN'))}"


# -- tasks read secrets -------------------------------------------------------


@pytest.mark.parametrize("backend", ["async", "thread", "process"])
def test_task_reads_secret_through_context(backend: str) -> None:
    task = read_token_async if backend == "async" else tasks.read_token

    report = batchtools.run(
        range(3), task, backend=backend, secrets=token_store(), concurrency=2
    )

    assert report.ok
    assert report.values() == [f"{item}:{len(TOKEN)}" for item in range(3)]


def test_context_secrets_is_none_without_store() -> None:
    def read(item: int, context: batchtools.Context) -> str:
        return context.secret("TOKEN")

    report = batchtools.run([1], read, backend="thread")

    [outcome] = report.outcomes
    assert isinstance(outcome.error, SecretMissingError)
    assert "the run has no secrets" in str(outcome.error)


def test_access_log_names_each_attempt() -> None:
    store = token_store()

    report = batchtools.run(range(3), tasks.read_token, secrets=store)

    accesses = store.accesses()
    assert {access.key for access in accesses} == {o.key for o in report.outcomes}
    assert {access.run_id for access in accesses} == {report.run_id}
    assert {access.name for access in accesses} == {"TO***"}
    assert {access.attempt for access in accesses} == {1}


def test_process_backend_records_secrets_as_sent() -> None:
    store = token_store()

    batchtools.run(range(2), tasks.read_token, backend="process", secrets=store)

    assert {access.use for access in store.accesses()} == {"worker"}
    assert len(store.accesses()) == 2


# -- expiry -------------------------------------------------------------------


def test_attempts_after_expiry_fail() -> None:
    clock = FakeClock(1000.0)
    store = token_store(clock, ttl=60)

    def read_then_pass_expiry(item: int, context: batchtools.Context) -> int:
        context.secret("TOKEN")
        if item == 2:
            clock.advance(60)
        return item

    # One thread takes the items in input order.
    report = batchtools.run(
        range(6), read_then_pass_expiry, backend="thread", concurrency=1, secrets=store
    )

    states = [outcome.state for outcome in report.outcomes]
    assert states == [State.SUCCEEDED] * 3 + [State.FAILED] * 3
    for outcome in report.outcomes[3:]:
        assert isinstance(outcome.error, SecretExpiredError)
        assert outcome.error.name == "TOKEN"
        assert outcome.error.expires_at == 1060.0


def test_expired_secret_fails_process_attempt() -> None:
    clock = FakeClock(1000.0)
    store = token_store(clock, ttl=60)

    with batchtools.stream(
        range(2), tasks.read_token, backend="process", secrets=store
    ) as outcomes:
        clock.advance(60)
        errors = [outcome.error for outcome in outcomes]

    assert all(isinstance(error, SecretExpiredError) for error in errors), errors
    assert len(errors) == 2


def test_expired_secret_stops_command_before_it_starts(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    store = token_store(clock, ttl=60)
    marker = tmp_path / "started"

    with batchtools.stream([str(marker)], ["touch", "{}"], secrets=store) as outcomes:
        clock.advance(60)
        [outcome] = list(outcomes)

    assert isinstance(outcome.error, SecretExpiredError)
    assert not marker.exists()


def test_run_with_expired_secret_does_not_start() -> None:
    clock = FakeClock(1000.0)
    store = token_store(clock, ttl=60)
    clock.advance(60)
    calls: list[int] = []

    with pytest.raises(ConfigurationError, match="expired before the run started"):
        batchtools.run([1], calls.append, secrets=store)

    assert calls == []


def test_secrets_must_be_a_store() -> None:
    with pytest.raises(ConfigurationError, match="must be a SecretStore"):
        batchtools.run([1], print, secrets={"TOKEN": TOKEN})  # type: ignore[arg-type]  # the wrong type on purpose


# -- nothing written shows the value ------------------------------------------


def test_journal_and_report_never_show_value(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    report = batchtools.run(
        ["good", "bad"],
        tasks.fail_with_token,
        backend="thread",
        secrets=token_store(),
        journal=journal,
    )

    assert report.counts["failed"] == 1
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert files_containing(tmp_path, b"***") != []
    summary = "\n".join(summary_lines(report))
    assert TOKEN not in summary
    assert "ValueError: login failed with token *** for bad" in summary


def test_journal_value_is_redacted_as_data(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    def value_with_token(item: int) -> dict[str, object]:
        return {"header": f"Bearer {TOKEN}", "count": item}

    batchtools.run([1], value_with_token, secrets=token_store(), journal=journal)
    resumed = batchtools.run(
        [1], value_with_token, secrets=token_store(), journal=journal
    )

    [outcome] = resumed.outcomes
    assert outcome.source == "journal"
    assert outcome.value == {"header": "Bearer ***", "count": 1}


def test_cache_file_never_holds_value(tmp_path: Path) -> None:
    cache = batchtools.Cache(path=tmp_path / "cache.db")

    def value_of(item: str) -> str:
        return f"Bearer {TOKEN}" if item == "secret" else item.upper()

    report = batchtools.run(
        ["plain", "secret"], value_of, secrets=token_store(), policies=[cache]
    )

    assert report.ok
    assert report.cache_unstorable == 1
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert files_containing(tmp_path, b"PLAIN") != []


def test_retry_warning_hides_value(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="batchtools.retry"),
        fast_retries(),
    ):
        batchtools.run(["bad"], tasks.fail_with_token, retry=1, secrets=token_store())

    assert "login failed with token *** for bad" in caplog.text
    assert TOKEN not in caplog.text


# -- commands -----------------------------------------------------------------


def test_command_gets_secret_in_environment_only(tmp_path: Path) -> None:
    report = batchtools.run(
        ["good"], [*LEAKY_COMMAND, "{}"], secrets=token_store(), journal=tmp_path / "j"
    )

    [outcome] = report.outcomes
    result = outcome.value
    assert isinstance(result, CommandResult)
    stdout = result.stdout.decode()
    assert "argv has the token: False" in stdout
    assert "environment has the token: True" in stdout
    assert all(TOKEN.encode() not in argument for argument in result.argv)
    result.close()


def test_command_output_is_redacted_across_reads(tmp_path: Path) -> None:
    report = batchtools.run(
        ["good", "bad"],
        [*LEAKY_COMMAND, "{}"],
        secrets=token_store(),
        journal=tmp_path / "run.db",
    )

    good, bad = report.outcomes
    assert isinstance(good.value, CommandResult)
    assert good.value.stdout.startswith(b"item good token ***\n")
    assert good.value.stderr == b"warning for good: token *** was rejected\n"
    assert isinstance(bad.error, CommandFailedError)
    assert bad.error.stderr_tail == b"warning for bad: token *** was rejected\n"
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert "token *** was rejected" in "\n".join(summary_lines(report))
    good.value.close()
