"""Policies: how attempts are scheduled. Pure logic, no I/O."""

from batchtools.policy._units import parse_duration, parse_size
from batchtools.policy.cache import Cache, ResultCache
from batchtools.policy.circuit_breaker import (
    BreakerState,
    CircuitBreaker,
    Transition,
)
from batchtools.policy.concurrency import (
    Concurrency,
    ConcurrencyLimiter,
    ConcurrencyStatistics,
)
from batchtools.policy.fallback import Fallback, FallbackValue
from batchtools.policy.memory import Memory, MemoryGate
from batchtools.policy.pool import PoolStatistics, ResourcePool
from batchtools.policy.rate_limit import RateLimit, RateLimiter
from batchtools.policy.retry import NO_RETRY, Backoff, Retry

__all__ = [
    "NO_RETRY",
    "Backoff",
    "BreakerState",
    "Cache",
    "CircuitBreaker",
    "Concurrency",
    "ConcurrencyLimiter",
    "ConcurrencyStatistics",
    "Fallback",
    "FallbackValue",
    "Memory",
    "MemoryGate",
    "PoolStatistics",
    "RateLimit",
    "RateLimiter",
    "ResourcePool",
    "ResultCache",
    "Retry",
    "Transition",
    "parse_duration",
    "parse_size",
]
