"""The circuit breaker: thresholds, the reset timeout, probes and keyed circuits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtools import CircuitOpenError, ConfigurationError
from batchtools.policy.circuit_breaker import (
    BREAKER_TRANSITIONS,
    BreakerState,
    CircuitBreaker,
)


class FakeClock:
    """A clock that moves only when the test sets it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    """The failure the protected functions raise."""


def test_transition_table_lists_every_state() -> None:
    assert set(BREAKER_TRANSITIONS) == set(BreakerState)
    assert BREAKER_TRANSITIONS[BreakerState.CLOSED] == {BreakerState.OPEN}
    assert BREAKER_TRANSITIONS[BreakerState.OPEN] == {BreakerState.HALF_OPEN}
    assert BREAKER_TRANSITIONS[BreakerState.HALF_OPEN] == {
        BreakerState.CLOSED,
        BreakerState.OPEN,
    }


@pytest.mark.parametrize(
    "arguments",
    [
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"window": 0},
        {"min_calls": 30, "window": 20},
        {"consecutive_failures": 0},
        {"reset_timeout": 0},
        {"probes": 0},
    ],
)
def test_invalid_policy_is_rejected(arguments: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="CircuitBreaker"):
        CircuitBreaker(**arguments)  # type: ignore[arg-type]


def test_opens_on_failure_rate_after_min_calls() -> None:
    clock = FakeClock()
    circuits = CircuitBreaker(failure_rate=0.5, window=10, min_calls=4, clock=clock)
    breakers = circuits.breakers()

    for failed in (False, True, False):
        assert breakers.wait_time(None) == 0.0
        breakers.record(None, Boom() if failed else None)
    closed_before = breakers.circuit(None).state
    breakers.wait_time(None)
    breakers.record(None, Boom())

    assert closed_before is BreakerState.CLOSED
    assert breakers.circuit(None).state is BreakerState.OPEN
    assert breakers.transitions[-1].reason == "2 of the last 4 calls failed"


def test_opens_after_failures_in_a_row() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        failure_rate=1.0, window=50, min_calls=50, consecutive_failures=3, clock=clock
    ).breakers()

    for _ in range(3):
        breakers.wait_time(None)
        breakers.record(None, Boom())

    assert breakers.circuit(None).state is BreakerState.OPEN


def test_open_circuit_waits_out_the_reset_timeout() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        consecutive_failures=1, reset_timeout=30, clock=clock
    ).breakers()
    breakers.wait_time(None)
    breakers.record(None, Boom())

    clock.now = 10.0
    early = breakers.wait_time(None)
    clock.now = 30.0
    probe = breakers.wait_time(None)
    second = breakers.wait_time(None)

    assert early == pytest.approx(20.0)
    assert probe == 0.0
    assert breakers.circuit(None).state is BreakerState.HALF_OPEN
    assert second > 0


def test_successful_probes_close_and_failed_probe_reopens() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        consecutive_failures=1, reset_timeout=5, probes=2, clock=clock
    ).breakers()
    breakers.wait_time(None)
    breakers.record(None, Boom())
    clock.now = 5.0

    breakers.wait_time(None)
    breakers.wait_time(None)
    breakers.record(None, None)
    half_open = breakers.circuit(None).state
    breakers.record(None, None)
    closed = breakers.circuit(None).state
    breakers.wait_time(None)
    breakers.record(None, Boom())
    clock.now = 10.0
    breakers.wait_time(None)
    breakers.record(None, Boom())

    assert half_open is BreakerState.HALF_OPEN
    assert closed is BreakerState.CLOSED
    assert breakers.circuit(None).state is BreakerState.OPEN
    assert [t.new for t in breakers.transitions] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
    ]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=20), st.booleans()),
        max_size=80,
    )
)
def test_every_transition_is_in_the_table(steps: list[tuple[float, bool]]) -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        window=5, min_calls=3, consecutive_failures=2, reset_timeout=3, clock=clock
    ).breakers()

    for gap, failed in steps:
        clock.now += gap
        if breakers.wait_time(None) == 0.0:
            breakers.record(None, Boom() if failed else None)

    previous = BreakerState.CLOSED
    for transition in breakers.transitions:
        assert transition.old is previous
        assert transition.new in BREAKER_TRANSITIONS[transition.old]
        previous = transition.new
    assert breakers.circuit(None).state is previous


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.booleans()),
        max_size=120,
    )
)
def test_shortcuts_of_the_unkeyed_circuit_change_no_decision(
    steps: list[tuple[float, bool]],
) -> None:
    # The one circuit of an unkeyed breaker skips work while it is healthy,
    # but a keyed breaker with a constant key takes the full path every time.
    clock = FakeClock()
    options: dict[str, Any] = {
        "window": 6,
        "min_calls": 4,
        "failure_rate": 0.5,
        "consecutive_failures": 3,
        "reset_timeout": 2,
        "clock": clock,
    }
    unkeyed = CircuitBreaker(**options).breakers()
    keyed = CircuitBreaker(key=lambda item: "k", **options).breakers()

    for gap, failed in steps:
        clock.now += gap
        admitted = []
        for breakers, key in ((unkeyed, None), (keyed, "k")):
            delay, generation = breakers.admit(key)
            admitted.append(delay)
            if delay == 0.0:
                breakers.record(key, Boom() if failed else None, generation)
        assert admitted[0] == admitted[1]

    assert [(t.new, t.at, t.reason) for t in unkeyed.transitions] == [
        (t.new, t.at, t.reason) for t in keyed.transitions
    ]


