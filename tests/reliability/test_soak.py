"""A long run through the library: transient failures, retries, a breaker, a rate limit.

``stream`` applies an async task to 50,000 items (a million in the whole
campaign) with a journal. The task fails 30 percent of its attempts with
`ConnectionError`. Whether an attempt fails is a hash of the campaign seed,
the item and the attempt number, so the test computes in advance how many
attempts each item needs. The run retries up to 20 attempts an item, under a
circuit breaker and a rate limit of 5,000 attempt starts a second.

The test checks that the totals add up. Every item has one outcome, and
succeeded and failed items add up to the count. Each outcome has the number
of attempts that the hash predicts, and the task ran exactly as often as
predicted. The journal records the same figures. Memory must stay flat:
the peak resident memory of this process at the end may be at most 10
percent plus 20 MB above the peak after a tenth of the items. Memory that
earlier tests of the session left in the process raises both peaks, so
`make test-reliability` runs this file in a pytest process of its own. Afterwards the
process has as many open file descriptors, threads and child processes as
before.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import batchtools
from batchtools import Backoff, CircuitBreaker, Context, RateLimit, Retry, State
from tests.cli.support import connect_read_only, integrity_check
from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord
from tests.reliability.leftovers import ResourceCheck

COUNT = CAMPAIGN.size(50_000, 1_000_000)
FAILURE_PER_MILLE = 300
ATTEMPTS = 20
"""Attempts per item: 0.3 ** 20 makes an item that fails them all unlikely
even among a million, though the test would count it as failed."""

RATE_PER_SECOND = 5_000
FLAT_SHARE = 0.10
FLAT_SLACK = 20 * 1024 * 1024
SAMPLE_INTERVAL = 0.01
"""Seconds between two samples of this process's resident memory."""


