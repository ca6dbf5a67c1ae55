"""A Dask scheduler with one worker, in a process of its own, for tests to kill.

Run as ``python -m tests.backends.dask_scheduler``. It prints the
scheduler's address on the first line of stdout and serves until its stdin
closes. The worker is a thread of this same process, so a SIGKILL to this
process takes the scheduler and the worker down at once.
"""

from __future__ import annotations

import sys

from distributed import LocalCluster


def main() -> None:
    """Start the scheduler and worker, print the address, serve until stdin closes."""
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"allowed_failures": 0, "dashboard": False},
    )
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
    cluster.close()


if __name__ == "__main__":
    main()
