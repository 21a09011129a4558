"""``host-engine run --metrics-listen``: the executor's Prometheus metrics over HTTP (``GET /metrics``).

The standard library's threading HTTP server in a daemon thread: the engine loop stays single-threaded and a
slow scraper never holds it up. Loopback unless told otherwise, since the metrics name droplets' states.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from host_engine.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def __init__(self, address: tuple[str, int], exposition: Callable[[], bytes]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.exposition = exposition
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics here")
            return
        try:
            body = self.server.exposition()
        except Exception:  # a store hiccup at scrape time: the scraper sees a 500, the engine goes on
            log.exception("metrics exposition failed")
            self.send_error(500, "metrics unavailable")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics %s " + format, self.client_address[0], *args)


@contextmanager
def serve_metrics(host: str, port: int, exposition: Callable[[], bytes]) -> Iterator[tuple[str, int]]:
    """Serve ``exposition()`` on ``http://host:port/metrics`` while the block runs; yields the bound address
    (port 0 picks a free one)."""
    try:
        server = _Server((host, port), exposition)
    except OSError as e:
        raise InvalidInput(
            f"--metrics-listen {host}:{port}: cannot listen: {e.strerror or e}", field="metrics_listen"
        ) from e
    bound = server.server_address
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("serving metrics on http://%s:%s/metrics", bound[0], bound[1])
    try:
        yield str(bound[0]), int(bound[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
