"""The plot of a load test: throughput and latency against concurrency.

Drawn with matplotlib's object API on an Agg canvas, never through
``pyplot``, so that it changes no global state, needs no display and is
safe on any thread. matplotlib is an optional dependency, imported only
here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from batchtools._exceptions import ConfigurationError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from batchtools.observe.loadtest import BenchResult

FORMATS = {".png": "png", ".svg": "svg"}
INSTALL_HINT = "pip install 'pybatchtools[plot]'"


def check_plot_path(path: str | os.PathLike[str]) -> str:
    """Check that a plot can be written to ``path``, before measuring.

    Returns:
        The format, ``png`` or ``svg``.

    Raises:
        ConfigurationError: The extension is neither ``.png`` nor ``.svg``,
            the folder does not exist, or matplotlib is not installed.
    """
    target = Path(path)
    image_format = FORMATS.get(target.suffix.lower())
    if image_format is None:
        raise ConfigurationError(
            f"plot file {os.fspath(path)!r} must end in .png or .svg, which "
            "chooses its format"
        )
    folder = target.parent
    if not folder.is_dir():
        raise ConfigurationError(
            f"plot file {os.fspath(path)!r}: the folder {os.fspath(folder)!r} "
            "does not exist; create it first"
        )
    try:
        import matplotlib  # noqa: F401  (only checks that it is installed)
    except ImportError:
        raise ConfigurationError(
            f"writing the plot {os.fspath(path)!r} needs matplotlib, which is not "
            f"installed; install it with {INSTALL_HINT}"
        ) from None
    return image_format


def write_plot(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Draw ``result`` and write it to ``path`` as PNG or SVG.

    Raises:
        ConfigurationError: See `check_plot_path`.
        OSError: The file cannot be written.
    """
    image_format = check_plot_path(path)
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    throughput_axes, latency_axes = figure.subplots(2, 1, sharex=True)
    _draw_throughput(throughput_axes, result)
    _draw_latency(latency_axes, result)
    jobs = [level.jobs for level in result.levels]
    latency_axes.set_xscale("log", base=2)
    latency_axes.set_xticks(jobs, labels=[str(value) for value in jobs])
    latency_axes.minorticks_off()
    latency_axes.set_xlabel("concurrency (jobs)")
    figure.suptitle("Throughput and latency by concurrency")
    # SVG text stays text rather than glyph outlines: smaller, and searchable.
    with rc_context({"svg.fonttype": "none"}):
        figure.savefig(path, format=image_format, dpi=120)


def _draw_throughput(axes: Axes, result: BenchResult) -> None:
    jobs = [level.jobs for level in result.levels]
    throughput = [level.throughput for level in result.levels]
    axes.plot(jobs, throughput, marker="o", color="tab:blue", label="throughput")

    over = [level for level in result.levels if not level.within_limits]
    if over:
        axes.scatter(
            [level.jobs for level in over],
            [level.throughput for level in over],
            marker="x",
            s=80,
            color="tab:red",
            zorder=3,
            label="breaks a limit",
        )

    recommended = f"{result.recommended} jobs"
    if result.knee == result.recommended:
        recommended += ", also the knee"
    axes.axvline(
        result.recommended,
        linestyle="--",
        color="tab:green",
        label=f"recommended: {recommended}",
    )
    if result.knee != result.recommended:
        axes.axvline(
            result.knee,
            linestyle=":",
            color="tab:gray",
            label=f"knee: {result.knee} jobs",
        )

    axes.set_ylabel("items/s")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")


def _draw_latency(axes: Axes, result: BenchResult) -> None:
    measured = [level for level in result.levels if level.p50 is not None]
    jobs = [level.jobs for level in measured]
    p50 = [_milliseconds(level.p50) for level in measured]
    p99 = [_milliseconds(level.p99) for level in measured]
    axes.plot(jobs, p50, marker="o", color="tab:blue", label="p50")
    axes.plot(jobs, p99, marker="s", color="tab:orange", label="p99")
    if result.max_p99 is not None:
        axes.axhline(
            result.max_p99 * 1000,
            linestyle="--",
            color="tab:red",
            label="p99 limit",
        )
    axes.set_ylabel("latency (ms)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")


def _milliseconds(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000
