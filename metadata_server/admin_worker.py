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

import logging
import ssl
from typing import Any, ClassVar

import gevent
from gunicorn.workers.ggevent import GeventWorker

from .source_cap import SourceCap

log = logging.getLogger(__name__)

REQUEST_HEAD_TIMEOUT_S = 10
CONNECTIONS_PER_SOURCE = 64
WORKER_CONNECTIONS = 1_000


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server-side TLS context of the admin listener."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


class AdminWorker(GeventWorker):  # type: ignore[misc]
    """Set ``tls_files`` on a subclass (see ``admin_worker_class``) to serve TLS."""

    tls_files: ClassVar[tuple[str, str] | None] = None

    def run(self) -> None:
        # After gevent's monkey-patching (init_process), so the context makes cooperative sockets.
        self._tls = tls_context(*self.tls_files) if self.tls_files else None
        self._cap = SourceCap("admin", CONNECTIONS_PER_SOURCE)
        super().run()

    def timeout_ctx(self) -> gevent.Timeout:
        return gevent.Timeout(REQUEST_HEAD_TIMEOUT_S, False)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        with self._cap.admit(addr) as admitted:
            if not admitted:
                client.close()
                return
            if self._tls is not None:
                client = _handshake(self._tls, client)
                if client is None:
                    return
            super().handle(listener, client, addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        if self._tls is not None:
            req.scheme = "https"  # gunicorn derives it from its own TLS settings, which are unset here
        super().handle_request(listener_name, req, sock, addr)


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
