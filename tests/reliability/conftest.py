"""Fixtures of the reliability campaign: its size, and each scenario's record."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator

import pytest

from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord

_OUTCOME = pytest.StashKey[str]()


def pytest_report_header() -> str:
    """Name the campaign's size and seed at the top of the session."""
    return (
        f"reliability campaign: {CAMPAIGN.name}, examples per parser "
        f"{CAMPAIGN.examples}, BATCHTOOLS_TEST_SEED={CAMPAIGN.seed}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the outcome of each test's call phase, for its scenario record."""
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome: str = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        item.stash[_OUTCOME] = outcome
    return report


@pytest.fixture
def campaign() -> Campaign:
    """Return the size of this session's campaign."""
    return CAMPAIGN


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[ScenarioRecord]:
    """Return the record of this test's figures, written when the test ends."""
    record = ScenarioRecord(
        scenario=request.node.name, campaign=CAMPAIGN.name, seed=CAMPAIGN.seed
    )
    started = time.monotonic()
    yield record
    record.duration = round(time.monotonic() - started, 3)
    record.outcome = request.node.stash.get(_OUTCOME, "unknown")
    record.save()
