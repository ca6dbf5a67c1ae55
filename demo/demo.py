"""The main job on real input: syntax-check the standard library, three ways.

1. ``batchtools run`` compiles every ``.py`` file of this interpreter's
   standard library (``site-packages`` left out) with a journal, and prints
   its summary. Some of those files are deliberately invalid (test data of
   the standard library), so the run has real failures, grouped by cause.
2. The same job again, interrupted with SIGINT part-way, then finished
   with ``batchtools resume``; ``batchtools status`` shows the counts.
3. The Python API over the same files on the process backend.

Everything it writes goes to ``demo-out/``.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import batchtools
from batchtools.observe import summary_lines

HERE = Path(__file__).resolve().parent
OUT = Path("demo-out")
BATCHTOOLS = str(Path(sys.executable).parent / "batchtools")
CHECK = [sys.executable, "-I", "-S", str(HERE / "check_syntax.py")]


def stdlib_files() -> list[str]:
    """Return the standard library's ``.py`` files, ``site-packages`` left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        files.append(str(path))
    return files


def heading(text: str) -> None:
    """Print a section heading."""
    print(f"\n=== {text} ===", flush=True)


def run_cli(*args: str, check: bool = False) -> int:
    """Run the batchtools command, showing it first; return its exit status."""
    print("$ batchtools " + " ".join(args), flush=True)
    status = subprocess.run([BATCHTOOLS, *args], check=False).returncode
    print(f"(exit status {status})", flush=True)
    if check and status not in (0, 1):
        sys.exit(f"demo: batchtools exited with {status}")
    return status


def succeeded_count(journal: Path) -> int:
    """Return how many items the journal has committed as succeeded."""
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM items WHERE state = 'succeeded'"
            ).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def interrupted_run(file_list: Path, total: int) -> None:
    """Start a run, interrupt it with SIGINT part-way, then resume it."""
    journal = OUT / "interrupted.db"
    args = ["run", "-q", "-j", "2", "--journal", str(journal), "--", *CHECK, "{}"]
    args += ["::::", str(file_list)]
    print("$ batchtools " + " ".join(args) + "   # interrupted below", flush=True)
    process = subprocess.Popen(
        [BATCHTOOLS, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = max(total // 4, 1)
    deadline = time.monotonic() + 300
    while succeeded_count(journal) < target and process.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    print(stderr.decode(errors="replace").strip())
    print(f"(exit status {process.returncode}; 130 means interrupted by SIGINT)")
    print(f"committed before the interruption: {succeeded_count(journal)} of {total}")
    run_cli("status", str(journal))
    run_cli("resume", "-q", str(journal), check=True)
    run_cli("status", str(journal))


def api_run(files: list[str]) -> None:
    """Check the same files through the Python API on the process backend."""
    from check_syntax import check

    print(
        "batchtools.run(files, check, backend='process', journal='demo-out/api.db')",
        flush=True,
    )
    report = batchtools.run(files, check, backend="process", journal=OUT / "api.db")
    for line in summary_lines(report, groups=5):
        print(line)


def main() -> None:
    """Run the three parts of the demo."""
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.db*"):
        old.unlink()
    files = stdlib_files()
    file_list = OUT / "stdlib-files.txt"
    file_list.write_text("".join(f"{f}\n" for f in files))
    print(f"{len(files)} .py files under {sysconfig.get_paths()['stdlib']}")

    heading("1. batchtools run over the standard library, with a journal")
    run_cli(
        "run",
        "--journal",
        str(OUT / "stdlib.db"),
        "--results",
        str(OUT / "results"),
        "--",
        *CHECK,
        "{}",
        "::::",
        str(file_list),
        check=True,
    )
    run_cli("status", "--json", str(OUT / "stdlib.db"))

    heading("2. an interrupted run, then batchtools resume")
    interrupted_run(file_list, len(files))

    heading("3. the Python API on the process backend")
    sys.path.insert(0, str(HERE))
    api_run(files)


if __name__ == "__main__":
    main()
