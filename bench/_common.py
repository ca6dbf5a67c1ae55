"""Shared parts of the benchmarks: timing, child processes and Markdown tables.

Every workload module measures its contenders interleaved (A, B, A, B, ...)
so that a burst of load from other work on a shared machine hits all of
them alike, and reports medians. Verdicts rest on ratios measured in the
same session, never on one absolute time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DOCS_PATH = REPO_DIR / "docs" / "benchmarks.md"
CHILD_SCRIPT = BENCH_DIR / "_child.py"

FULL_RUNS = 5
QUICK_RUNS = 3


@dataclass(frozen=True)
class Config:
    """Options shared by every workload.

    Attributes:
        quick: Use fewer items, for a smoke run.
        runs: Measurements of each contender; the tables show their median.
    """

    quick: bool
    runs: int


def log(message: str) -> None:
    """Print a progress line to standard error."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_interleaved(
    contenders: Mapping[str, Callable[[], float]], runs: int
) -> dict[str, list[float]]:
    """Call each contender ``runs`` times, in turn, and collect what each returns.

    A contender returns its own measurement (seconds or megabytes), so that
    set-up and clean-up stay outside the figure.
    """
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(1, runs + 1):
        for name, contender in contenders.items():
            value = contender()
            samples[name].append(value)
            log(f"  run {round_number}/{runs} {name}: {value:.3f}")
    return samples


def time_call(function: Callable[[], object]) -> float:
    """Return the wall-clock seconds that one call of ``function`` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return statistics.median(values)


def spread(
    samples: Mapping[str, Sequence[float]],
    unit: str,
    heading: str = "Range over the runs",
) -> str:
    """Describe the minimum and maximum of each contender's samples."""
    digits = 1 if unit == "MB" else 3
    parts = [
        f"{name} {min(values):.{digits}f} to {max(values):.{digits}f} {unit}"
        for name, values in samples.items()
    ]
    return f"{heading}: " + "; ".join(parts) + "."


def run_child(arguments: Sequence[str]) -> dict[str, float]:
    """Run ``_child.py`` with ``arguments`` in a fresh interpreter.

    Returns:
        The JSON object that the child prints as its last line of output.

    Raises:
        subprocess.CalledProcessError: The child exited with an error.
    """
    command = [sys.executable, str(CHILD_SCRIPT), *arguments]
    completed = subprocess.run(
        command, check=True, stdout=subprocess.PIPE, text=True, cwd=BENCH_DIR
    )
    last_line = completed.stdout.strip().splitlines()[-1]
    result: dict[str, float] = json.loads(last_line)
    return result


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB.

    Linux carries `ru_maxrss` across ``execve`` from the process that forked
    the child, so a child started by a large parent would report the
    parent's peak. ``VmHWM`` in /proc/self/status belongs to the child's own
    address space, so it is read first. Where /proc is missing, the
    fallback is `ru_maxrss`, which Linux reports in KiB.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Target:
    """A bound on a ratio.

    Attributes:
        kind: ``at least`` for speed-ups (baseline / batchtools), ``at most``
            for overheads (batchtools / baseline).
        bound: The ratio that meets the target exactly.
    """

    kind: Literal["at least", "at most"]
    bound: float

    def ratio(self, contender: float, baseline: float) -> float:
        """Return the ratio this target bounds."""
        if self.kind == "at least":
            return baseline / contender
        return contender / baseline

    def is_met(self, ratio: float) -> bool:
        """Return whether ``ratio`` meets the target."""
        if self.kind == "at least":
            return ratio >= self.bound
        return ratio <= self.bound

    def describe(self) -> str:
        """Return the target as table text, such as ``>= 0.35x``."""
        sign = ">=" if self.kind == "at least" else "<="
        return f"{sign} {self.bound:g}x"


@dataclass(frozen=True)
class Row:
    """One line of a workload's table.

    Attributes:
        measured: What the figures are, such as "100,000 items, whole call".
        contender: The batchtools variant and its median.
        baseline: The baseline and its median, or None for an absolute limit.
        unit: ``s`` or ``MB``.
        ratio: The ratio that the target bounds, or None without a baseline.
        target: The target as text.
        met: Whether the target is met, or None where no target applies.
    """

    measured: str
    contender: tuple[str, float]
    baseline: tuple[str, float] | None
    unit: str
    ratio: float | None
    target: str
    met: bool | None


def compare(
    measured: str,
    contender: tuple[str, float],
    baseline: tuple[str, float],
    target: Target | None,
    unit: str = "s",
) -> Row:
    """Build a row that sets a batchtools median against a baseline median."""
    if target is None:
        ratio = baseline[1] / contender[1]
        return Row(measured, contender, baseline, unit, ratio, "none", None)
    ratio = target.ratio(contender[1], baseline[1])
    return Row(
        measured,
        contender,
        baseline,
        unit,
        ratio,
        target.describe(),
        target.is_met(ratio),
    )


