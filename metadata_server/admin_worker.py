"""gunicorn's gevent worker for the admin listener, hardened against slow and greedy clients.

The admin listener faces the management network, where anyone can open a TCP connection before being asked
for a token. Under gunicorn's gthread worker each accepted connection held a thread until its request head
was complete, so 40 connections sending one byte every 5 s froze the 32-thread pool and the engine could
neither notify nor clear. Here:

* an open connection costs a greenlet (~20 KiB), not a thread, up to ``WORKER_CONNECTIONS`` at once;
* a connection must complete its request head within ``REQUEST_HEAD_TIMEOUT_S`` of opening or of its previous
  answer (which is also the keep-alive idle limit), and with TLS its handshake within the same time before
  that, however slowly the bytes trickle in; then it is closed;
* one source address holds at most ``CONNECTIONS_PER_SOURCE`` connections; more are closed at once, before
  any TLS work, so a single host cannot fill the worker's pool.

TLS is done here rather than by gunicorn so that the handshake falls under the deadline and comes after the
per-source check (gunicorn's gevent worker handshakes before its handler runs, with no time limit).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from collections import Counter
from typing import Any, ClassVar

import gevent
from gunicorn.workers.ggevent import GeventWorker

log = logging.getLogger(__name__)

REQUEST_HEAD_TIMEOUT_S = 10
CONNECTIONS_PER_SOURCE = 64
WORKER_CONNECTIONS = 1_000
REFUSAL_LOG_INTERVAL_S = 60.0


def source_of(addr: Any) -> str:
    """The client's address, an IPv4-mapped IPv6 address counted as its IPv4 address."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server-side TLS context of the admin listener (also used to check the files at start-up)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


class AdminWorker(GeventWorker):  # type: ignore[misc]
    """Set ``tls_files`` on a subclass (see ``admin_worker_class``) to serve TLS."""

    tls_files: ClassVar[tuple[str, str] | None] = None

    def run(self) -> None:
        # After gevent's monkey-patching (init_process), so the context makes cooperative sockets.
        self._tls = tls_context(*self.tls_files) if self.tls_files else None
        self._open: Counter[str] = Counter()
        self._last_refusal_log: dict[str, float] = {}
        super().run()

    def timeout_ctx(self) -> gevent.Timeout:
        return gevent.Timeout(REQUEST_HEAD_TIMEOUT_S, False)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        source = source_of(addr)
        if self._open[source] >= CONNECTIONS_PER_SOURCE:
            self._log_refusal(source)
            client.close()
            return
        self._open[source] += 1
        try:
            if self._tls is not None:
                client = _handshake(self._tls, client)
                if client is None:
                    return
            super().handle(listener, client, addr)
        finally:
            self._open[source] -= 1
            if not self._open[source]:
                del self._open[source]

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        if self._tls is not None:
            req.scheme = "https"  # gunicorn derives it from its own TLS settings, which are unset here
        super().handle_request(listener_name, req, sock, addr)

    def _log_refusal(self, source: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log.get(source, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
            self._last_refusal_log[source] = now
            log.warning(
                "admin listener: %s holds %d connections already; refusing more (logged once a minute)",
                source,
                CONNECTIONS_PER_SOURCE,
            )


def _handshake(context: ssl.SSLContext, client: Any) -> Any:
    """The TLS socket, or None (and the connection closed) if the handshake failed or took too long."""
    wrapped = None
    with gevent.Timeout(REQUEST_HEAD_TIMEOUT_S, False):
        try:
            wrapped = context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake failed: %s", e)
    if wrapped is None:
        client.close()
    return wrapped


def admin_worker_class(cert_file: str | None, key_file: str | None) -> type[AdminWorker]:
    """The worker class gunicorn is given: ``AdminWorker``, serving TLS when both files are given."""
    if cert_file is None or key_file is None:
        return AdminWorker
    files = (cert_file, key_file)
    return type("TLSAdminWorker", (AdminWorker,), {"tls_files": files})
