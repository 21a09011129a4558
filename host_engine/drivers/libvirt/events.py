"""libvirt's event loop and the domain events a migration listens to (switchover, job completed)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from host_engine.drivers.libvirt.connection import libvirt_module

log = logging.getLogger(__name__)

# After an exception in libvirt's loop, wait this long before running it again.
LOOP_ERROR_PAUSE_S = 0.1


class EventLoop:
    """libvirt's default event loop in a daemon thread. libvirt allows one per process, registered before
    the first connection that wants events (and keepalives) is opened, so this is a process-wide singleton."""

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            lv = libvirt_module()
            lv.virEventRegisterDefaultImpl()
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        lv = libvirt_module()
        while True:
            try:
                lv.virEventRunDefaultImpl()
            except Exception:  # the loop must never die; log and go on
                log.exception("libvirt event loop")
                time.sleep(LOOP_ERROR_PAUSE_S)


class MigrationEvents:
    """What the source's domain events said about one migration: the source paused for the switchover, and
    the completed job's own statistics. Events only sharpen progress (switchover seen at once, exact
    downtime); ``jobStats`` suffices without them."""

    def __init__(self, migration_id: str) -> None:
        self.migration_id = migration_id
        self.switchover_seen = False
        self.completed_stats: dict[str, Any] | None = None
        self._conn: Any = None
        self._callbacks: list[int] = []

    def register(self, conn: Any, dom: Any) -> None:
        lv = libvirt_module()
        self._conn = conn
        try:
            self._callbacks.append(
                conn.domainEventRegisterAny(dom, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            )
            self._callbacks.append(
                conn.domainEventRegisterAny(
                    dom, lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                )
            )
        except lv.libvirtError as e:
            log.info("migration %s: no domain events: %s", self.migration_id, e)

    def unregister(self) -> None:
        for cb in self._callbacks:
            with contextlib.suppress(Exception):
                self._conn.domainEventDeregisterAny(cb)
        self._callbacks.clear()

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        lv = libvirt_module()
        if event == lv.VIR_DOMAIN_EVENT_SUSPENDED and detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED:
            self.switchover_seen = True

    def _on_job_completed(self, _conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self.completed_stats = dict(params)
