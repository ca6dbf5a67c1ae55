"""Workload 8: what each policy costs per attempt when it never has to act.

The same run of async no-op items, concurrency 100, without a journal, once
without any policy and once with each policy switched on but set so that it
never delays or fails anything: a rate limit far above the achieved rate, a
circuit breaker that stays closed, a fallback chain of one strategy, a
memory floor of one byte, an in-memory result cache that every item misses
(so each pays a lookup and a store), an adaptive concurrency limit that
starts at the fixed run's 100 and may only move between 50 and 100. The
ratio is the time with the policy over the time without, so it is the
policy's own bookkeeping per attempt. The bound of 1.25x is this project's
own, not a target given from outside.
"""

from __future__ import annotations

from collections.abc import Callable

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
from batchtools import (
    Cache,
    CircuitBreaker,
    Concurrency,
    Fallback,
    Memory,
    RateLimit,
)

CONCURRENCY = 100


def runner(count: int, policy: str) -> Callable[[], None]:
    """Return a call that runs ``count`` items with the named policy on."""

    def run() -> None:
        task: object = noop_async
        policies: list[object] = []
        if policy == "rate limit":
            policies.append(RateLimit(1e9, burst=1_000_000))
        elif policy == "circuit breaker":
            policies.append(CircuitBreaker())
        elif policy == "fallback":
            task = Fallback(noop_async)
        elif policy == "memory floor":
            policies.append(Memory(free=1))
        elif policy == "result cache":
            policies.append(Cache(max_entries=count))
        concurrency: int | Concurrency = CONCURRENCY
        if policy == "adaptive limit":
            concurrency = Concurrency(
                min=CONCURRENCY // 2, max=CONCURRENCY, initial=CONCURRENCY
            )
        report = batchtools.run(
            range(count), task, concurrency=concurrency, policies=policies
        )
        if not report.ok or report.total != count:
            raise RuntimeError(f"the run did not finish every item: {report!r}")

    return run


def measure(config: Config) -> WorkloadResult:
    """Time a run with each policy against the same run without policies."""
    count = 20_000 if config.quick else 100_000
    names = [
        "no policy",
        "rate limit",
        "circuit breaker",
        "fallback",
        "memory floor",
        "result cache",
        "adaptive limit",
    ]
    log(f"workload 8: {count:,} async no-op items, each policy against none")
    samples = measure_interleaved(
        {name: _timer(count, name) for name in names}, config.runs
    )
    baseline = median(samples["no policy"])
    result = WorkloadResult(
        title="8. Policy overhead",
        summary=(
            f"`batchtools.run(range(N), noop, concurrency={CONCURRENCY}, "
            "policies=[...])` with one policy that never acts, against the same "
            "run without policies: `RateLimit(1e9, burst=1_000_000)`, "
            "`CircuitBreaker()` on a task that never fails, `Fallback(noop)`, "
            "`Memory(free=1)`, `Cache()` that every item misses, and "
            "`concurrency=Concurrency(min=50, max=100, initial=100)`. The ratio "
            "is the time with the policy over the time without."
        ),
    )
    for name in names[1:]:
        result.rows.append(
            compare(
                f"{count:,} items, whole call",
                (name, median(samples[name])),
                ("no policy", baseline),
                Target("at most", 1.25),
            )
        )
    result.notes.append(spread(samples, "s"))
    return result


def _timer(count: int, policy: str) -> Callable[[], float]:
    run = runner(count, policy)
    return lambda: time_call(run)


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
