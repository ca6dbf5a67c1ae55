"""Turn the reliability campaign's JSON records into one Markdown table.

Usage: ``python tests/reliability/summarize.py [--campaign full|subset]
[--group] [FOLDER]``

Reads every ``*.json`` file that the scenarios wrote (by default under
``.batchtools-campaign/results/``) and prints a table with one row per
scenario, sorted by name, then the notes of each scenario that has some.
With ``--campaign``, only the records of that campaign size are shown.
With ``--group``, the cases of one parametrized test share a row: their
figures are summed, and the outcome counts the cases that passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_FOLDER = (
    Path(__file__).resolve().parents[2] / ".batchtools-campaign" / "results"
)
COLUMNS = (
    ("scenario", "scenario"),
    ("campaign", "campaign"),
    ("outcome", "outcome"),
    ("tried", "tried"),
    ("faults_injected", "faults injected"),
    ("items_lost", "items lost"),
    ("duplicates", "duplicates"),
    ("duration", "seconds"),
)


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Return the records in ``folder``, sorted by scenario name.

    Raises:
        ValueError: A file is not a JSON object.
    """
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"{path} does not contain a JSON object")
        records.append(record)
    return sorted(records, key=lambda record: str(record.get("scenario", "")))


_SUMMED = ("tried", "faults_injected", "items_lost", "duplicates", "duration")


def group_cases(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one record per test, summing the figures of its parametrized cases.

    A group of several cases has the outcome ``N of M passed`` and no notes.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        name = str(record.get("scenario", "")).split("[", 1)[0]
        groups.setdefault((name, str(record.get("campaign", ""))), []).append(record)
    grouped = []
    for (name, campaign), cases in sorted(groups.items()):
        if len(cases) == 1:
            grouped.append(cases[0])
            continue
        passed = sum(1 for case in cases if case.get("outcome") == "passed")
        merged: dict[str, Any] = {
            "scenario": f"{name} ({len(cases)} cases)",
            "campaign": campaign,
            "outcome": f"{passed} of {len(cases)} passed",
        }
        for key in _SUMMED:
            merged[key] = sum(case.get(key, 0) for case in cases)
        grouped.append(merged)
    return grouped


def _cell(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
    """Return the records as a Markdown table, then their notes as a list."""
    rows = list(records)
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for record in rows:
        cells = [_cell(record.get(key, "")) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    noted = [record for record in rows if record.get("notes")]
    if noted:
        lines.append("")
        for record in noted:
            notes = ", ".join(
                f"{name} {_cell(value)}"
                for name, value in sorted(record["notes"].items())
            )
            lines.append(f"- {record['scenario']}: {notes}")
    return "\n".join(lines) + "\n"


def main(arguments: Sequence[str]) -> int:
    """Print the table of the folder named in ``arguments``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--campaign", choices=["full", "subset"], default=None)
    parser.add_argument(
        "--group", action="store_true", help="one row per parametrized test"
    )
    options = parser.parse_args(arguments)
    folder: Path = options.folder
    if not folder.is_dir():
        print(
            f"summarize: {folder} is not a folder; run the campaign first "
            "(BATCHTOOLS_CAMPAIGN=full pytest tests/reliability)",
            file=sys.stderr,
        )
        return 2
    records = [
        record
        for record in read_records(folder)
        if options.campaign is None or record.get("campaign") == options.campaign
    ]
    if not records:
        print(f"summarize: no JSON records in {folder}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table(group_cases(records) if options.group else records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
