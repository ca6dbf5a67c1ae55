"""The Prometheus text exposition format (version 0.0.4) of a metrics snapshot."""

from __future__ import annotations

import math
from typing import Any

from batchtools.engine._outcome import COUNT_KEYS

QUANTILES = (0.5, 0.9, 0.99)
"""The quantiles reported for attempt and item latency, besides the maximum."""

# Families with one sample: name, type, help text, and the path to the value
# in a snapshot.
_SINGLE_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "batchtools_run_elapsed_seconds",
        "gauge",
        "Seconds since the run started, or its duration once it finished.",
        ("elapsed_seconds",),
    ),
    (
        "batchtools_items_from_journal_total",
        "counter",
        "Items whose outcome came from an earlier session of the run.",
        ("items", "from_journal"),
    ),
    (
        "batchtools_attempts_total",
        "counter",
        "Attempts of the items that finished, counted when their item finished.",
        ("attempts",),
    ),
    (
        "batchtools_retries_total",
        "counter",
        "Failed attempts whose item was scheduled to run again.",
        ("retries",),
    ),
    (
        "batchtools_attempts_in_flight",
        "gauge",
        "Attempts executing now.",
        ("in_flight",),
    ),
    (
        "batchtools_items_retrying",
        "gauge",
        "Items waiting out a backoff before their next attempt.",
        ("retrying",),
    ),
    (
        "batchtools_circuit_transitions_total",
        "counter",
        "Changes of state of the run's circuit breakers.",
        ("circuits", "transitions"),
    ),
    (
        "batchtools_circuit_rejected_items_total",
        "counter",
        "Items failed at once because their circuit breaker was open.",
        ("circuits", "rejected_items"),
    ),
    (
        "batchtools_workers_started_total",
        "counter",
        "Worker threads or processes started, replacements included.",
        ("workers", "started"),
    ),
    (
        "batchtools_workers_lost_total",
        "counter",
        "Worker processes that died during an attempt.",
        ("workers", "lost"),
    ),
    (
        "batchtools_workers_recycled_total",
        "counter",
        "Worker processes replaced after their share of items.",
        ("workers", "recycled"),
    ),
    (
        "batchtools_worker_memory_kills_total",
        "counter",
        "Worker processes killed for using more memory than allowed.",
        ("workers", "memory_kills"),
    ),
    (
        "batchtools_abandoned_threads",
        "gauge",
        "Thread attempts given up on (timeout or cancel) whose thread still runs.",
        ("workers", "abandoned_threads"),
    ),
    (
        "batchtools_child_processes",
        "gauge",
        "Descendant processes of the process running the engine.",
        ("child_processes",),
    ),
)


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """Render a `Metrics.snapshot` in the Prometheus text exposition format 0.0.4.

    Names start with ``batchtools_``, counters end in ``_total``, and each
    latency is a summary with ``quantile`` labels plus ``_sum`` and
    ``_count``, next to a gauge of its maximum.
    """
    lines: list[str] = []
    _family(
        lines,
        "batchtools_run_info",
        "gauge",
        "The run being measured, as a label; the value is always 1.",
        [("", _labels(run_id=snapshot["run_id"] or ""), 1)],
    )
    items = snapshot["items"]
    _family(
        lines,
        "batchtools_items_total",
        "counter",
        "Items that reached a final state, by state.",
        [("", _labels(state=state), items[state]) for state in COUNT_KEYS],
    )
    for name, kind, text, path in _SINGLE_FAMILIES:
        value: Any = snapshot
        for key in path:
            value = value.get(key, 0) if isinstance(value, dict) else 0
        _family(lines, name, kind, text, [("", "", value)])
    throughput = snapshot["throughput"]
    _family(
        lines,
        "batchtools_throughput_items_per_second",
        "gauge",
        "Items finished per second, over the whole run and over the recent window.",
        [
            ("", _labels(window="run"), throughput["items_per_second"]),
            (
                "",
                _labels(window=f"{throughput['window_seconds']:g}s"),
                throughput["window_items_per_second"],
            ),
        ],
    )
    latency = snapshot["latency_seconds"]
    _latency_families(lines, "attempt", "an attempt took", latency["attempt"])
    _latency_families(
        lines,
        "item",
        "an item took from the start of its first attempt to the end of its last",
        latency["item"],
    )
    circuits = snapshot["circuits"]
    _family(
        lines,
        "batchtools_circuits",
        "gauge",
        "Circuit breakers that are not closed, by state.",
        [
            ("", _labels(state="open"), circuits["open"]),
            ("", _labels(state="half-open"), circuits["half_open"]),
        ],
    )
    memory = snapshot["memory_bytes"]
    _family(
        lines,
        "batchtools_resident_memory_bytes",
        "gauge",
        "Resident memory of the process running the engine and of its descendants.",
        [
            ("", _labels(process="runner"), memory["runner"]),
            ("", _labels(process="children"), memory["children"]),
        ],
    )
    _family(
        lines,
        "batchtools_resident_memory_peak_bytes",
        "gauge",
        "Peak resident memory: the runner's own, and the largest runner plus "
        "children total seen at a snapshot.",
        [
            ("", _labels(process="runner"), memory["runner_peak"]),
            ("", _labels(process="total"), memory["total_peak"]),
        ],
    )
    return "\n".join(lines) + "\n"


def _latency_families(
    lines: list[str], name: str, text: str, summary: dict[str, Any]
) -> None:
    samples = [
        ("", _labels(quantile=f"{q:g}"), summary[f"p{round(q * 100)}"])
        for q in QUANTILES
    ]
    samples.append(("_sum", "", summary["sum"]))
    samples.append(("_count", "", summary["count"]))
    _family(
        lines,
        f"batchtools_{name}_duration_seconds",
        "summary",
        f"Seconds {text}.",
        samples,
    )
    _family(
        lines,
        f"batchtools_{name}_duration_max_seconds",
        "gauge",
        f"The longest time {text}, in seconds.",
        [("", "", summary["max"])],
    )


def _family(
    lines: list[str],
    name: str,
    kind: str,
    text: str,
    samples: list[tuple[str, str, Any]],
) -> None:
    """Append one family: its HELP and TYPE lines, then ``(suffix, labels, value)``."""
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")
    for suffix, labels, value in samples:
        lines.append(f"{name}{suffix}{labels} {_number(value)}")


def _labels(**pairs: str) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    if value is None:
        return "NaN"  # A quantile of no observations, as Prometheus shows it.
    if isinstance(value, bool | int):
        return str(int(value))
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)