@dataclass
class WorkloadResult:
    """The measurements of one workload, ready to render.

    Attributes:
        title: The workload's heading.
        summary: What runs, how the contenders are set up, why it is fair.
        rows: The table.
        notes: Lines printed under the table (spread, calibration, caveats).
    """

    title: str
    summary: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _format_value(label_value: tuple[str, float] | None, unit: str) -> str:
    if label_value is None:
        return "n/a"
    label, value = label_value
    digits = 1 if unit == "MB" else 3
    return f"{label}: {value:.{digits}f} {unit}"


def _format_met(met: bool | None) -> str:
    if met is None:
        return "n/a"
    return "yes" if met else "**no**"


def render_workload(result: WorkloadResult) -> str:
    """Return the Markdown section of one workload."""
    lines = [
        f"## {result.title}",
        "",
        result.summary,
        "",
        "| Workload | Measured | batchtools (median) | Baseline (median) "
        "| Ratio | Target | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.2f}x"
        cells = [
            result.title,
            row.measured,
            _format_value(row.contender, row.unit),
            _format_value(row.baseline, row.unit),
            ratio,
            row.target,
            _format_met(row.met),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in result.notes)
    lines.append("")
    return "\n".join(lines)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class Session:
    """When a benchmark session started, and how busy the machine was then.

    Attributes:
        started: Wall-clock start, in UTC.
        began: `time.perf_counter` at the start, for the session's duration.
        load_at_start: The 1-minute load average at the start.
    """

    started: datetime.datetime
    began: float
    load_at_start: float

    @classmethod
    def start(cls) -> Session:
        """Record the start of a session now."""
        return cls(
            datetime.datetime.now(datetime.UTC), time.perf_counter(), os.getloadavg()[0]
        )


def machine_description(command: str, session: Session) -> str:
    """Return the intro of the benchmark page: machine, date, load and command."""
    minutes = (time.perf_counter() - session.began) / 60
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return "\n".join(
        [
            "# Benchmarks",
            "",
            "Each workload sets batchtools against the baseline a user would "
            "otherwise reach for. Contenders run interleaved (A, B, A, B, ...) "
            "so that noise from other work on the machine falls on all of them, "
            "and each figure is the median of the runs. A ratio is the "
            "baseline's median over batchtools' median (above 1 means "
            "batchtools is faster), except for targets marked `<=`, where it "
            "is batchtools' figure over the baseline's (an overhead).",
            "",
            f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, "
            f"{platform.system()} {platform.release()}; "
            "shared with other work, so absolute times vary between sessions.",
            f"- Python: {python}.",
            f"- Date: {session.started:%Y-%m-%d %H:%M} UTC; the session took "
            f"{minutes:.1f} minutes. The 1-minute load average was "
            f"{session.load_at_start:.2f} at the start and "
            f"{os.getloadavg()[0]:.2f} at the end.",
            f"- Command: `{command}`.",
            "",
            "![Speed against each baseline](images/benchmarks.png)",
            "",
            "The chart shows each speed ratio of the tables below; bars to "
            "the right of 1x are baselines that batchtools beats. "
            "`bench/plot.py` draws it from this page.",
            "",
        ]
    )


def verdict_summary(results: Sequence[WorkloadResult]) -> str:
    """Return one line counting the targets met, naming the workloads that miss."""
    verdicts = [
        (result.title, row.met)
        for result in results
        for row in result.rows
        if row.met is not None
    ]
    met = sum(1 for _, is_met in verdicts if is_met)
    missed = sorted({title for title, is_met in verdicts if not is_met})
    line = f"Targets met: {met} of {len(verdicts)}."
    if missed:
        line += " Missed in: " + "; ".join(missed) + "."
    return line + "\n"


def parse_options(description: str) -> tuple[Config, Path | None]:
    """Parse the options that every benchmark script accepts.

    Returns:
        The configuration and the path to write the Markdown page to, if any.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer items and {QUICK_RUNS} runs instead of {FULL_RUNS}, "
        "for a smoke run",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the Markdown page to this file (default: print it)",
    )
    options = parser.parse_args()
    runs = QUICK_RUNS if options.quick else FULL_RUNS
    output: Path | None = options.output
    return Config(quick=options.quick, runs=runs), output


def _display_path(path: str) -> str:
    normalized = os.path.normpath(path)
    relative = os.path.relpath(normalized)
    return normalized if relative.startswith("..") else relative


def render_page(results: Sequence[WorkloadResult], session: Session) -> str:
    """Return the whole Markdown page for ``results``."""
    command = " ".join([_display_path(sys.executable), *sys.argv])
    sections = [machine_description(command, session), verdict_summary(results)]
    sections.extend(render_workload(result) for result in results)
    return "\n".join(sections)


def main_for(measure: Callable[[Config], WorkloadResult], description: str) -> None:
    """Run one workload as a script: measure it, then print or write its page."""
    config, output = parse_options(description)
    session = Session.start()
    page = render_page([measure(config)], session)
    if output is None:
        print(page)
    else:
        output.write_text(page)
        log(f"wrote {output}")
