"""Subscribers to engine events: the progress line and the end-of-run summary."""

from batchtools.observe._progress import Progress, format_duration
from batchtools.observe._summary import preview, summary_lines

__all__ = ["Progress", "format_duration", "preview", "summary_lines"]