def test_keys_have_their_own_circuits_in_a_bounded_cache() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        consecutive_failures=1,
        key=lambda url: url.split("/")[2],
        max_keys=50,
        clock=clock,
    ).breakers()

    bad = breakers.key_of("http://bad/x")
    breakers.wait_time(bad)
    breakers.record(bad, Boom())
    for number in range(1000):
        breakers.wait_time(f"host-{number}")

    assert bad == "bad"
    assert breakers.wait_time(breakers.key_of("http://good/y")) == 0.0
    assert "keys=50" in repr(breakers)


def test_decorator_runs_function_exactly_once_per_call() -> None:
    clock = FakeClock()
    calls = []

    @CircuitBreaker(consecutive_failures=2, reset_timeout=10, clock=clock)
    def fetch(value: int) -> int:
        calls.append(value)
        if value < 0:
            raise Boom(value)
        return value

    assert fetch(1) == 1
    for value in (-1, -2):
        with pytest.raises(Boom):
            fetch(value)
    with pytest.raises(CircuitOpenError, match="circuit open"):
        fetch(3)
    clock.now = 10.0
    assert fetch(4) == 4

    assert calls == [1, -1, -2, 4]


def test_decorator_protects_async_function() -> None:
    clock = FakeClock()

    @CircuitBreaker(consecutive_failures=1, clock=clock)
    async def fetch(value: int) -> int:
        if value < 0:
            raise Boom(value)
        return value

    async def scenario() -> None:
        with pytest.raises(Boom):
            await fetch(-1)
        with pytest.raises(CircuitOpenError):
            await fetch(1)

    asyncio.run(scenario())


def test_errors_outside_on_do_not_count() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(consecutive_failures=1, on=Boom, clock=clock).breakers()

    breakers.wait_time(None)
    breakers.record(None, KeyError("not a failure of the service"))

    assert breakers.circuit(None).state is BreakerState.CLOSED


def test_parse_reads_both_forms() -> None:
    in_a_row = CircuitBreaker.parse("5", reset_timeout="2s")
    share = CircuitBreaker.parse("50%/20")

    assert in_a_row.consecutive_failures == 5
    assert in_a_row.reset_timeout == 2.0
    assert share.failure_rate == 0.5
    assert share.window == 20
    assert share.min_calls == 10


def test_parsed_in_a_row_breaker_ignores_single_failures() -> None:
    breakers = CircuitBreaker.parse("3").breakers()

    for failed in (True, False, True, True, False):
        breakers.wait_time(None)
        breakers.record(None, Boom() if failed else None)

    assert breakers.circuit(None).state is BreakerState.CLOSED


@pytest.mark.parametrize("text", ["often", "0", "0%/20", "50%", "50%/0", "-1"])
def test_parse_rejects_other_forms(text: str) -> None:
    with pytest.raises(ConfigurationError, match=r"circuit breaker|CircuitBreaker"):
        CircuitBreaker.parse(text)


def test_late_result_of_an_older_call_is_ignored() -> None:
    clock = FakeClock()
    breakers = CircuitBreaker(
        consecutive_failures=1, reset_timeout=5, clock=clock
    ).breakers()
    slow_delay, slow_generation = breakers.admit(None)
    breakers.wait_time(None)
    breakers.record(None, Boom())
    clock.now = 5.0
    probe_delay, probe_generation = breakers.admit(None)

    breakers.record(None, None, slow_generation)

    assert slow_delay == 0.0
    assert probe_delay == 0.0
    assert probe_generation != slow_generation
    assert breakers.circuit(None).state is BreakerState.HALF_OPEN


def test_predicate_for_on_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="exception type"):
        CircuitBreaker(on=lambda error: True)  # type: ignore[arg-type]
