"""Workload 9: what a dependency graph costs per task, over a plain run.

Two graphs of N single-operation tasks, each an async no-op: a wide one
where no task needs another, and a layered one of 100 layers where each
task needs two tasks of the layer before it. Each runs through
`Graph.run` at concurrency 100, against the same N no-op items through
`batchtools.run` at concurrency 100. Both run on one engine, so the ratio
is what the graph adds per task: its checks, the sorting, and handing
each ready task to the engine as it becomes ready.

The second baseline is graphlib's `TopologicalSorter` driven alone on the
same graph (add every task, prepare, then get_ready and done until no task
is left), which runs nothing: it is the cost of the sorting itself. Its
ratio is that time over the graph's, the share of the graph's time that
the sorting takes. Building the `Graph` with `Graph.add` is outside the
timed call, as building the sorter's input is. The bound of 3x over
`batchtools.run` is this project's own, not a target given from outside.
"""

from __future__ import annotations

import asyncio
import functools
import graphlib
from collections.abc import Callable, Sequence

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
    time_call,
)
from _tasks import noop_async

import batchtools
from batchtools.flow.graph import Graph

CONCURRENCY = 100
LAYERS = 100

Needs = list[Sequence[int]]


async def noop() -> None:
    """Yield to the event loop once, as `noop_async` does, for a task without items."""
    await asyncio.sleep(0)


def wide_needs(count: int) -> Needs:
    """Return the needs of a graph where no task needs another."""
    return [() for _ in range(count)]


def layered_needs(count: int) -> Needs:
    """Return the needs of ``LAYERS`` layers, each task needing two of the layer before.

    Task ``i`` of a layer needs tasks ``i`` and ``i + 1`` (wrapping around)
    of the previous layer, so no task can start before its layer's turn.
    """
    width = count // LAYERS
    needs: Needs = []
    for number in range(count):
        layer, index = divmod(number, width)
        if layer == 0:
            needs.append(())
            continue
        first = (layer - 1) * width
        needs.append((first + index, first + (index + 1) % width))
    return needs


def build_graph(needs: Needs) -> Graph:
    """Return a graph of no-op tasks named by number, with ``needs``."""
    graph = Graph()
    for number, needed in enumerate(needs):
        graph.add(number, noop, needs=needed)
    return graph


def run_graph(needs: Needs) -> float:
    """Time one run of the graph; building it is outside the timed call."""
    graph = build_graph(needs)

    def go() -> None:
        report = graph.run(concurrency=CONCURRENCY)
        if not report.ok or report.counts["succeeded"] != len(needs):
            raise RuntimeError(f"the graph did not finish every task: {report!r}")

    return time_call(go)


def run_items(count: int) -> float:
    """Time `batchtools.run` on ``count`` no-op items."""

    def go() -> None:
        report = batchtools.run(range(count), noop_async, concurrency=CONCURRENCY)
        if not report.ok or report.total != count:
            raise RuntimeError(f"the run did not finish every item: {report!r}")

    return time_call(go)


def sort_only(needs: Needs) -> float:
    """Time graphlib alone: add every task, prepare, then get_ready and done."""

    def go() -> None:
        sorter: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter()
        for number, needed in enumerate(needs):
            sorter.add(number, *needed)
        sorter.prepare()
        while sorter.is_active():
            sorter.done(*sorter.get_ready())

    return time_call(go)


def measure(config: Config) -> WorkloadResult:
    """Time both graphs against `batchtools.run` and against graphlib alone."""
    count = 20_000 if config.quick else 100_000
    shapes = {"wide": wide_needs(count), "layered": layered_needs(count)}
    log(f"workload 9: graphs of {count:,} async no-op tasks against a plain run")

    contenders: dict[str, Callable[[], float]] = {"run": lambda: run_items(count)}
    for shape, needs in shapes.items():
        contenders[f"{shape} graph"] = functools.partial(run_graph, needs)
        contenders[f"{shape} graphlib"] = functools.partial(sort_only, needs)
    samples = measure_interleaved(contenders, config.runs)

    result = WorkloadResult(
        title="9. Graph overhead",
        summary=(
            f"`Graph.run(concurrency={CONCURRENCY})` on {count:,} tasks of "
            "`async def noop(): await asyncio.sleep(0)`, in two shapes. In the "
            "wide graph no task needs another. In the layered one there are "
            f"{LAYERS} layers, and each task needs two of the layer before. The "
            "target compares the graph's time with "
            f"`batchtools.run(range(N), noop, concurrency={CONCURRENCY})`. The "
            "second row drives graphlib's `TopologicalSorter` alone on the same "
            "graph. Its ratio, graphlib's time over the graph's, has no target "
            "and shows the share that sorting takes. Building the graph is not "
            "timed."
        ),
    )
    baseline = median(samples["run"])
    for shape in shapes:
        ours = (f"{shape} graph", median(samples[f"{shape} graph"]))
        measured = f"{count:,} tasks, {shape}, whole call"
        plain = ("batchtools.run", baseline)
        result.rows.append(compare(measured, ours, plain, Target("at most", 3.0)))
        sorting = median(samples[f"{shape} graphlib"])
        result.rows.append(compare(measured, ours, ("graphlib alone", sorting), None))
        per_task_us = (ours[1] - baseline) / count * 1e6
        result.notes.append(
            f"{shape}: {per_task_us:.1f} us per task over a plain run (median)."
        )
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
