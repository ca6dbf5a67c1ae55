"""Subscribers to engine events: the progress line and the end-of-run summary.

The progress line lives in `batchtools.observe._progress`, which imports
rich; it is left out here so that a run without a terminal does not pay
for importing it.
"""

from batchtools.observe._summary import format_duration, preview, summary_lines

__all__ = ["format_duration", "preview", "summary_lines"]
