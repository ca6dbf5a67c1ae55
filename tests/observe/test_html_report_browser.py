"""The HTML report in a real browser: headless Chromium with the network blocked.

The page must draw every chart, run its script without errors or console
messages, request nothing but its own file, and show hostile items as
text. A screenshot is kept under the test's temporary folder.

Chromium comes from the distribution (``apt-get install chromium``, which
``make system-packages`` runs as root). Without it the test fails rather
than skips, so that a machine that cannot check the page reports it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchtools.observe.html_report import write_html
from tests.observe.test_report import HOSTILE, _journal

CHARTS = ("latency-chart", "throughput-chart", "timeline-chart")


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Chromium is not installed, so the HTML report cannot be checked in a "
            "browser; install it with 'apt-get install chromium' (as root, "
            "'make system-packages' does it)"
        )
    return path


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing; install the dev extra: "
            "pip install -e '.[dev]'"
        )
    return sync_playwright


def test_report_page_renders_offline(tmp_path: Path) -> None:
    executable = _chromium()
    sync_playwright = _playwright()
    journal = _journal(tmp_path, count=300, item11=0.02)
    page_path = tmp_path / "report.html"
    write_html(journal, page_path)
    requested: list[str] = []
    console: list[str] = []
    errors: list[str] = []
    dialogs: list[str] = []

    def route(route: Any) -> None:
        url = route.request.url
        if url.startswith("file:"):
            route.continue_()
        else:
            requested.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda message: console.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("dialog", lambda dialog: dialogs.append(dialog.message))
            page.goto(page_path.as_uri(), wait_until="load")
            marks = {
                chart: page.locator(
                    f"#{chart} rect, #{chart} path, #{chart} circle"
                ).count()
                for chart in CHARTS
            }
            failed_bars = page.locator("#timeline-chart rect.failed").count()
            failures_text = page.locator("#failures").inner_text()
            scripts = page.locator("script").count()
            page.locator("#timeline-chart rect.failed").first.hover()
            tooltip = page.locator("#tooltip")
            tooltip_visible = tooltip.is_visible()
            tooltip_text = tooltip.text_content() or ""
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert requested == []
    assert errors == []
    assert console == []
    assert dialogs == []
    for chart, count in marks.items():
        assert count > 0, f"chart {chart} drew no marks"
    assert failed_bars == 31
    assert HOSTILE in failures_text
    assert scripts == 2
    assert tooltip_visible
    assert "attempt 1: failed for good" in tooltip_text
    assert screenshot.stat().st_size > 10_000
