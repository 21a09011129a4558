"""Keeps ``host_engine_metadata_server_up`` current when the engine has nothing to say to a server.

The gauge comes from the engine's own requests (notices, acks, reconciliation, the executor's hooks: every one
goes through :class:`host_engine.metadata.client.AdminClient`, whose ``observer`` reports its outcome). An
idle engine may not talk to a server for a minute (reconciliation) or at all (a worker not elected for the
fleet's chores), and a gauge left at its last value would hide a server that died meanwhile. So a daemon
thread asks every server named by a host that the engine has not heard from for ``every_s``
(:data:`PROBE_EVERY_S`) for its ``GET /healthz`` (with the token: an engine whose token is refused cannot use
the server either), with the admin client's own timeout and retries, and drops the gauges of servers no host
names any more. It has its own clients, so it never shares a connection with the engine's loops; a slow server
delays only it.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from host_engine.engine_metrics import EngineMetrics, server_label
from host_engine.errors import HostEngineError
from host_engine.metadata.client import AdminClient
from host_engine.metadata.reconcile import ClientFactory
from host_engine.models import Host
from host_engine.store import Store

log = logging.getLogger(__name__)

#: A server not heard from for this long is asked directly; also how stale its gauge can get (plus one
#: request's timeouts and retries).
PROBE_EVERY_S = 10.0
JOIN_S = 2.0


class ServerProbe:
    """Probes the metadata servers the engine has not heard from lately (``with ServerProbe(...):``)."""

    def __init__(
        self,
        store: Store,
        factory: ClientFactory,
        metrics: EngineMetrics,
        *,
        every_s: float = PROBE_EVERY_S,
    ) -> None:
        self.store = store
        self.factory = factory
        self.metrics = metrics
        self.every_s = every_s
        self._clients: dict[tuple[str, str], AdminClient] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_due(self) -> dict[str, bool]:
        """One pass: probe each server not heard from for ``every_s``. Returns label -> answered usably."""
        try:
            hosts = self.store.list_hosts()
        except HostEngineError as e:  # a store outage: readiness says so; the gauges keep their last value
            log.debug("metadata server probe: store unreachable: %s", e)
            return {}
        servers: dict[str, Host] = {}
        for h in hosts:
            if h.metadata_url:
                servers.setdefault(server_label(h.metadata_url), h)
        self.metrics.keep_servers(set(servers))
        results: dict[str, bool] = {}
        for label, host in sorted(servers.items()):
            ago = self.metrics.answered_ago_s(label)
            if ago is not None and ago < self.every_s:
                continue
            results[label] = self._probe(label, host)
        return results

    def _probe(self, label: str, host: Host) -> bool:
        try:
            ok = self._client(host).healthz()  # anything but 200 (e.g. a URL naming another service) is down
        except HostEngineError as e:  # unreachable, token refused, its token file cannot be read, ...
            log.debug("metadata server probe %s: %s", label, e)
            ok = False
        self.metrics.server_answered(label, ok)
        return ok

    def _client(self, host: Host) -> AdminClient:
        key = (host.metadata_url.rstrip("/"), host.metadata_token_file)
        if key not in self._clients:
            client = self.factory(host)
            client.observer = self.metrics.server_answered
            self._clients[key] = client
        return self._clients[key]

    # ---- the thread --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        # Look twice per period: a server is probed at most 1.5 periods after it was last heard from.
        while True:
            try:
                self.probe_due()
            except Exception:  # never let the probe die silently: the gauges would freeze
                log.exception("metadata server probe failed")
            if self._stop.wait(self.every_s / 2):
                return

    def __enter__(self) -> ServerProbe:
        self._thread = threading.Thread(target=self._loop, name="metadata-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                return  # still waiting on a server: its clients go with the process (a daemon thread)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
