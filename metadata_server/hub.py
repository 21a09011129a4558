"""The per-process view of every droplet, and the long-poll wake-up.

Each guest worker process keeps an immutable map ``address -> DropletView``. One watcher thread per
process (a greenlet under gevent) checks the store's ``PRAGMA data_version`` every ``poll_interval_s``
and, when another process committed, reloads the map and wakes exactly the long-polls of the droplets
whose ETag changed. A long-poll itself never touches the store: it waits on its droplet's event.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable

from .model import DropletView
from .store import Store

log = logging.getLogger(__name__)

# 5 ms: the worst-case delay this adds to a notice; a data_version check costs a few µs.
DEFAULT_POLL_INTERVAL_S = 0.005


class Hub:
    """Lookups for the hot path, change notification for long-polls, and the long-poll cap."""

    def __init__(self, store: Store, *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        # Serialises refresh/reload: each reads the store and installs maps built from the current ones.
        self._update_lock = threading.Lock()
        self._by_address: dict[str, DropletView] = {}
        self._by_id: dict[str, DropletView] = {}
        self._changed: dict[str, threading.Event] = {}
        self._held: dict[str, int] = {}
        self._stopping = threading.Event()
        self._version = -1
        self._seq = 0
        self.reload()

    # ---- reads -----------------------------------------------------------------------------------------

    def view_for_address(self, address: str) -> DropletView | None:
        view = self._by_address.get(address)
        if view is None and ":" in address:
            view = self._by_address.get(_normalise(address))
        return view

    def view_for_address_now(self, address: str) -> DropletView | None:
        """Like ``view_for_address``, but a miss first catches up with commits the watcher has not applied.

        The admin API answers once a registration is committed; without this, a guest asking a worker
        whose watcher has not looked yet (a few ms, more on a loaded host) would be told it is no droplet.
        A miss costs one ``data_version`` check (µs); the store is read only when something changed.
        """
        view = self.view_for_address(address)
        if view is None and self._catch_up():
            view = self.view_for_address(address)
        return view

    def view_for_id(self, droplet_id: str) -> DropletView | None:
        return self._by_id.get(droplet_id)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def held(self) -> int:
        return sum(self._held.values())

    # ---- long-polls ------------------------------------------------------------------------------------

    def try_hold(self, droplet_id: str, cap: int) -> bool:
        """Count one more held long-poll for the droplet, unless it already holds ``cap``."""
        with self._lock:
            n = self._held.get(droplet_id, 0)
            if n >= cap:
                return False
            self._held[droplet_id] = n + 1
            return True

    def release(self, droplet_id: str) -> None:
        with self._lock:
            n = self._held.get(droplet_id, 0) - 1
            if n > 0:
                self._held[droplet_id] = n
            else:
                self._held.pop(droplet_id, None)

    def wait_for_change(
        self, droplet_id: str, etag: str, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> DropletView | None:
        """Block until the droplet's ETag differs from ``etag``, it is removed, or ``timeout_s`` passes."""
        deadline = clock() + timeout_s
        while True:
            with self._lock:
                view = self._by_id.get(droplet_id)
                if view is None or view.etag != etag or self._stopping.is_set():
                    return view
                changed = self._changed.get(droplet_id)
                if changed is None:
                    changed = self._changed[droplet_id] = threading.Event()
            remaining = deadline - clock()
            if remaining <= 0 or not changed.wait(remaining):
                return self._by_id.get(droplet_id)

    # ---- changes ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Apply only the droplets written since the last look, and wake their long-polls."""
        with self._update_lock:
            version = self._store.data_version()
            seq, changed = self._store.changed_since(self._seq)
            if not changed:
                self._version = version
                return
            by_id, by_address = dict(self._by_id), dict(self._by_address)
            for droplet_id, droplet in changed.items():
                before = by_id.pop(droplet_id, None)
                if before is not None:
                    for a in before.droplet.addresses:
                        if by_address.get(a) is before:
                            del by_address[a]
                if droplet is not None:
                    by_id[droplet_id] = after = DropletView.of(droplet)
                    by_address.update(dict.fromkeys(droplet.addresses, after))
            self._install(by_id, by_address, version, seq, changed)

    def reload(self) -> None:
        """Rebuild the maps from the whole store and wake the long-polls of droplets that changed."""
        with self._update_lock:
            version = self._store.data_version()
            seq, droplets = self._store.snapshot()
            by_id: dict[str, DropletView] = {}
            for d in droplets:  # reuse unchanged views: building one (JSON, hash) is the costly part
                view = self._by_id.get(d.id)
                by_id[d.id] = view if view is not None and view.droplet == d else DropletView.of(d)
            by_address = {a: v for v in by_id.values() for a in v.droplet.addresses}
            self._install(by_id, by_address, version, seq, set(self._by_id) | set(by_id))

    def _install(
        self,
        by_id: dict[str, DropletView],
        by_address: dict[str, DropletView],
        version: int,
        seq: int,
        candidates: Iterable[str],
    ) -> None:
        """Publish new maps, then wake the long-polls of the candidates whose ETag changed (or that went)."""
        with self._lock:
            old = self._by_id
            self._by_id, self._by_address, self._version = by_id, by_address, version
            self._seq = max(self._seq, seq)
            for droplet_id in candidates:
                before, after = old.get(droplet_id), by_id.get(droplet_id)
                if before is None or after is None or before.etag != after.etag:
                    event = self._changed.pop(droplet_id, None)
                    if event is not None:
                        event.set()

    def watch(self) -> None:
        """Run forever (until ``shutdown``): reload when another process has committed."""
        while not self._stopping.wait(self._poll_interval_s):
            try:
                self._catch_up()
            except Exception:  # a transient SQLite error must not kill the watcher
                log.exception("reloading the state file failed; will retry")

    def _catch_up(self) -> bool:
        """Apply what other processes committed since the last look; whether there was anything."""
        if self._store.data_version() == self._version:
            return False
        self.refresh()
        return True

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.watch, name="metadata-hub-watch", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Stop watching and answer every held long-poll now (with the current state)."""
        self._stopping.set()
        with self._lock:
            events, self._changed = list(self._changed.values()), {}
        for event in events:
            event.set()


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
