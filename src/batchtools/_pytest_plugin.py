"""Pytest fixtures for testing code that uses batchtools.

pytest loads this module through the ``pytest11`` entry point of the
``pybatchtools`` distribution, so the fixtures are there in any suite
that has batchtools installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchtools.testing import ConcurrencyProbe, FakeClock, fast_retries


@pytest.fixture
def batchtools_fast_retries() -> Iterator[None]:
    """Zero backoff waits for the duration of the test."""
    with fast_retries():
        yield


@pytest.fixture
def batchtools_fake_clock() -> FakeClock:
    """Return a clock at 0.0 that moves only when the test advances it."""
    return FakeClock()


@pytest.fixture
def batchtools_probe() -> ConcurrencyProbe:
    """Return a probe that records how many calls of a wrapped task run at once."""
    return ConcurrencyProbe()
