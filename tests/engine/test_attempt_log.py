"""The attempt log: one INFO record at the start and at the end of each attempt."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

import batchtools
from batchtools._codec import digest, encode

LOGGER = "batchtools.attempts"


def fail_first_call(item: str, context: batchtools.Context) -> str:
    if context.attempt == 1:
        raise ConnectionError(f"no route to {item}")
    return item


def batch_upper(items: list[str]) -> list[str]:
    return [item.upper() for item in items]


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


def test_attempts_logged_with_key_and_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    key = digest(encode("a"))

    report = batchtools.run(["a"], fail_first_call, retry=1)

    assert report.counts["succeeded"] == 1
    messages = _messages(caplog)
    assert messages[0] == f"item {key} attempt 1 started"
    assert re.fullmatch(
        rf"item {key} attempt 1 failed after \d+\.\d{{3}} s: "
        r"ConnectionError: no route to a",
        messages[1],
    )
    assert messages[2] == f"item {key} attempt 2 started"
    assert re.fullmatch(
        rf"item {key} attempt 2 succeeded in \d+\.\d{{3}} s", messages[3]
    )
    assert len(messages) == 4


def test_batch_attempt_names_first_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    key = digest(encode("a"))

    batchtools.run(["a", "b", "c"], batch_upper, batch_size=3)

    messages = _messages(caplog)
    assert messages[0] == f"item {key} (a batch of 3 items) attempt 1 started"
    assert messages[1].startswith(
        f"item {key} (a batch of 3 items) attempt 1 succeeded"
    )
    assert len(messages) == 2


def test_timeout_logged_as_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def hang(item: str) -> str:
        await asyncio.sleep(60)
        return item

    report = batchtools.run(["a"], hang, timeout=0.05)

    assert report.counts["failed"] == 1
    assert _messages(caplog)[1].endswith(": timed out after 0.05 s")


def test_attempt_log_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    batchtools.run(["a", "b"], fail_first_call, retry=1)

    assert _messages(caplog) == []
