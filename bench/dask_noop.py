"""Workload: many no-op items on a Dask cluster of 2 worker processes.

This measures what chunking buys on Dask, where each task costs about as
much as a millisecond of work. Both contenders use the same local cluster of
2 worker processes with one thread each, started once for the workload.
The baseline is plain `Client.map` followed by `Client.gather`, one Dask
task per item, through a client connected before the timing starts. The
batchtools run connects its own client, loads the task on the workers and
closes the client inside the timed call, and it keeps a per-item outcome
for every item.
"""

from __future__ import annotations

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
from _tasks import noop_sync
from distributed import Client

import batchtools
from batchtools.backends._dask import start_local_cluster

WORKERS = 2


def run_batchtools(address: str, count: int) -> None:
    """Run `noop_sync` on ``count`` items on the dask backend and check the report."""
    report = batchtools.run(
        range(count), noop_sync, backend=batchtools.DaskCluster(scheduler=address)
    )
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")


def run_client_map(client: Client, count: int) -> None:
    """Run `noop_sync` on ``count`` items as one Dask task each."""
    futures = client.map(noop_sync, range(count), pure=False)
    client.gather(futures)  # type: ignore[no-untyped-call]
    del futures


def measure(config: Config) -> WorkloadResult:
    """Time the dask backend against plain `Client.map` on the same cluster."""
    count = 2_000 if config.quick else 10_000
    log(f"workload dask: {count:,} no-op items on {WORKERS} Dask worker processes")

    cluster = start_local_cluster(WORKERS, 1)
    client = Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
    try:
        samples = measure_interleaved(
            {
                "batchtools": lambda: time_call(
                    lambda: run_batchtools(cluster.scheduler_address, count)
                ),
                "Client.map": lambda: time_call(lambda: run_client_map(client, count)),
            },
            config.runs,
        )
    finally:
        client.close()  # type: ignore[no-untyped-call]
        cluster.close()

    ours = median(samples["batchtools"])
    result = WorkloadResult(
        title="Dask no-op items",
        summary=(
            "`batchtools.run(range(N), f, backend=DaskCluster(scheduler=...))` "
            "against `client.gather(client.map(f, range(N), pure=False))` on "
            f"the same local cluster of {WORKERS} worker processes with one "
            "thread each, where `f` returns at once. batchtools sends the items "
            "in chunks sized from their measured duration and keeps one outcome "
            "per item; `Client.map` makes one Dask task per item."
        ),
    )
    result.rows.append(
        compare(
            f"{count:,} items, whole call",
            ("batchtools dask backend", ours),
            ("Client.map", median(samples["Client.map"])),
            Target("at least", 10.0),
        )
    )
    result.notes.append(f"batchtools: {ours / count * 1e6:.1f} us per item (median).")
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
