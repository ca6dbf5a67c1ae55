"""Backoff delays: capped exponential bounds with full jitter."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchtools import Backoff, ConfigurationError


def expected_bound(initial: float, maximum: float, multiplier: float, n: int) -> float:
    """Return ``min(maximum, initial * multiplier ** (n - 1))``, computed exactly."""
    grown = Fraction(initial) * Fraction(multiplier) ** (n - 1)
    return float(min(Fraction(maximum), grown))


@st.composite
def backoffs(draw: st.DrawFn, *, min_maximum: float = 0.0) -> Backoff:
    """Draw a valid Backoff: initial <= maximum, multiplier >= 1."""
    maximum = draw(st.floats(min_value=min_maximum, max_value=3600.0))
    initial = draw(st.floats(min_value=0.0, max_value=maximum))
    multiplier = draw(st.floats(min_value=1.0, max_value=100.0))
    return Backoff(initial=initial, maximum=maximum, multiplier=multiplier)


@given(
    backoff=backoffs(),
    retry_number=st.integers(min_value=1, max_value=2000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_delay_within_capped_bound(
    backoff: Backoff, retry_number: int, seed: int
) -> None:
    rng = random.Random(seed)
    bound = expected_bound(
        backoff.initial, backoff.maximum, backoff.multiplier, retry_number
    )

    delay = backoff.delay(retry_number, rng)

    assert delay >= 0.0
    assert delay <= backoff.maximum
    # The backoff computes in floating point, the bound exactly.
    assert delay <= bound * (1 + 1e-9)


@given(backoff=backoffs(), retry_number=st.integers(min_value=1, max_value=2000))
def test_bound_never_exceeds_maximum(backoff: Backoff, retry_number: int) -> None:
    bound = backoff.bound(retry_number)

    assert 0.0 <= bound <= backoff.maximum
    assert math.isclose(
        bound,
        expected_bound(
            backoff.initial, backoff.maximum, backoff.multiplier, retry_number
        ),
        rel_tol=1e-9,
    )


@given(
    backoff=backoffs(min_maximum=1e-6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_delays_at_cap_still_vary(backoff: Backoff, seed: int) -> None:
    rng = random.Random(seed)
    # With initial 0 every bound is 0, so only positive initials reach a cap.
    if backoff.initial == 0:
        backoff = Backoff(initial=backoff.maximum, maximum=backoff.maximum)
    # Retry 10,000 reaches the cap unless the multiplier is close to 1, and
    # then the test uses a multiplier of 2 instead.
    at_cap = 10_000
    if backoff.bound(at_cap) != backoff.maximum:
        backoff = Backoff(
            initial=backoff.initial, maximum=backoff.maximum, multiplier=2.0
        )
    assert backoff.bound(at_cap) == backoff.maximum

    delays = [backoff.delay(at_cap, rng) for _ in range(20)]

    assert len(set(delays)) > 1
    assert all(0.0 <= delay <= backoff.maximum for delay in delays)


def test_bound_doubles_until_cap() -> None:
    backoff = Backoff(initial=0.5, maximum=3.0, multiplier=2.0)

    bounds = [backoff.bound(n) for n in range(1, 6)]

    assert bounds == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_delay_without_jitter_is_bound() -> None:
    backoff = Backoff(initial=0.25, maximum=10.0, multiplier=3.0, jitter=False)

    delays = [backoff.delay(n) for n in range(1, 5)]

    assert delays == [0.25, 0.75, 2.25, 6.75]


def test_zero_backoff_never_waits() -> None:
    backoff = Backoff(initial=0, maximum=0)

    assert [backoff.delay(n) for n in (1, 2, 50)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"initial": -1.0}, r"initial=-1\.0 must not be negative"),
        ({"maximum": -0.5, "initial": 0.0}, r"maximum=-0\.5 must not be negative"),
        ({"initial": 5.0, "maximum": 1.0}, r"initial=5\.0 must not exceed"),
        ({"multiplier": 0.5}, r"multiplier=0\.5 must be at least 1"),
        ({"maximum": math.inf}, r"maximum=inf must be a number"),
        ({"initial": math.nan}, r"initial=nan must be a number"),
    ],
)
def test_invalid_backoff_rejected(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Backoff(**arguments)  # type: ignore[arg-type]
