"""Publishing metrics: a file rewritten atomically, and an HTTP server on loopback.

Both run on daemon threads, so that neither a slow disk nor a slow client
holds up the engine's event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchtools._exceptions import ConfigurationError
from batchtools.fs.atomic import atomic_write

log = logging.getLogger("batchtools.metrics")

# Seconds that closing the HTTP server may wait for its thread.
_SERVER_POLL = 0.1
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FileWriter:
    """Rewrites one file with a rendered snapshot, on a daemon thread.

    Args:
        path: The file to write.
        interval: Seconds between writes.
        render: Returns the file's new text.
    """

    def __init__(self, path: Path, interval: float, render: Callable[[], str]) -> None:
        self.path = path
        self.interval = interval
        self._render = render
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._failures = 0
        self._thread = threading.Thread(
            target=self._loop, name="batchtools-metrics-file", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except Exception:
                # A bug, not a full disk: log it and keep the thread going.
                log.error(
                    "writing the metrics file %s failed", self.path, exc_info=True
                )

    def write(self, *, raise_errors: bool = False) -> None:
        """Write the file, logging an `OSError` unless ``raise_errors``.

        Raises:
            OSError: The write failed and ``raise_errors`` is true.
        """
        with self._write_lock:
            try:
                atomic_write(self.path, self._render())
            except OSError as error:
                if raise_errors:
                    raise
                self._failures += 1
                if self._failures == 1:
                    log.warning(
                        "writing the metrics file %s failed: %s; trying again "
                        "every %g s",
                        self.path,
                        error,
                        self.interval,
                    )
                return
            if self._failures:
                log.warning(
                    "the metrics file %s is written again, after %d failed writes",
                    self.path,
                    self._failures,
                )
                self._failures = 0

    def close(self) -> None:
        """Stop the thread, then write the file a last time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.write()


class Server(ThreadingHTTPServer):
    """An HTTP server of ``/metrics`` on its own daemon thread.

    Args:
        address: The loopback address and port to listen on.
        render: Returns the Prometheus text for each request.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        render: Callable[[], str],
    ) -> None:
        super().__init__(address, _Handler)
        self.render = render
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": _SERVER_POLL},
            name="batchtools-metrics-http",
            daemon=True,
        )

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up in DNS, which a
        # loopback address does not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
        self.server_close()
        log.debug("stopped serving metrics on port %d", self.port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error(
            "responding to a metrics request from %s failed",
            client_address[0],
            exc_info=True,
        )


class _Handler(BaseHTTPRequestHandler):
    """Responds to ``GET /metrics`` and ``HEAD /metrics``."""

    server: Server
    timeout = 10.0  # Seconds a client may take to send its request.

    def do_GET(self) -> None:
        self._answer(include_body=True)

    def do_HEAD(self) -> None:
        self._answer(include_body=False)

    def _answer(self, *, include_body: bool) -> None:
        if not _is_loopback_host(self.headers.get("Host")):
            self._send(
                403,
                "Forbidden: the Host header must name a loopback address or "
                "localhost.\n",
                include_body,
            )
        elif urlsplit(self.path).path != "/metrics":
            self._send(404, "Not found: the metrics are at /metrics.\n", include_body)
        else:
            text = self.server.render()
            self._send(200, text, include_body, _CONTENT_TYPE)

    def _send(
        self,
        status: int,
        text: str,
        include_body: bool,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if include_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics request from %s: " + format, self.client_address[0], *args)


def check_loopback(host: str) -> None:
    """Raise `ConfigurationError` unless ``host`` is an IPv4 loopback address."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigurationError(
            f"invalid metrics host {host!r}: use an IPv4 loopback address, such "
            "as 127.0.0.1"
        ) from None
    if not address.is_loopback:
        raise ConfigurationError(
            f"metrics host {host!r} is not a loopback address: the metrics "
            "server listens on loopback only, such as 127.0.0.1; reach it "
            "from another machine through an SSH tunnel or a reverse proxy"
        )


def _is_loopback_host(header: str | None) -> bool:
    """Return whether a ``Host`` header names localhost or a loopback address."""
    if header is None:
        return True  # HTTP/1.0 clients may leave it out.
    name = header.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
