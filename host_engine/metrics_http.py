"""``host-engine run --metrics-listen``: Prometheus metrics (``GET /metrics``) and the health probes
(``GET /livez``, ``GET /readyz``: ``ok`` or ``503``, without a token, saying nothing else) over HTTP.

The standard library's threading HTTP server in a daemon thread: the engine loops never wait for it and a
slow scraper never holds them up. Loopback unless told otherwise, since the metrics name droplets' states.
Hostile requests get one ``text/plain`` line each (the stock error page echoes the request in HTML and names
the Python version); a client that sends nothing is dropped after :data:`REQUEST_TIMEOUT_S`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from host_engine.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROBE_CONTENT_TYPE = "text/plain; charset=utf-8"
SERVER_NAME = "host-engine"
REQUEST_TIMEOUT_S = 10.0


def parse_listen(text: str, *, field: str = "--metrics-listen") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (loopback) -> (host, port).

    >>> parse_listen("9100"), parse_listen(":9100"), parse_listen("0.0.0.0:9100"), parse_listen("[::1]:9100")
    (('127.0.0.1', 9100), ('127.0.0.1', 9100), ('0.0.0.0', 9100), ('::1', 9100))
    """
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise InvalidInput(
            f"{field} {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9100)", field="metrics_listen"
        )
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise InvalidInput(
                f"{field} {text!r}: {host!r} is not an IPv6 address", field="metrics_listen"
            ) from e
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        exposition: Callable[[], bytes],
        live: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.exposition = exposition
        self.live = live
        self.ready = ready
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hung up mid-answer, or worse: one line in the debug log, never a traceback on stderr.
        log.debug("metrics listener: request from %s failed: %s", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    """``GET``/``HEAD`` of ``/metrics``, ``/livez`` and ``/readyz``; anything else is one ``text/plain`` line
    (``404 Not Found``, ``405 Method Not Allowed``, ``431 Request Header Fields Too Large``, ...) that echoes
    nothing of the request and names no software version."""

    server: _Server
    timeout = REQUEST_TIMEOUT_S  # a client that sends nothing is dropped, its thread freed
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers

    def version_string(self) -> str:
        return SERVER_NAME

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self.server.exposition()
            except Exception:  # a store hiccup at scrape time: the scraper sees a 500, the engine goes on
                log.exception("metrics exposition failed")
                self.send_error(500)
                return
            self._answer(200, CONTENT_TYPE, body)
        elif path in ("/livez", "/readyz"):
            check = self.server.live if path == "/livez" else self.server.ready
            try:
                ok = check()
            except Exception as e:  # a check that breaks says "no", in one line of the log
                log.warning("%s check failed: %s", path, e)
                ok = False
            if ok:
                self._answer(200, PROBE_CONTENT_TYPE, b"ok\n")
            else:
                self._answer(503, PROBE_CONTENT_TYPE, b"not live\n" if path == "/livez" else b"not ready\n")
        else:
            self.send_error(404)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _not_allowed(self) -> None:
        self.send_error(405)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _answer(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self._finish(content_type, body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """One line, the status and its standard phrase: never the request's own text (the stock page
        echoes it in HTML)."""
        phrase = HTTPStatus(code).phrase
        self.close_connection = True
        self.send_response(code, phrase)
        if code == 405:
            self.send_header("Allow", "GET, HEAD")
        self.send_header("Connection", "close")
        self._finish(PROBE_CONTENT_TYPE, f"{code} {phrase}\n".encode())

    def _finish(self, content_type: str, body: bytes) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics %s " + format, self.client_address[0], *args)


def _always() -> bool:
    return True


@contextmanager
def serve_metrics(
    host: str,
    port: int,
    exposition: Callable[[], bytes],
    *,
    live: Callable[[], bool] = _always,
    ready: Callable[[], bool] = _always,
) -> Iterator[tuple[str, int]]:
    """Serve ``exposition()`` on ``http://host:port/metrics``, and ``live()`` / ``ready()`` as ``/livez`` and
    ``/readyz`` (``200 ok`` or ``503``, nothing else), while the block runs; yields the bound address (port 0
    picks a free one)."""
    try:
        server = _Server((host, port), exposition, live, ready)
    except OSError as e:
        raise InvalidInput(
            f"--metrics-listen {host}:{port}: cannot listen: {e.strerror or e}", field="metrics_listen"
        ) from e
    bound = server.server_address
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("serving metrics on http://%s:%s/metrics (and /livez, /readyz)", bound[0], bound[1])
    try:
        yield str(bound[0]), int(bound[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
