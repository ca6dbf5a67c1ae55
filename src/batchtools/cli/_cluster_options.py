"""The command-line options that choose a Dask cluster: --scheduler, --local-cluster.

`batchtools run` records them with the run's other options. `resume` and
`retry` take them too, together with --backend, so that a run can finish
on a cluster at a new address, or on this machine alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

_BACKENDS = ["async", "thread", "process", "subprocess", "dask"]
_META = "batchtools.cluster."


def cluster_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --scheduler and --local-cluster to `batchtools run`."""
    command = click.option(
        "--local-cluster",
        metavar="N",
        type=click.IntRange(min=1),
        default=None,
        help="With --backend dask, start a Dask cluster of N worker processes on "
        "this machine for the run.",
    )(command)
    return click.option(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="With --backend dask, run on the Dask cluster whose scheduler is at "
        "ADDRESS, such as tcp://10.0.0.5:8786.",
    )(command)


def cluster_override_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --backend, --scheduler and --local-cluster to `resume` and `retry`.

    Their values go to the click context's meta, where
    `apply_cluster_overrides` reads them, so the commands need no parameter
    of their own.
    """

    def keep(context: click.Context, parameter: click.Parameter, value: Any) -> Any:
        context.meta[f"{_META}{parameter.name}"] = value
        return value

    command = click.option(
        "--local-cluster",
        metavar="N",
        type=click.IntRange(min=1),
        default=None,
        expose_value=False,
        callback=keep,
        help="Run on a new local Dask cluster of N worker processes instead of "
        "the run's own cluster.",
    )(command)
    command = click.option(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        expose_value=False,
        callback=keep,
        help="Run on the Dask scheduler at ADDRESS instead of the run's own.",
    )(command)
    return click.option(
        "--backend",
        type=click.Choice(_BACKENDS),
        default=None,
        expose_value=False,
        callback=keep,
        help="Run on this backend instead of the run's own: a dask run of a "
        "--call function resumes on thread and the other way round, and a dask "
        "run of a command on subprocess.",
    )(command)


def apply_cluster_overrides(options: Any) -> None:
    """Replace the recorded backend and cluster of ``options`` with the ones given.

    ``options`` is the `RunOptions` read from the journal. A new
    --scheduler or --local-cluster replaces both recorded cluster options
    and implies the dask backend, and a --backend other than dask drops them.
    """
    context = click.get_current_context(silent=True)
    if context is None:
        return
    backend = context.meta.get(f"{_META}backend")
    scheduler = context.meta.get(f"{_META}scheduler")
    local_cluster = context.meta.get(f"{_META}local_cluster")
    if scheduler is not None or local_cluster is not None:
        options.scheduler = scheduler
        options.local_cluster = local_cluster
        if backend is None:
            backend = "dask"
    if backend is not None:
        # The CLI records no backend for commands on this machine.
        options.backend = None if backend == "subprocess" else backend
        if backend != "dask":
            options.scheduler = None
            options.local_cluster = None
