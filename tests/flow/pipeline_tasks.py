"""Functions for pipeline tests that worker processes and the CLI import by name.

Worker processes of the process backend import a task by module and
name, and the CLI's job files name tasks as ``MODULE:FUNCTION``, so these
live in an importable module. `report_memory` is the body of a child
interpreter that measures a long pipeline's peak memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path

from batchtools import Context
from batchtools.flow.pipeline import Pipeline, Stage


class Rejected(ValueError):
    """The error the rejecting tasks raise, so tests can tell it from others."""


def with_pid(value: int) -> str:
    """Return ``value`` and the id of the process that ran this call."""
    return f"{value}@{os.getpid()}"


def with_thread(value: int) -> tuple[int, str]:
    """Return ``value`` and the name of the thread that ran this call."""
    return value, threading.current_thread().name


def sleep_from_four(value: int) -> int:
    """Return ``value`` at once if it is below 4, else only after a minute.

    A stand-in for a long attempt: a test that cancels the pipeline checks
    that the worker process running it is gone.
    """
    if value >= 4:
        threading.Event().wait(60.0)
    return value


SLEEP_UNLESS_ZERO = """
import sys, time
with open(sys.argv[1], "a") as ledger:
    ledger.write(sys.argv[2] + "\\n")
time.sleep(0 if sys.argv[2] == "0" else 60)
"""
"""A Python script for a command stage: ``LEDGER VALUE``.

It appends VALUE to the file LEDGER, then exits at once if VALUE is 0 and
sleeps for a minute otherwise.
"""


def fail_first_two(value: int, context: Context) -> int:
    """Raise on the first two attempts of each item, then return ``value``.

    Raises:
        Rejected: On attempts 1 and 2.
    """
    if context.attempt < 3:
        raise Rejected(f"attempt {context.attempt} of {value} fails")
    return value


def parse_number(text: str) -> int:
    """Return ``text`` as an int.

    Raises:
        Rejected: ``text`` is not a whole number.
    """
    try:
        return int(text)
    except ValueError:
        raise Rejected(f"{text!r} is not a number") from None


def shout(text: str) -> str:
    """Return ``text`` in capitals."""
    return text.upper()


async def make_payload(value: int) -> str:
    """Return a 1 KiB string for ``value``, so that a leak of values shows."""
    return f"{value:08d}" * 128


async def measure_slowly(texts: list[str]) -> list[int]:
    """Give the event loop up once, then return the length of each text.

    As a stage with a batch size of 10 and a concurrency of 1, this takes a
    round of the event loop per 10 items. A stage before it with a
    concurrency of 100 finishes up to 100 items a round.
    """
    await asyncio.sleep(0)
    return [len(text) for text in texts]


def peak_rss_mb() -> float:
    """Return this process's peak resident set size (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


class CountingRange:
    """``range(count)`` as a blocking iterator that counts the items taken."""

    def __init__(self, count: int) -> None:
        self._inner = iter(range(count))
        self.reads = 0

    def __iter__(self) -> CountingRange:
        return self

    def __next__(self) -> int:
        value = next(self._inner)
        self.reads += 1
        return value


def report_memory(count: int) -> None:
    """Run ``count`` items through a pipeline with a slow last stage; print JSON.

    The JSON object has ``tenth_mb`` and ``end_mb`` (peak RSS after a tenth
    of the outcomes and at the end), ``outcomes``, ``succeeded`` and
    ``max_ahead``: the most items read from the input beyond those that
    had left the pipeline, sampled every 1,000 outcomes.
    """
    pipeline = Pipeline(
        [
            Stage(make_payload, concurrency=100),
            Stage(measure_slowly, batch_size=10, concurrency=1),
        ]
    )
    source = CountingRange(count)
    received = succeeded = max_ahead = 0
    tenth_mb = 0.0
    with pipeline.stream(source) as outcomes:
        for outcome in outcomes:
            received += 1
            succeeded += outcome.ok
            if received % 1000 == 0:
                max_ahead = max(max_ahead, source.reads - received)
            if received == count // 10:
                tenth_mb = peak_rss_mb()
    result = {
        "tenth_mb": tenth_mb,
        "end_mb": peak_rss_mb(),
        "outcomes": received,
        "succeeded": succeeded,
        "max_ahead": max_ahead,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    report_memory(int(sys.argv[1]))
