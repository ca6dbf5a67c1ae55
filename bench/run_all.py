"""Run every benchmark workload and write docs/benchmarks.md.

`make bench` runs this script. On a 2-CPU machine shared with other work,
the full run took 12 minutes at a load average of about 2.5 and 17 minutes
at about 5; the 10-million-item stream alone takes about 6 of them.
``--quick`` uses fewer items and 3 runs per contender, for a smoke run of
about 1.5 minutes. Each
workload module also runs alone and prints its own page to standard
output, or writes it with ``--output``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import async_journal
import async_noop
import dask_noop
import graph_overhead
import grep_speed
import journal_resume
import pipeline_memory
import plot
import policy_overhead
import process_cpu
import shell_commands
import stream_memory
import thread_noop
from _common import (
    DOCS_PATH,
    FULL_RUNS,
    QUICK_RUNS,
    Config,
    Session,
    WorkloadResult,
    log,
    render_page,
)

WORKLOADS: list[Callable[[Config], WorkloadResult]] = [
    async_noop.measure,
    async_journal.measure,
    thread_noop.measure,
    process_cpu.measure,
    shell_commands.measure,
    stream_memory.measure,
    journal_resume.measure,
    policy_overhead.measure,
    graph_overhead.measure,
    pipeline_memory.measure,
    grep_speed.measure,
    dask_noop.measure,
]


def parse_options() -> tuple[Config, Path]:
    """Parse the command line into a configuration and the output path."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer items and {QUICK_RUNS} runs instead of {FULL_RUNS}, "
        "for a smoke run",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DOCS_PATH,
        help="the Markdown page to write (default: docs/benchmarks.md)",
    )
    options = parser.parse_args()
    runs = QUICK_RUNS if options.quick else FULL_RUNS
    output: Path = options.output
    return Config(quick=options.quick, runs=runs), output


def main() -> None:
    """Measure every workload in turn, then rewrite the whole page."""
    config, output = parse_options()
    session = Session.start()
    results = [measure(config) for measure in WORKLOADS]
    output.write_text(render_page(results, session))
    plot.write_chart(output.read_text(), output.parent / "images" / "benchmarks.png")
    minutes = (time.perf_counter() - session.began) / 60
    log(f"wrote {output} after {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
