"""Workload: peak memory of a three-stage `Pipeline` with a slow final stage.

A pipeline keeps its items in bounded buffers between stages, so a slow
last stage should pause the stages before it instead of letting values
pile up. This runs 1 million items (200,000 with ``--quick``) through
three stages in a fresh interpreter: two async stages with a concurrency
of 100, the first of which turns each item into a 1 KiB string, then a
final stage that takes a round of the event loop per 10 items with a
concurrency of 1. The child records its peak RSS (``VmHWM``, see
`_common.peak_rss_mb`) after a tenth of the outcomes and at the end. The
design's definition of flat memory is a peak at the end within 10 percent
plus 20 MB of the peak at a tenth.

Run it alone with ``python bench/pipeline_memory.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    BENCH_DIR,
    Config,
    Row,
    WorkloadResult,
    log,
    main_for,
    median,
    peak_rss_mb,
)

from batchtools.flow.pipeline import Pipeline, Stage

SLACK_MB = 20.0
SHARE = 1.1


async def make_payload(value: int) -> str:
    """Return a 1 KiB string for ``value``, so that values held by mistake show."""
    return f"{value:08d}" * 128


async def reverse(text: str) -> str:
    """Return ``text`` reversed."""
    return text[::-1]


async def measure_slowly(texts: list[str]) -> list[int]:
    """Give the event loop up once, then return the length of each text."""
    await asyncio.sleep(0)
    return [len(text) for text in texts]


def run_pipeline(count: int) -> dict[str, float]:
    """Stream ``count`` items through the pipeline; return the child's figures."""
    pipeline = Pipeline(
        [
            Stage(make_payload, concurrency=100),
            Stage(reverse, concurrency=100),
            Stage(measure_slowly, batch_size=10, concurrency=1),
        ]
    )
    received = 0
    tenth_mb = 0.0
    began = time.perf_counter()
    with pipeline.stream(range(count)) as outcomes:
        for outcome in outcomes:
            if not outcome.ok:
                raise RuntimeError(f"item failed: {outcome!r}")
            received += 1
            if received == count // 10:
                tenth_mb = peak_rss_mb()
    seconds = time.perf_counter() - began
    return {
        "count": received,
        "seconds": seconds,
        "tenth_mb": tenth_mb,
        "end_mb": peak_rss_mb(),
    }


def pipeline_child(count: int) -> dict[str, float]:
    """Run `run_pipeline` in a fresh interpreter and return its figures.

    Raises:
        subprocess.CalledProcessError: The child exited with an error.
        RuntimeError: The child did not report every item.
    """
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "child", str(count)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        cwd=BENCH_DIR,
    )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["count"] != count:
        raise RuntimeError(f"the pipeline yielded {result['count']} of {count} items")
    return result


def measure(config: Config) -> WorkloadResult:
    """Compare the pipeline's peak RSS at the end with its peak at a tenth."""
    count = 200_000 if config.quick else 1_000_000
    log(f"pipeline memory: peak RSS of a 3-stage pipeline over {count:,} items")
    runs = [pipeline_child(count) for _ in range(config.runs)]

    for number, run in enumerate(runs, start=1):
        log(
            f"  run {number}/{config.runs}: {run['tenth_mb']:.1f} MB at a tenth, "
            f"{run['end_mb']:.1f} MB at the end, {run['seconds']:.1f} s"
        )
    tenth = median([run["tenth_mb"] for run in runs])
    end = median([run["end_mb"] for run in runs])
    seconds = median([run["seconds"] for run in runs])

    result = WorkloadResult(
        title="Pipeline memory",
        summary=(
            f"`Pipeline([...]).stream(range(N))` with N = {count:,} in a fresh "
            "interpreter. Two async stages run with a concurrency of 100, and "
            "the first makes a 1 KiB string per item. A final stage with a "
            "concurrency of 1 takes a round of the event loop per 10 items. The "
            "figures are the child's peak RSS (`VmHWM`) after a tenth of the "
            "outcomes and at the end, in MB of 2^20 bytes, interpreter and "
            "imports included. Flat means the peak at the end is within 10 "
            "percent plus 20 MB of the peak at a tenth."
        ),
    )
    result.rows.append(
        Row(
            measured="peak RSS of a fresh process",
            contender=("at the end", end),
            baseline=("at a tenth", tenth),
            unit="MB",
            ratio=end / tenth,
            target=f"<= {SHARE:g}x + {SLACK_MB:g} MB",
            met=end <= SHARE * tenth + SLACK_MB,
        )
    )
    result.notes.append(
        f"Time of the pipeline: {seconds:.1f} s (median), "
        f"{seconds / count * 1e6:.1f} us per item."
    )
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(run_pipeline(int(sys.argv[2]))))
    else:
        main_for(measure, __doc__ or "")
