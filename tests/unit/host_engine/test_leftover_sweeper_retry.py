"""A retry on the same target is not undone by the background clean-up of the failed attempt (issue 11.3).

Both attempts use the same domain UUID and volume paths on the target. When the retry prepared the target
while the sweeper was still cleaning the old attempt (a slow reconnect to the restarted daemon), the sweeper
deleted the retry's fresh volume mid-copy: the retry failed with ``Input/output error``. The target is a
fake at the migration boundary (a set of volume paths); the sweeper is real.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from host_engine.drivers.libvirt.leftovers import LeftoverSweeper

PATH = "/var/lib/libvirt/images/d1.qcow2"


@dataclass
class SlowCleanup:
    """The failed attempt: its clean-up deletes its volume once the (restarted) target lets it connect."""

    volumes: set[str]
    connected: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    spec: Any = None

    def __post_init__(self) -> None:
        self.spec = type("Spec", (), {"target_host": "h2", "droplet_id": "d1", "migration_id": "m1"})()

    def cleanup_target(self) -> None:
        self.started.set()
        assert self.connected.wait(10)
        self.volumes.discard(PATH)
        self.finished.set()

    def close(self) -> None:
        pass


def test_a_retry_prepared_during_the_old_clean_up_keeps_its_volume() -> None:
    volumes = {PATH}
    old = SlowCleanup(volumes)
    sweeper = LeftoverSweeper()
    sweeper.add(old)  # type: ignore[arg-type]
    assert old.started.wait(10)

    def retry_prepares_target() -> None:
        sweeper.forget("h2", "d1")  # what LibvirtHypervisor.migration does for the retry
        volumes.add(PATH)  # prepare_target: the retry's fresh volume

    retry = threading.Thread(target=retry_prepares_target)
    retry.start()
    retry.join(1.0)  # the old clean-up still waits for the daemon
    old.connected.set()
    retry.join(10)
    assert not retry.is_alive()
    assert old.finished.wait(10)
    # The old clean-up has ended; the retry's volume must still be there to be copied into.
    assert PATH in volumes
    assert sweeper.pending() == []
