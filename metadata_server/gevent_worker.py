"""gunicorn's gevent worker for the guest listener, plus: on shutdown, answer every held long-poll at once;
and one droplet (one source address) holds at most ``CONNECTIONS_PER_SOURCE`` connections per worker.

Without the first a SIGTERM would leave long-polls hanging until gunicorn's graceful timeout cut them off;
with it each waiter gets the current state and the guest simply polls again elsewhere. Without the second
one droplet could fill the worker's pool with idle connections and every other droplet would wait.
"""

from __future__ import annotations

from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from .source_cap import SourceCap

# Well above what one droplet's agent and applications need (its long-polls are capped at 8 per worker).
CONNECTIONS_PER_SOURCE = 64


class GuestWorker(GeventWorker):  # type: ignore[misc]
    def run(self) -> None:
        self._cap = SourceCap("guest", CONNECTIONS_PER_SOURCE)
        super().run()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        with self._cap.admit(addr) as admitted:
            if not admitted:
                client.close()
                return
            super().handle(listener, client, addr)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        hub = getattr(self.wsgi, "hub", None)
        if hub is not None:
            gevent.spawn(hub.shutdown)

    def handle_quit(self, sig: int, frame: Any) -> None:
        hub = getattr(self.wsgi, "hub", None)
        if hub is not None:
            gevent.spawn(hub.shutdown)
        super().handle_quit(sig, frame)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        super().handle_request(listener_name, req, sock, addr)
        # gunicorn's keep-alive loop reads a connection's next request without yielding when it is
        # already buffered, so one busy client could starve this worker's other connections (measured:
        # runs of 500-1,700 requests from one connection, p99 88-162 ms; with this yield 15-25 ms).
        gevent.sleep(0)
