"""Workload 5: many `true` commands, 2 at a time, from the command line.

This measures the subprocess backend and the CLI end to end, the way a
user types it: `batchtools run -j 2 true ::: 1 2 ... N`, with its default
journal, which goes under ``.batchtools/`` in a new temporary working
folder for each run. The baselines are the two tools the CLI replaces,
`xargs -P2 -n1 true` (items on standard input) and GNU parallel's
`parallel --will-cite -j2 true ::: ...`. Every contender is timed as a
whole process, including its interpreter's start-up, and writes its output
to /dev/null. The CLI's start-up (the same command with one item) is
reported apart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    Config,
    Target,
    WorkloadResult,
    compare,
    log,
    main_for,
    measure_interleaved,
    median,
    spread,
)

JOBS = 2


def batchtools_executable() -> str:
    """Return the `batchtools` script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "batchtools"
    if beside.exists():
        return str(beside)
    found = shutil.which("batchtools")
    if found is None:
        raise FileNotFoundError(
            "the batchtools command was not found next to the interpreter or on "
            "PATH; install the package with `pip install -e .`"
        )
    return found


def require(program: str) -> str:
    """Return the path of ``program``, or raise with how to install it."""
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(
            f"{program} was not found on PATH; install it "
            "(`make system-packages` installs GNU parallel)"
        )
    return found


def time_command(command: Sequence[str], stdin: bytes | None = None) -> float:
    """Return the seconds ``command`` takes, run in a new temporary folder."""
    folder = tempfile.mkdtemp(prefix="batchtools-bench-")
    try:
        start = time.perf_counter()
        subprocess.run(
            command,
            input=stdin,
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - start
    finally:
        shutil.rmtree(folder)


def measure(config: Config) -> WorkloadResult:
    """Time the batchtools CLI, xargs and GNU parallel on the same commands."""
    count = 200 if config.quick else 2_000
    items = [str(number) for number in range(1, count + 1)]
    lines = ("\n".join(items) + "\n").encode()
    ours = [batchtools_executable(), "run", "-j", str(JOBS), "true", ":::"]
    xargs = [require("xargs"), f"-P{JOBS}", "-n1", "true"]
    parallel = [require("parallel"), "--will-cite", f"-j{JOBS}", "true", ":::"]
    log(f"workload 5: {count:,} `true` commands, {JOBS} at a time")
    samples = measure_interleaved(
        {
            "batchtools start-up": lambda: time_command([*ours, "1"]),
            "batchtools": lambda: time_command([*ours, *items]),
            "xargs": lambda: time_command(xargs, stdin=lines),
            "GNU parallel": lambda: time_command([*parallel, *items]),
        },
        config.runs,
    )
    total = median(samples["batchtools"])
    startup = median(samples["batchtools start-up"])
    measured = f"{count:,} commands, whole process"
    result = WorkloadResult(
        title="5. Commands from the CLI",
        summary=(
            f"`batchtools run -j {JOBS} true ::: 1 ... N` with its default journal "
            f"against `xargs -P{JOBS} -n1 true` (items on standard input) and "
            f"`parallel --will-cite -j{JOBS} true ::: 1 ... N` (GNU parallel). "
            "Each run starts in a new temporary folder, so batchtools writes a "
            "new journal under `.batchtools/` there."
        ),
    )
    rows = [
        ("xargs", "xargs", 1.0),
        ("GNU parallel", "GNU parallel", 5.0),
    ]
    for key, label, bound in rows:
        result.rows.append(
            compare(
                measured,
                ("batchtools run", total),
                (label, median(samples[key])),
                Target("at least", bound),
            )
        )
    rate = count / (total - startup) if total > startup else float("nan")
    result.notes.append(
        f"The CLI's start-up (the same command with one item) takes {startup:.3f} s "
        f"(median); after it, batchtools runs {rate:,.0f} commands a second."
    )
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
