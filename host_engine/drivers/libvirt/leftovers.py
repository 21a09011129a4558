"""Failed attempts whose target could not be cleaned, cleaned in the background once the target answers."""

from __future__ import annotations

import logging
import threading
import time

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.migration import LibvirtMigration

log = logging.getLogger(__name__)

# A target that could not be cleaned (its daemon down) is tried again this often, for up to a day.
LEFTOVER_RETRY_S = 2.0
LEFTOVER_GIVE_UP_S = 86400.0
# How long a new attempt on a target waits for a clean-up of the same droplet there that is running.
FORGET_WAIT_S = 120.0


class LeftoverSweeper:
    """Failed attempts whose target could not be cleaned (its daemon was down), cleaned in a background thread
    as soon as the target answers again, without waiting for a retry to pick that host: the next attempt
    usually goes to another host (the target was at fault), so nothing else would come back for them.

    Held in memory: after an engine restart, ``LibvirtHypervisor.recover`` and the next attempt's
    ``prepare_target`` on that host remove what is left.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[LibvirtMigration, float]] = {}
        self._thread: threading.Thread | None = None
        # The key whose clean-up runs now; ``forget`` waits for it (see there).
        self._busy: tuple[str, str] | None = None
        self._idle = threading.Condition(self._lock)

    def add(self, mig: LibvirtMigration) -> None:
        key = (mig.spec.target_host, mig.spec.droplet_id)
        with self._lock:
            self._pending.setdefault(key, (mig, time.monotonic()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="libvirt-leftovers", daemon=True)
                self._thread.start()
        log.warning(
            "migration %s: %s holds leftovers of %s; removing them once it answers",
            mig.spec.migration_id,
            mig.spec.target_host,
            mig.spec.droplet_id,
        )

    def forget(self, target_host: str, droplet_id: str) -> None:
        """Drop the pending clean-up of (target, droplet), waiting for one that runs right now to end.

        The next attempt on that target uses the same domain UUID and volume paths: a clean-up of the old
        attempt running while the new one prepares would destroy its incoming domain or delete its volume
        mid-copy (the retry then fails with an I/O error). So a new attempt starts only after it.
        """
        key = (target_host, droplet_id)
        deadline = time.monotonic() + FORGET_WAIT_S
        with self._lock:
            self._pending.pop(key, None)
            while self._busy == key:
                left = deadline - time.monotonic()
                if left <= 0:  # a clean-up stuck in a libvirt call must not hold the new attempt forever
                    log.warning(
                        "clean-up of %s on %s still running after %.0f s; the new attempt starts anyway",
                        droplet_id, target_host, FORGET_WAIT_S,
                    )  # fmt: skip
                    break
                self._idle.wait(left)

    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._pending)

    def _run(self) -> None:
        while True:
            with self._lock:
                items = list(self._pending.items())
                if not items:
                    self._thread = None
                    return
            for key, (mig, since) in items:
                self._try(key, mig, since)
            time.sleep(LEFTOVER_RETRY_S)

    def _try(self, key: tuple[str, str], mig: LibvirtMigration, since: float) -> None:
        with self._lock:
            if self._pending.get(key, (None, 0.0))[0] is not mig:
                return  # forgotten meanwhile: a new attempt on that target owns its paths now
            self._busy = key
        try:
            self._clean(key, mig, since)
        finally:
            with self._lock:
                self._busy = None
                self._idle.notify_all()

    def _clean(self, key: tuple[str, str], mig: LibvirtMigration, since: float) -> None:
        try:
            mig.cleanup_target()
        except DriverError as e:
            if time.monotonic() - since > LEFTOVER_GIVE_UP_S:
                log.error("migration %s: giving up cleaning %s: %s", mig.spec.migration_id, key[0], e)
            else:
                log.debug("migration %s: %s not cleaned yet: %s", mig.spec.migration_id, key[0], e)
                return
        except Exception:  # the sweeper must not die on an unexpected libvirt state
            log.exception("migration %s: cleaning %s", mig.spec.migration_id, key[0])
            return
        else:
            log.info("migration %s: leftovers removed from %s", mig.spec.migration_id, key[0])
        mig.close()
        with self._lock:
            if self._pending.get(key, (None, 0.0))[0] is mig:
                del self._pending[key]
