"""The HTML report of a run: one self-contained page read from the journal.

`write_html` writes a single file with inline CSS, inline SVG and one inline
script, so it opens anywhere without network access: no fonts, images or
scripts are loaded, and the page's Content-Security-Policy forbids loading
any. It shows the summary, the failure groups, the slowest items, a
histogram of attempt durations, the throughput over time and a timeline
of attempts per job slot.

The page stays small for runs of millions of items. The histogram and the
throughput are aggregated in SQL into at most a few hundred bins. The
timeline draws at most `MAX_BARS` attempts: every failed attempt first (up
to half of them), then the successes of every k-th item, and the page states
how many it shows.

Items and error messages are hostile input. Every text from the journal
is HTML-escaped, the timeline's data is JSON with ``<``, ``>`` and ``&``
escaped, and the script puts text into the page only through
``textContent``. The policy allows only the page's own script, by hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import time
from importlib import metadata
from typing import Any

from batchtools.engine._engine import error_from_json
from batchtools.engine._outcome import cause_of
from batchtools.fs.atomic import atomic_write
from batchtools.journal import JournalReader, TimelineSample
from batchtools.observe._summary import format_duration, preview
from batchtools.observe.report import JournalReport, read_report

__all__ = ["MAX_BARS", "render_html", "write_html"]

MAX_BARS = 20_000
"""The maximum number of attempts the timeline draws."""

BINS_PER_DECADE = 5
"""Bins of the duration histogram per factor of ten."""

MAX_THROUGHPUT_BINS = 120

# Widths of a throughput bin, in seconds; the smallest that gives at most
# MAX_THROUGHPUT_BINS bins is used.
_BIN_WIDTHS = (
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    *(1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600),
    *(7200, 10800, 21600, 43200, 86400, 172800, 604800),
)

# Timeline bar kinds, in drawing order: failures are drawn last, on top.
_KINDS = ("succeeded", "succeeded-after-retry", "retried", "failed")
_KIND_LABELS = (
    "succeeded at the first attempt",
    "succeeded after a retry",
    "failed, then retried",
    "failed for good",
)

_WIDTH = 960
_MARGIN_LEFT = 64
_MARGIN_RIGHT = 16
_MARGIN_TOP = 12
_MARGIN_BOTTOM = 34
_CHART_HEIGHT = 220


def write_html(
    journal: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    top: int = 10,
    groups: int = 20,
    max_bars: int = MAX_BARS,
) -> None:
    """Write the HTML report of the run in ``journal`` to the file ``out``.

    The file is replaced in one step and made readable by its owner only,
    like the journal, because it shows items and errors.

    Args:
        journal: The journal file; a live run's journal is read as committed.
        out: The page to write.
        top: How many of the slowest items to list.
        groups: How many failure groups to list.
        max_bars: The maximum number of attempts the timeline draws.

    Raises:
        JournalError: The journal is missing, damaged or cannot be read.
        OSError: The page cannot be written.
    """
    page = render_html(journal, top=top, groups=groups, max_bars=max_bars)
    atomic_write(out, page, mode=0o600)


def render_html(
    journal: str | os.PathLike[str],
    *,
    top: int = 10,
    groups: int = 20,
    max_bars: int = MAX_BARS,
) -> str:
    """Return the HTML report of the run in ``journal``; see `write_html`.

    Raises:
        JournalError: The journal is missing, damaged or cannot be read.
    """
    report = read_report(journal, top=top)
    with JournalReader(journal) as reader:
        histogram = reader.duration_histogram(BINS_PER_DECADE)
        throughput: tuple[float, float, dict[tuple[int, str], int]] | None = None
        if report.span is not None:
            start, end = report.span
            width = _throughput_bin_width(end - start)
            throughput = (start, width, reader.completions(start, width))
        timeline = reader.timeline(max_bars)
    return _page(report, histogram, throughput, timeline, groups, max_bars)


# -- the page -------------------------------------------------------------------


def _page(
    report: JournalReport,
    histogram: dict[int, int],
    throughput: tuple[float, float, dict[tuple[int, str], int]] | None,
    timeline: TimelineSample,
    groups: int,
    limit: int,
) -> str:
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    policy = (
        "default-src 'none'; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    title = f"batchtools report: run {report.run.run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<header><h1>{_escape(title)}</h1>",
        f'<span class="state state-{_escape(report.state)}">'
        f"{_escape(report.state)}</span></header>",
        _summary_section(report),
        _failures_section(report, groups),
        _slowest_section(report),
        _section(
            "latency",
            "Attempt durations",
            "How many attempts took how long, on a log scale with "
            f"{BINS_PER_DECADE} bins per factor of ten.",
            _histogram_svg(histogram),
        ),
        _section(
            "throughput",
            "Throughput",
            "Items that ended per second, over the run.",
            _throughput_svg(throughput),
        ),
        _timeline_section(timeline, report, limit),
        f"<footer>Made by batchtools {_escape(_version())} on "
        f"{_escape(_when(time.time()))} from {_escape(str(report.path))}.</footer>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _section(name: str, heading: str, note: str, body: str) -> str:
    return (
        f'<section id="{name}"><h2>{_escape(heading)}</h2>'
        f'<p class="note">{_escape(note)}</p>{body}</section>'
    )


def _summary_section(report: JournalReport) -> str:
    run = report.run
    total = sum(report.counts.values())
    ended = report.counts["succeeded"] + report.counts["failed"]
    rate = ended / report.duration if report.duration > 0 else 0.0
    facts = [
        ("Run id", run.run_id),
        ("State", report.state),
        ("Journal", str(report.path)),
        ("Created", _when(run.created)),
        ("Sessions", str(run.session)),
        ("Items", f"{total:,}" + ("" if run.input_complete else " read so far")),
        ("Attempts", f"{report.attempts:,}, {report.failed_attempts:,} failed"),
    ]
    if report.span is not None:
        facts.append(("First attempt", _when(report.span[0])))
        facts.append(("Last attempt ended", _when(report.span[1])))
        facts.append(("Duration", format_duration(report.duration)))
        facts.append(("Throughput", f"{rate:,.1f} items/s"))
    rows = "".join(
        f"<tr><th>{_escape(name)}</th><td>{_escape(value)}</td></tr>"
        for name, value in facts
    )
    tiles = "".join(
        f'<div class="tile tile-{name}"><span class="count">{count:,}</span>'
        f"<span>{name}</span></div>"
        for name, count in report.counts.items()
        if count or name in ("succeeded", "failed")
    )
    return (
        '<section id="summary"><h2>Summary</h2>'
        f'<div class="tiles">{tiles}</div><table class="facts">{rows}</table>'
        "</section>"
    )


def _failures_section(report: JournalReport, groups: int) -> str:
    common = report.failures.most_common()
    if not common:
        body = '<p class="empty">No item failed.</p>'
    else:
        rows = []
        for group in common[:groups]:
            examples = "".join(
                f"<li><code>{_escape(key[:16])}</code> {_escape(preview(item))}</li>"
                for key, item in zip(group.examples, group.items, strict=True)
            )
            rows.append(
                f'<tr><td class="number">{group.count:,}</td>'
                f"<td><code>{_escape(group.cause)}</code></td>"
                f"<td><ul>{examples}</ul></td></tr>"
            )
        more = ""
        if len(common) > groups:
            more = f'<p class="note">... and {len(common) - groups} more causes.</p>'
        body = (
            "<table><thead><tr><th>Items</th><th>Cause</th><th>Examples</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"
        )
    return (
        '<section id="failures"><h2>Failures by cause</h2>'
        '<p class="note">Numbers, paths and hex ids in messages are masked, so '
        "that failures that differ only in those fall into one group.</p>"
        f"{body}</section>"
    )


def _slowest_section(report: JournalReport) -> str:
    if not report.slowest:
        body = '<p class="empty">No attempt durations are recorded.</p>'
    else:
        rows = []
        for item in report.slowest:
            started = (
                _when(item.ended - item.duration)
                if item.ended is not None and item.duration is not None
                else ""
            )
            rows.append(
                f'<tr><td class="number">{_escape(_seconds(item.duration))}</td>'
                f"<td><code>{_escape(item.key[:16])}</code></td>"
                f"<td>{_escape(preview(item.item))}</td>"
                f"<td>{_escape(item.state)}</td>"
                f'<td class="number">{item.attempts}</td>'
                f"<td>{_escape(started)}</td>"
                f'<td class="number">{"" if item.slot is None else item.slot}</td>'
                f"<td>{_escape(item.worker or '')}</td></tr>"
            )
        body = (
            "<table><thead><tr><th>Last attempt</th><th>Key</th><th>Item</th>"
            "<th>State</th><th>Attempts</th><th>Started</th><th>Slot</th>"
            f"<th>Worker</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    return (
        '<section id="slowest"><h2>Slowest items</h2>'
        '<p class="note">By the duration of their last attempt.</p>'
        f"{body}</section>"
    )


# -- charts -----------------------------------------------------------------------


def _histogram_svg(bins: dict[int, int]) -> str:
    if not bins:
        return '<p class="empty">No attempt durations are recorded.</p>'
    low, high = min(bins), max(bins)

    count = high - low + 1
    peak = max(bins.values())
    plot_width = _WIDTH - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = _CHART_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM
    step = plot_width / count

    marks = []
    for index in range(low, high + 1):
        value = bins.get(index, 0)
        if not value:
            continue
        height = max(1.0, value / peak * plot_height)
        x = _MARGIN_LEFT + (index - low) * step
        y = _MARGIN_TOP + plot_height - height
        lower = 10 ** (index / BINS_PER_DECADE)
        upper = 10 ** ((index + 1) / BINS_PER_DECADE)
        label = f"{_seconds(lower)} to {_seconds(upper)}: {value:,} attempts"
        marks.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" '
            f'width="{max(step - 2, 1):.1f}" height="{height:.1f}">'
            f"<title>{_escape(label)}</title></rect>"
        )
    ticks = []
    for index in range(low, high + 2):
        if index % BINS_PER_DECADE:
            continue
        x = _MARGIN_LEFT + (index - low) * step
        ticks.append(_x_tick(x, _seconds(10 ** (index / BINS_PER_DECADE))))
    return _chart_svg("latency-chart", marks, ticks, peak, "attempts")


def _throughput_svg(
    throughput: tuple[float, float, dict[tuple[int, str], int]] | None,
) -> str:
    if throughput is None or not throughput[2]:
        return '<p class="empty">No item has ended yet.</p>'
    start, width, counts = throughput
    bins = max(index for index, _ in counts) + 1
    totals = [0] * bins
    for (index, _), value in counts.items():
        totals[index] += value
    peak = max(totals) / width
    plot_width = _WIDTH - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = _CHART_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM
    step = plot_width / bins

    marks = []
    for index in range(bins):
        base = float(_MARGIN_TOP + plot_height)
        for state in ("succeeded", "failed"):
            value = counts.get((index, state), 0)
            if not value:
                continue
            rate = value / width
            height = max(1.0, rate / peak * plot_height)
            base -= height
            label = (
                f"{_offset(index * width)} to {_offset((index + 1) * width)}: "
                f"{value:,} {state} ({rate:,.1f} items/s)"
            )
            marks.append(
                f'<rect class="bar {state}" x="{_MARGIN_LEFT + index * step:.1f}" '
                f'y="{base:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
                f'height="{height:.1f}"><title>{_escape(label)}</title></rect>'
            )

    ticks = []
    for tick in range(6):
        offset = bins * width * tick / 5
        ticks.append(_x_tick(_MARGIN_LEFT + plot_width * tick / 5, _offset(offset)))
    legend = (
        '<p class="legend"><span class="swatch succeeded"></span>succeeded '
        '<span class="swatch failed"></span>failed '
        f"(bins of {_escape(_seconds(width))} from {_escape(_when(start))})</p>"
    )
    return legend + _chart_svg("throughput-chart", marks, ticks, peak, "items/s")


def _chart_svg(
    name: str, marks: list[str], ticks: list[str], peak: float, unit: str
) -> str:
    plot_height = _CHART_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM
    axis_y = _MARGIN_TOP + plot_height
    axes = (
        f'<line class="axis" x1="{_MARGIN_LEFT}" y1="{axis_y}" '
        f'x2="{_WIDTH - _MARGIN_RIGHT}" y2="{axis_y}"/>'
        f'<line class="axis" x1="{_MARGIN_LEFT}" y1="{_MARGIN_TOP}" '
        f'x2="{_MARGIN_LEFT}" y2="{axis_y}"/>'
        f'<text class="label" x="{_MARGIN_LEFT - 6}" y="{_MARGIN_TOP + 4}" '
        f'text-anchor="end">{_escape(_number(peak))}</text>'
        f'<text class="label" x="{_MARGIN_LEFT - 6}" y="{axis_y}" '
        'text-anchor="end">0</text>'
        f'<text class="label" x="{_MARGIN_LEFT - 6}" y="{_MARGIN_TOP + 18}" '
        f'text-anchor="end">{_escape(unit)}</text>'
    )
    return (
        f'<svg class="chart" id="{name}" viewBox="0 0 {_WIDTH} {_CHART_HEIGHT}" '
        f'role="img">{axes}{"".join(ticks)}{"".join(marks)}</svg>'
    )


def _x_tick(x: float, label: str) -> str:
    axis_y = _CHART_HEIGHT - _MARGIN_BOTTOM
    return (
        f'<line class="tick" x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" '
        f'y2="{axis_y + 4}"/><text class="label" x="{x:.1f}" y="{axis_y + 18}" '
        f'text-anchor="middle">{_escape(label)}</text>'
    )


def _timeline_section(
    timeline: TimelineSample, report: JournalReport, limit: int
) -> str:
    if not timeline.attempts or report.span is None:
        body = '<p class="empty">No attempts are recorded.</p>'
        return _section("timeline", "Timeline of attempts", "", body)
    start = report.span[0]
    slots = sorted({a.slot for a in timeline.attempts if a.slot is not None})
    rows = {slot: row for row, slot in enumerate(slots)}
    unknown_row = len(slots)
    labels = [f"slot {slot}" for slot in slots]
    if any(a.slot is None for a in timeline.attempts):
        labels.append("slot unknown")

    causes: dict[str, int] = {}
    bars: list[tuple[int, list[Any]]] = []
    for attempt in timeline.attempts:
        if attempt.outcome == "succeeded":
            kind = 1 if attempt.number > 1 else 0
        else:
            kind = 3 if attempt.outcome == "failed" else 2
        row = unknown_row if attempt.slot is None else rows[attempt.slot]
        bar: list[Any] = [
            round((attempt.started - start) * 1000, 1),
            round(attempt.duration * 1000, 1),
            row,
            kind,
            attempt.seq + 1,
            attempt.number,
            attempt.worker or "",
        ]
        if kind >= 2:
            error = error_from_json(attempt.error)
            cause = cause_of(error) if error is not None else "unknown error"
            bar.append(causes.setdefault(cause, len(causes)))
            bar.append(attempt.key[:16])
        bars.append((kind, bar))
    bars.sort(key=lambda entry: entry[0])

    data = {
        "end": round((report.span[1] - start) * 1000, 1),
        "rows": labels,
        "kinds": list(_KINDS),
        "labels": list(_KIND_LABELS),
        "bars": [bar for _, bar in bars],
        "causes": list(causes),
    }

    shown = len(timeline.attempts)
    if shown == timeline.total:
        note = f"All {shown:,} attempts, one row per job slot."
    else:
        note = (
            f"{shown:,} of {timeline.total:,} attempts, one row per job slot: "
            f"{timeline.failed_shown:,} of the {timeline.failed_total:,} failed "
            "attempts, and the successes of "
            + (
                "every item"
                if timeline.every == 1
                else f"one item in every {timeline.every:,}"
            )
            + f". The timeline draws at most {limit:,} attempts."
        )
    legend = "".join(
        f'<span class="swatch {kind}"></span>{_escape(label)} '
        for kind, label in zip(_KINDS, _KIND_LABELS, strict=True)
    )
    body = (
        f'<p class="legend">{legend}</p>'
        '<svg class="chart" id="timeline-chart" role="img"></svg>'
        '<div id="tooltip" class="tooltip" hidden></div>'
        '<script type="application/json" id="timeline-data">'
        f"{_script_json(data)}</script>"
    )
    return _section("timeline", "Timeline of attempts", note, body)


# -- formatting ---------------------------------------------------------------------


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _script_json(data: Any) -> str:
    """Return ``data`` as JSON that cannot end the script element holding it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _throughput_bin_width(span: float) -> float:
    for width in _BIN_WIDTHS:
        if span / width <= MAX_THROUGHPUT_BINS:
            return float(width)
    return float(math.ceil(span / MAX_THROUGHPUT_BINS))


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    if value < 1e-3:
        return f"{value * 1e6:.3g} us"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    if value < 60:
        return f"{value:.3g} s"
    return format_duration(value)


