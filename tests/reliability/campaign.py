"""The size of the reliability campaign, and the figures each scenario records.

``BATCHTOOLS_CAMPAIGN=full`` runs the whole campaign: ten thousand fuzzing
examples per parser and a million items through the CLI. When it is unset,
the same scenarios run at a size that fits in ``make test``. Every scenario writes its
figures to ``.batchtools-campaign/results/<scenario>.json``, which
``summarize.py`` turns into a table.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS = REPOSITORY / ".batchtools-campaign" / "results"
CAMPAIGN_VARIABLE = "BATCHTOOLS_CAMPAIGN"
SEED_VARIABLE = "BATCHTOOLS_TEST_SEED"
Size = TypeVar("Size", int, float)


@dataclass(frozen=True)
class Campaign:
    """How large each scenario is in this session.

    Attributes:
        full: Whether the whole campaign runs, rather than the subset.
        examples: Fuzzing examples per parser.
        seed: Seed of the random choices that are not hypothesis's own;
            set ``BATCHTOOLS_TEST_SEED`` to replay one.
    """

    full: bool
    examples: int
    seed: int

    @property
    def name(self) -> str:
        """``full`` or ``subset``."""
        return "full" if self.full else "subset"

    def size(self, subset: Size, full: Size) -> Size:
        """Return ``full`` in the whole campaign and ``subset`` otherwise."""
        return full if self.full else subset

    def random(self, scenario: str) -> random.Random:
        """Return a generator seeded from the campaign seed and ``scenario``."""
        return random.Random(f"{self.seed}:{scenario}")


def current_campaign() -> Campaign:
    """Read the campaign's size and seed from the environment.

    Raises:
        ValueError: ``BATCHTOOLS_CAMPAIGN`` is set to something other than
            ``full``, or the seed is not a whole number.
    """
    mode = os.environ.get(CAMPAIGN_VARIABLE, "")
    if mode not in ("", "full"):
        raise ValueError(
            f"{CAMPAIGN_VARIABLE}={mode!r} is invalid: set it to 'full' for the "
            "whole campaign, or leave it unset for the subset"
        )
    fixed_seed = os.environ.get(SEED_VARIABLE)
    seed = int(fixed_seed) if fixed_seed else random.SystemRandom().randrange(2**32)
    full = mode == "full"
    return Campaign(full=full, examples=10_000 if full else 300, seed=seed)


CAMPAIGN = current_campaign()
"""The campaign of this session; hypothesis settings are sized from it."""


@dataclass
class ScenarioRecord:
    """The figures of one scenario, written as JSON when its test ends.

    Attributes:
        scenario: The test's name, which names the JSON file.
        campaign: ``full`` or ``subset``.
        seed: The campaign seed.
        tried: Examples, inputs or runs tried.
        faults_injected: Damaged files, limits or hostile inputs applied.
        items_lost: Items that should have run or been kept but were not.
        duplicates: Items that ran or were recorded more than once.
        outcome: The test's outcome: ``passed``, ``failed``, ``xfailed``...
        duration: Seconds the test took.
        notes: Other figures, such as peak memory.
    """

    scenario: str
    campaign: str
    seed: int
    tried: int = 0
    faults_injected: int = 0
    items_lost: int = 0
    duplicates: int = 0
    outcome: str = "unknown"
    duration: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path = RESULTS) -> Path:
        """Write the record to ``folder/<scenario>.json``; return the path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{file_name(self.scenario)}.json"
        record = asdict(self)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return path


def file_name(scenario: str) -> str:
    """Return ``scenario`` with every character unsafe in a file name replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", scenario).strip("-.") or "scenario"
