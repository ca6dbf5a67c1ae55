"""Subscribers to engine events: progress and the end-of-run summary."""
