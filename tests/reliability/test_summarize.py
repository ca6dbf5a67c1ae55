"""The Markdown summary of the campaign's JSON records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.campaign import ScenarioRecord
from tests.reliability.summarize import (
    group_cases,
    main,
    markdown_table,
    read_records,
)


def _write(folder: Path, scenario: str, campaign: str, **figures: object) -> None:
    record = ScenarioRecord(scenario=scenario, campaign=campaign, seed=7)
    for name, value in figures.items():
        setattr(record, name, value)
    record.save(folder)


def test_records_become_table_rows(tmp_path: Path) -> None:
    _write(tmp_path, "test_b[x|y]", "full", tried=10_000, outcome="passed")
    _write(tmp_path, "test_a", "full", items_lost=2, notes={"peak_mb": 80.5})

    table = markdown_table(read_records(tmp_path))

    lines = table.splitlines()
    assert lines[0].startswith("| scenario | campaign | outcome | tried |")
    assert lines[2].startswith("| test_a | full | unknown | 0 | 0 | 2 | 0 |")
    assert lines[3].startswith("| test_b[x\\|y] | full | passed | 10,000 |")
    assert "- test_a: peak_mb 80.5" in lines


def test_campaign_filter_and_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, "test_full", "full")
    _write(tmp_path, "test_subset", "subset")

    assert main(["--campaign", "full", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "test_full" in output
    assert "test_subset" not in output
    assert main([str(tmp_path / "missing")]) == 2


def test_record_file_name_is_safe(tmp_path: Path) -> None:
    path = ScenarioRecord(scenario="test_x[a/b c]", campaign="subset", seed=1).save(
        tmp_path
    )

    assert path.parent == tmp_path
    assert path.name == "test_x-a-b-c.json"
    assert json.loads(path.read_text())["scenario"] == "test_x[a/b c]"


def test_cases_of_one_test_share_a_row(tmp_path: Path) -> None:
    _write(tmp_path, "test_a[one]", "full", tried=3, items_lost=1, outcome="passed")
    _write(tmp_path, "test_a[two]", "full", tried=4, outcome="failed")
    _write(tmp_path, "test_b", "full", tried=5, outcome="passed", notes={"x": 1})

    rows = group_cases(read_records(tmp_path))

    assert [row["scenario"] for row in rows] == ["test_a (2 cases)", "test_b"]
    assert rows[0]["outcome"] == "1 of 2 passed"
    assert (rows[0]["tried"], rows[0]["items_lost"]) == (7, 1)
    assert rows[1]["notes"] == {"x": 1}
