"""Circuit breakers inside a run: opening, waiting outside the slot, probing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import batchtools
from batchtools import CircuitBreaker, CircuitOpenError
from batchtools.policy import BreakerState


class FlakyService:
    """Fails its first ``failures`` calls, then answers every call."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, item: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"service down for item {item}")
        return item


def test_breaker_opens_probes_and_closes() -> None:
    service = FlakyService(failures=3)
    breaker = CircuitBreaker(consecutive_failures=3, reset_timeout=0.05)

    report = batchtools.run(range(20), service, concurrency=1, policies=[breaker])

    states = [t.new for t in report.circuit_transitions]
    assert states == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert report.counts["failed"] == 3
    assert report.counts["succeeded"] == 17
    # Items that waited for the open circuit were not called meanwhile.
    assert service.calls == 20


def test_fail_fast_breaker_fails_items_while_open() -> None:
    service = FlakyService(failures=2)
    breaker = CircuitBreaker(consecutive_failures=2, reset_timeout=3600, fail_fast=True)

    report = batchtools.run(range(6), service, concurrency=1, policies=[breaker])

    errors = [o.error for o in report.outcomes]
    assert report.counts["failed"] == 6
    assert all(isinstance(e, CircuitOpenError) for e in errors[2:])
    assert "circuit open" in str(errors[2])
    assert service.calls == 2


def test_breaker_transitions_are_journaled(tmp_path: Path) -> None:
    journal = tmp_path / "breaker.db"
    service = FlakyService(failures=2)
    breaker = CircuitBreaker(consecutive_failures=2, reset_timeout=0.05)

    batchtools.run(
        range(5), service, concurrency=1, policies=[breaker], journal=journal
    )

    with sqlite3.connect(journal) as conn:
        kinds = [
            row[0]
            for row in conn.execute(
                "SELECT detail ->> 'to' FROM events WHERE kind = 'circuit' ORDER BY id"
            )
        ]
    assert kinds == ["open", "half-open", "closed"]