def _offset(seconds: float) -> str:
    return "+" + _seconds(seconds) if seconds else "0"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _version() -> str:
    try:
        return metadata.version("pybatchtools")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1000px;padding:16px;color:#222;background:#fff;font-size:14px}
header{display:flex;align-items:center;gap:12px}
h1{font-size:20px;margin:8px 0}h2{font-size:16px;margin:24px 0 4px}
.state{padding:2px 8px;border-radius:10px;background:#ddd;font-size:12px}
.state-finished{background:#d8ecd4}.state-running{background:#d4e4f4}
.state-interrupted{background:#f6e2c2}
.note{color:#555;margin:2px 0 8px}.empty{color:#777;font-style:italic}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eee;
vertical-align:top;overflow-wrap:anywhere}
td.number{text-align:right;white-space:nowrap}
table.facts th{width:160px;color:#555;font-weight:normal}
ul{margin:0;padding-left:16px}code{font-size:12px}
.tiles{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:80px}
.tile .count{display:block;font-size:20px;font-weight:600}
.tile-failed .count{color:#c0392b}.tile-succeeded .count{color:#2e7d32}
svg.chart{width:100%;height:auto;display:block}
.axis,.tick{stroke:#888;stroke-width:1}.label{font-size:11px;fill:#555}
.bar{fill:#4e79a7}.bar.succeeded{fill:#59a14f}.bar.failed{fill:#e15759}
.legend{margin:4px 0}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;
vertical-align:middle;border-radius:2px}
.swatch.succeeded{background:#59a14f}.swatch.succeeded-after-retry{background:#76b7b2}
.swatch.retried{background:#f28e2b}.swatch.failed{background:#e15759}
rect.succeeded{fill:#59a14f}rect.succeeded-after-retry{fill:#76b7b2}
rect.retried{fill:#f28e2b}rect.failed{fill:#e15759}
.tooltip{position:fixed;pointer-events:none;background:#222;color:#fff;
padding:4px 8px;border-radius:4px;font-size:12px;white-space:pre;max-width:480px;
overflow:hidden}
footer{margin-top:24px;color:#777;font-size:12px}
"""

# Draws the timeline from its JSON data. Text goes in through textContent only.
_SCRIPT = """
(function () {
  "use strict";
  var source = document.getElementById("timeline-data");
  var svg = document.getElementById("timeline-chart");
  if (!source || !svg) { return; }
  var data = JSON.parse(source.textContent);
  var NS = "http://www.w3.org/2000/svg";
  var width = 960, left = 72, right = 16, top = 8, bottom = 30;
  var rows = data.rows.length;
  var rowHeight = rows > 60 ? Math.max(2, 840 / rows) : 16;
  var height = top + bottom + rowHeight * rows;
  var plot = width - left - right;
  var scale = plot / Math.max(data.end, 1);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  function element(name, attributes, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attributes).forEach(function (key) {
      node.setAttribute(key, attributes[key]);
    });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function seconds(ms) {
    if (ms < 1) { return (ms * 1000).toPrecision(3) + " us"; }
    if (ms < 1000) { return ms.toPrecision(3) + " ms"; }
    if (ms < 60000) { return (ms / 1000).toPrecision(3) + " s"; }
    return (ms / 60000).toFixed(1) + " min";
  }
  var fragment = document.createDocumentFragment();
  var axisY = top + rowHeight * rows;
  fragment.appendChild(element("line", {"class": "axis", x1: left, y1: axisY,
    x2: width - right, y2: axisY}));
  for (var tick = 0; tick <= 5; tick++) {
    var x = left + plot * tick / 5;
    fragment.appendChild(element("line", {"class": "tick", x1: x, y1: axisY,
      x2: x, y2: axisY + 4}));
    fragment.appendChild(element("text", {"class": "label", x: x, y: axisY + 18,
      "text-anchor": "middle"}, tick ? "+" + seconds(data.end * tick / 5) : "0"));
  }
  if (rowHeight >= 10) {
    data.rows.forEach(function (label, row) {
      fragment.appendChild(element("text", {"class": "label", x: left - 6,
        y: top + row * rowHeight + rowHeight * 0.7, "text-anchor": "end"}, label));
    });
  }
  var barHeight = Math.max(rowHeight - 2, 1);
  data.bars.forEach(function (bar, index) {
    fragment.appendChild(element("rect", {
      "class": data.kinds[bar[3]],
      x: (left + bar[0] * scale).toFixed(1),
      y: (top + bar[2] * rowHeight + 1).toFixed(1),
      width: Math.max(bar[1] * scale, 1).toFixed(1),
      height: barHeight.toFixed(1),
      "data-index": index
    }));
  });
  svg.appendChild(fragment);
  var tooltip = document.getElementById("tooltip");
  svg.addEventListener("mousemove", function (event) {
    var index = event.target.getAttribute("data-index");
    if (index === null) { tooltip.hidden = true; return; }
    var bar = data.bars[Number(index)];
    var lines = [
      "item " + bar[4] + ", attempt " + bar[5] + ": " + data.labels[bar[3]],
      "started +" + seconds(bar[0]) + ", took " + seconds(bar[1]),
      data.rows[bar[2]] + (bar[6] ? ", " + bar[6] : "")
    ];
    if (bar.length > 7) {
      lines.push("key " + bar[8]);
      lines.push(data.causes[bar[7]]);
    }
    tooltip.textContent = lines.join("\\n");
    tooltip.style.left = (event.clientX + 12) + "px";
    tooltip.style.top = (event.clientY + 12) + "px";
    tooltip.hidden = false;
  });
  svg.addEventListener("mouseleave", function () { tooltip.hidden = true; });
})();
"""
