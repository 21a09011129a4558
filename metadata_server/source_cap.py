"""A cap on the connections one source address may hold open in one worker process.

Both listeners run gevent workers with a bounded pool of connections. Without a per-source cap, one client
(a droplet on the guest listener, any host of the management network on the admin listener) could fill the
pool with idle or slow connections, and every other client would wait in the kernel's backlog.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

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


class SourceCap:
    """Counts open connections per source; ``admit`` says whether one more may be served.

    Only for one gevent worker: all its greenlets run in one thread, so the counter needs no lock.
    """

    def __init__(self, listener: str, cap: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.listener = listener
        self.cap = cap
        self._clock = clock
        self._open: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}

    @contextmanager
    def admit(self, addr: Any) -> Iterator[bool]:
        """``True`` while the connection counts against its source, ``False`` if it must be closed at once."""
        source = source_of(addr)
        if self._open[source] >= self.cap:
            self._log_refusal(source)
            yield False
            return
        self._open[source] += 1
        try:
            yield True
        finally:
            self._open[source] -= 1
            if not self._open[source]:
                del self._open[source]

    def _log_refusal(self, source: str) -> None:
        now = self._clock()
        last = self._last_logged.get(source)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL_S:
            self._last_logged[source] = now
            log.warning(
                "%s listener: %s holds %d connections already; refusing more (logged once a minute)",
                self.listener,
                source,
                self.cap,
            )
