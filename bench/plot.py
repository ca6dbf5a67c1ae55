"""Draw the chart of docs/benchmarks.md: batchtools' speed against each baseline.

The chart is read back from the page's tables, so it always shows the
figures of the page next to it. Each bar is one row whose ratio is a speed
(the baseline's time over batchtools'), on a log scale with a line at 1x:
a bar that ends right of the line is a baseline that batchtools beats.
Overheads (`<=` targets), memory rows and start-up rows are left out; the
tables hold them.

Run as ``python bench/plot.py [PAGE] [IMAGE]``; `run_all.py` calls it after
writing the page.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import DOCS_PATH

IMAGE_PATH = DOCS_PATH.parent / "images" / "benchmarks.png"


def speed_rows(page: str) -> list[tuple[str, float]]:
    """Return (label, ratio) for each speed row of the page's tables."""
    rows: list[tuple[str, float]] = []
    for line in page.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[4].endswith("x"):
            continue
        workload, measured, ours, baseline, ratio, target, _ = cells
        if target.startswith("<=") or measured.startswith("start-up"):
            continue
        if ours.endswith(" MB") or "minus start-up" in measured:
            continue
        if baseline.startswith("graphlib"):
            continue  # the share of a graph's time spent sorting, not a rival
        try:
            value = float(ratio[:-1])
        except ValueError:
            continue
        name = workload.split(". ", 1)[-1]
        label = f"{name}: vs {baseline.rsplit(':', 1)[0]}"
        if ":" in ours and not ours.startswith(("batchtools", "with journal")):
            label += f" ({ours.rsplit(':', 1)[0]})"
        rows.append((label, value))
    return rows


def write_chart(page: str, image: Path) -> None:
    """Draw the speed rows of ``page`` into the PNG file ``image``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = speed_rows(page)
    labels = [label for label, _ in rows]
    values = [value for _, value in rows]
    figure, axes = pyplot.subplots(figsize=(10, 0.42 * len(rows) + 1.4))
    colours = ["#2f7d4f" if value >= 1 else "#b8473a" for value in values]
    positions = range(len(rows))
    # Each bar grows from 1x, to the right when batchtools is faster.
    axes.barh(positions, [value - 1 for value in values], left=1, color=colours)
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("baseline's time over batchtools' time (log scale)")
    for position, value in zip(positions, values, strict=True):
        axes.annotate(
            f"{value:.2f}x",
            (value, position),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    axes.set_title("Speed against each baseline, medians of one run")
    figure.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image, dpi=110)
    pyplot.close(figure)


def main() -> None:
    """Draw the chart of the page given, or of docs/benchmarks.md."""
    page = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS_PATH
    image = Path(sys.argv[2]) if len(sys.argv) > 2 else IMAGE_PATH
    write_chart(page.read_text(), image)
    print(f"wrote {image}")


if __name__ == "__main__":
    main()
