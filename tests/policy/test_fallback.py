"""Fallback chains: order, the strategy that won, and every error kept."""

from __future__ import annotations

import pytest

import batchtools
from batchtools import ConfigurationError, Fallback, FallbackError


def primary(item: int) -> str:
    if item % 2:
        raise ConnectionError(f"primary cannot serve {item}")
    return f"primary {item}"


def secondary(item: int) -> str:
    if item % 3 == 0:
        raise TimeoutError(f"secondary timed out on {item}")
    return f"secondary {item}"


async def async_primary(item: int) -> str:
    raise ConnectionError("down")


async def async_secondary(item: int) -> str:
    return f"async secondary {item}"


def test_outcome_names_the_strategy_that_won() -> None:
    report = batchtools.run([2, 1], Fallback(primary, secondary))

    first, second = report.outcomes
    assert first.value == "primary 2"
    assert first.strategy == "primary"
    assert second.value == "secondary 1"
    assert second.strategy == "secondary"


def test_failure_keeps_every_strategy_error() -> None:
    report = batchtools.run([3], Fallback(primary, secondary))

    error = report.outcomes[0].error
    assert isinstance(error, FallbackError)
    assert error.strategies == ["primary", "secondary"]
    assert [type(e) for e in error.errors] == [ConnectionError, TimeoutError]
    assert "every strategy failed" in str(error)


def test_async_strategies_run_on_the_async_backend() -> None:
    report = batchtools.run([5], Fallback(async_primary, async_secondary))

    assert report.outcomes[0].value == "async secondary 5"
    assert report.outcomes[0].strategy == "async_secondary"


def test_process_backend_runs_the_chain() -> None:
    report = batchtools.run(
        [1, 2, 3], Fallback(primary, secondary), backend="process", concurrency=2
    )

    assert [o.strategy for o in report.outcomes] == ["secondary", "primary", None]
    assert report.counts["failed"] == 1


def test_errors_outside_on_stop_the_chain() -> None:
    chain = Fallback(primary, secondary, on=TimeoutError)

    with pytest.raises(ConnectionError):
        chain(1)


def test_invalid_chains_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        Fallback()
    with pytest.raises(ConfigurationError, match="all sync"):
        Fallback(primary, async_secondary)


def test_strategies_that_take_a_context_receive_it() -> None:
    def refuse(item: int) -> int:
        raise ConnectionError("primary down")

    def with_key(item: int, context: batchtools.Context) -> str:
        return f"{item} {context.idempotency_key}"

    report = batchtools.run([7], Fallback(refuse, with_key))

    (outcome,) = report.outcomes
    assert (
        outcome.strategy
        == "test_strategies_that_take_a_context_receive_it.<locals>.with_key"
    )
    assert outcome.value == f"7 {report.run_id}:{outcome.key}"


def test_mixed_kinds_name_each_strategy() -> None:
    def plain(item: int) -> int:
        return item

    async def waiting(item: int) -> int:
        return item

    with pytest.raises(ConfigurationError) as caught:
        Fallback(plain, waiting)

    assert "plain (sync)" in str(caught.value)
    assert "waiting (async)" in str(caught.value)