def _fails(seed: int, item: int, attempt: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{item}:{attempt}".encode(), digest_size=8)
    return int.from_bytes(digest.digest()) % 1000 < FAILURE_PER_MILLE


def attempts_needed(seed: int, item: int) -> tuple[int, bool]:
    """Return how many attempts ``item`` takes, and whether it then succeeds."""
    for attempt in range(1, ATTEMPTS + 1):
        if not _fails(seed, item, attempt):
            return attempt, True
    return ATTEMPTS, False


@dataclass
class CallCounter:
    """How often the task ran and failed."""

    calls: int = 0
    failures: int = 0


def flaky_task(seed: int, counter: CallCounter) -> Callable[..., Awaitable[int]]:
    """Return an async task that fails the attempts that `_fails` chooses."""

    async def call(item: int, context: Context) -> int:
        counter.calls += 1
        if _fails(seed, item, context.attempt):
            counter.failures += 1
            raise ConnectionError(f"item {item} attempt {context.attempt} refused")
        return item

    return call


class MemorySampler:
    """Samples this process's resident memory on a thread, keeping the peak."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-sampler")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def quiet_retries() -> Iterator[None]:
    """Keep the retry warnings of the run out of pytest's captured log.

    A run of a million items logs hundreds of thousands of them, which
    pytest would keep in memory.
    """
    logger = logging.getLogger("batchtools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Totals:
    """What the stream yielded."""

    outcomes: int = 0
    succeeded: int = 0
    failed: int = 0
    attempts: int = 0
    mismatched: int = 0
    peak_at_tenth: int = 0


def _consume(stream: batchtools.Stream, seed: int, sampler: MemorySampler) -> Totals:
    totals = Totals()
    seen = bytearray(COUNT)
    for outcome in stream:
        totals.outcomes += 1
        seen[outcome.item] += 1
        if outcome.state is State.SUCCEEDED:
            totals.succeeded += 1
        elif outcome.state is State.FAILED:
            totals.failed += 1
        # A first attempt that succeeds is not listed in a stream's outcome.
        attempts = len(outcome.attempts) or 1
        totals.attempts += attempts
        expected, ok = attempts_needed(seed, outcome.item)
        if (attempts, outcome.ok) != (expected, ok):
            totals.mismatched += 1
        if totals.outcomes == COUNT // 10:
            totals.peak_at_tenth = sampler.peak
    totals.mismatched += sum(1 for times in seen if times != 1)
    return totals


def _journal_totals(journal: Path) -> tuple[dict[str, int], int, int]:
    """Return the journal's items by state, their attempts, and failed attempts."""
    connection = connect_read_only(journal)
    try:
        states = dict(
            connection.execute("SELECT state, count(*) FROM items GROUP BY state")
        )
        attempts = connection.execute("SELECT sum(attempts) FROM items").fetchone()[0]
        failed = connection.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        connection.close()
    return states, int(attempts), int(failed)


@pytest.mark.timeout(CAMPAIGN.size(240, 2400))
@pytest.mark.usefixtures("quiet_retries")
def test_soak_with_transient_failures(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    seed = campaign.seed
    counter = CallCounter()
    journal = tmp_path / "soak.db"
    resources = ResourceCheck.start()
    sampler = MemorySampler()
    before = sampler.peak
    try:
        with batchtools.stream(
            range(COUNT),
            flaky_task(seed, counter),
            backend="async",
            journal=journal,
            retry=Retry(
                attempts=ATTEMPTS, backoff=Backoff(initial=0.001, maximum=0.01)
            ),
            policies=[
                RateLimit(per_second=RATE_PER_SECOND, burst=100),
                CircuitBreaker(
                    failure_rate=0.6, window=50, min_calls=25, reset_timeout=0.05
                ),
            ],
        ) as stream:
            totals = _consume(stream, seed, sampler)
            report = stream.report
    finally:
        sampler.stop()
    leaks = resources.leaks()
    bound = totals.peak_at_tenth * (1 + FLAT_SHARE) + FLAT_SLACK
    scenario.tried = COUNT
    scenario.faults_injected = counter.failures
    scenario.items_lost = COUNT - totals.outcomes
    scenario.notes.update(
        attempts=counter.calls,
        retries=counter.calls - COUNT,
        rss_before_mb=round(before / 2**20, 1),
        peak_at_tenth_mb=round(totals.peak_at_tenth / 2**20, 1),
        peak_at_end_mb=round(sampler.peak / 2**20, 1),
        bound_mb=round(bound / 2**20, 1),
        circuit_transitions=len(report.circuit_transitions) if report else -1,
        rate_limited=report.rate_limited if report else -1,
        leaks=leaks,
    )

    assert report is not None
    assert totals.outcomes == COUNT
    assert totals.mismatched == 0
    assert totals.succeeded + totals.failed == COUNT
    assert totals.attempts == counter.calls
    assert report.counts["succeeded"] == totals.succeeded
    assert report.counts["failed"] == totals.failed
    states, journal_attempts, failed_attempts = _journal_totals(journal)
    assert integrity_check(journal) == "ok"
    assert sum(states.values()) == COUNT
    assert states.get("succeeded", 0) == totals.succeeded
    assert journal_attempts == counter.calls
    assert failed_attempts == counter.failures
    assert totals.peak_at_tenth > 0
    assert sampler.peak <= bound
    assert leaks == {"descriptors": 0, "threads": 0, "children": 0}


def test_stream_outcome_lists_attempts_that_failed() -> None:
    """A stream keeps the attempts of retried items, not a first success."""
    failed_once: set[int] = set()

    async def flaky(item: int) -> int:
        if item % 2 and item not in failed_once:
            failed_once.add(item)
            raise ValueError(item)
        return item

    with batchtools.stream(range(10), flaky, backend="async", retry=1) as stream:
        attempts = {outcome.item: len(outcome.attempts) for outcome in stream}

    assert attempts == {item: 2 if item % 2 else 0 for item in range(10)}
