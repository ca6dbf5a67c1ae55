"""Options of the dask backend: which Dask cluster a run uses.

This module does not import dask, so that a run on another backend never
pays for it and the options can be checked where dask is not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchtools._exceptions import ConfigurationError

INSTALL_HINT = "pip install 'pybatchtools[dask]'"
"""The command that installs the packages the dask backend needs."""


# The address schemes of Dask's communication layer.
SCHEDULER_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


MAX_LOCAL_WORKERS = 1024
"""Upper bound on the worker processes of `local_cluster`, far beyond one machine."""


@dataclass(frozen=True, slots=True)
class DaskCluster:
    """The cluster the dask backend runs on: a running one, or one started for the run.

    Pass it as ``backend=`` to `batchtools.run` and its siblings. The
    string ``backend="dask"`` is the same as ``DaskCluster()``: the scheduler
    that Dask's own configuration names (``DASK_SCHEDULER_ADDRESS``), or else
    a local cluster of one worker process per CPU.

    Attributes:
        scheduler: The address of a running scheduler, such as
            ``"tcp://10.0.0.5:8786"``, or a Dask cluster object with a
            ``scheduler_address`` (a dask-jobqueue ``SLURMCluster``, say).
        local_cluster: Start a `distributed.LocalCluster` of this many
            worker processes on this machine, listening on 127.0.0.1 only,
            and close it when the run ends.
        threads_per_worker: Threads of each worker of a local cluster.
        max_in_flight: Dask tasks (each a chunk of attempts) submitted and
            not yet finished; by default twice the cluster's worker threads
            when the run starts.
        connect_timeout: Seconds to wait for the scheduler to accept the
            connection, and then for the first worker to join it.
    """

    scheduler: str | Any = None
    local_cluster: int | None = None
    threads_per_worker: int = 1
    max_in_flight: int | None = None
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.local_cluster is not None:
            raise ConfigurationError(
                f"DaskCluster has both scheduler={self.scheduler!r} and "
                f"local_cluster={self.local_cluster!r}; give one: the address of "
                "a running scheduler, or the number of local workers to start"
            )
        if isinstance(self.scheduler, str):
            address = self.scheduler.strip()
            scheme, separator, _ = address.partition("://")
            if (
                not address
                or any(character.isspace() for character in address)
                or (separator and scheme not in SCHEDULER_SCHEMES)
            ):
                raise ConfigurationError(
                    f"scheduler address {self.scheduler!r} is invalid; give one "
                    "such as tcp://10.0.0.5:8786 (schemes: "
                    f"{', '.join(SCHEDULER_SCHEMES)})"
                )
        elif self.scheduler is not None and not isinstance(
            getattr(self.scheduler, "scheduler_address", None), str
        ):
            raise ConfigurationError(
                f"scheduler={self.scheduler!r} is neither an address such as "
                "tcp://10.0.0.5:8786 nor a Dask cluster object with a "
                "scheduler_address"
            )
        for name in ("local_cluster", "max_in_flight"):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value)
        if self.local_cluster is not None and self.local_cluster > MAX_LOCAL_WORKERS:
            raise ConfigurationError(
                f"DaskCluster local_cluster={self.local_cluster} asks for more than "
                f"{MAX_LOCAL_WORKERS:,} worker processes on one machine; give "
                "fewer, or the scheduler= address of a larger cluster"
            )
        _check_count("threads_per_worker", self.threads_per_worker)
        timeout = self.connect_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigurationError(
                f"DaskCluster connect_timeout={timeout!r} must be a number of "
                "seconds above 0"
            )

    @property
    def address(self) -> str | None:
        """The scheduler's address, if the run connects to a running scheduler."""
        if self.scheduler is None or isinstance(self.scheduler, str):
            return self.scheduler
        address: str = self.scheduler.scheduler_address
        return address

    def describe(self) -> dict[str, Any]:
        """Return the options as JSON data, for the run's description."""
        return {
            "scheduler": self.address,
            "local_cluster": self.local_cluster,
            "threads_per_worker": self.threads_per_worker,
            "max_in_flight": self.max_in_flight,
        }


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"DaskCluster {name}={value!r} must be a whole number of at least 1"
        )


def cluster_backend(
    backend: str | None, scheduler: str | None, local_cluster: int | None
) -> str | DaskCluster | None:
    """Return the ``backend=`` value for command-line style options.

    ``--scheduler`` and ``--local-cluster`` choose the dask backend, and
    ``--backend dask`` alone uses `DaskCluster` defaults.

    Raises:
        ConfigurationError: The cluster options are given with another
            backend, or together.
    """
    if scheduler is None and local_cluster is None:
        return DaskCluster() if backend == "dask" else backend
    if backend not in (None, "dask"):
        option = "--scheduler" if scheduler is not None else "--local-cluster"
        raise ConfigurationError(
            f"{option} applies to the dask backend, but the run uses --backend "
            f"{backend}; give --backend dask or drop {option}"
        )
    if scheduler is not None and local_cluster is not None:
        raise ConfigurationError(
            f"--scheduler {scheduler} and --local-cluster {local_cluster} cannot be "
            "combined; give the address of a running scheduler, or the number of "
            "local workers to start"
        )
    return DaskCluster(scheduler=scheduler, local_cluster=local_cluster)
