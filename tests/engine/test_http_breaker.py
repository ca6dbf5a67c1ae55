"""A run against a flaky HTTP server on 127.0.0.1: the breaker opens, probes, closes.

The server, started by the test on a free loopback port, returns 500 for its
first requests (an outage), then 200. Items are fetched on the thread
backend with urllib, through a circuit breaker keyed by host and a retry
policy, with backoff waits removed by `batchtools.testing.fast_retries`.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

import batchtools
from batchtools import CircuitBreaker, Retry
from batchtools.policy import BreakerState
from batchtools.testing import fast_retries

OUTAGE = 6
"""Requests the server fails before it recovers."""


class FlakyServer(ThreadingHTTPServer):
    """Returns 500 for the first `OUTAGE` requests and 200 afterwards."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.served: list[str] = []

    def answer(self, path: str) -> int:
        with self.lock:
            self.requests += 1
            if self.requests <= OUTAGE:
                self.errors += 1
                return 500
            self.served.append(path)
            return 200

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: FlakyServer

    def do_GET(self) -> None:
        status = self.server.answer(self.path)
        body = self.path.encode() if status == 200 else b"outage"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    flaky = FlakyServer()
    thread = threading.Thread(
        target=flaky.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield flaky
    finally:
        flaky.shutdown()
        flaky.server_close()
        thread.join()


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            text: str = response.read().decode()
            return text
    except urllib.error.HTTPError as error:
        error.close()  # it keeps the response and its socket open
        raise


def test_breaker_against_flaky_server(
    server: FlakyServer,
) -> None:
    urls = [f"{server.base}/item/{n}" for n in range(40)]
    breaker = CircuitBreaker(
        consecutive_failures=3,
        reset_timeout=0.05,
        key=lambda url: urlsplit(url).netloc,
        on=urllib.error.HTTPError,
        clock=time.time,
    )

    with fast_retries():
        report = batchtools.run(
            urls,
            fetch,
            backend="thread",
            concurrency=4,
            retry=Retry(attempts=OUTAGE + 1),
            policies=[breaker],
        )

    # Every item succeeded exactly once, and no request was lost or doubled.
    assert report.counts["succeeded"] == len(urls)
    assert report.total == len(urls)
    assert sorted(server.served) == sorted(urlsplit(url).path for url in urls)
    assert server.errors == OUTAGE
    attempts = [a for outcome in report.outcomes for a in outcome.attempts]
    assert len(attempts) == server.requests
    assert sum(1 for a in attempts if a.error is not None) == OUTAGE
    assert [o.value for o in report.outcomes] == [urlsplit(u).path for u in urls]

    # The circuit opened during the outage, probed, and ended closed.
    transitions = report.circuit_transitions
    states = [t.new for t in transitions]
    assert states[0] is BreakerState.OPEN
    assert BreakerState.HALF_OPEN in states
    assert states[-1] is BreakerState.CLOSED
    assert {t.key for t in transitions} == {urlsplit(server.base).netloc}
    # While the circuit was open, no attempt was admitted. A thread attempt's
    # start is when a thread takes it, so the few admitted just before the
    # circuit opened, while every thread was busy, may start after it.
    for opened, probing in itertools.pairwise(transitions):
        if opened.new is not BreakerState.OPEN:
            continue
        assert probing.new is BreakerState.HALF_OPEN
        started_meanwhile = [a for a in attempts if opened.at < a.started < probing.at]
        assert len(started_meanwhile) < 4  # the concurrency
