"""Policies: how attempts are scheduled. Pure logic, no I/O."""

from batchtools.policy._units import parse_duration, parse_size
from batchtools.policy.retry import NO_RETRY, Backoff, Retry

__all__ = ["NO_RETRY", "Backoff", "Retry", "parse_duration", "parse_size"]
