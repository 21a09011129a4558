"""Guests' acknowledgements reach the executor, through a real metadata server on loopback: a guest that
acknowledges ``ready`` is migrated before its ``not_before``; one that acknowledges ``offline`` with
``power_on_after=false`` is copied offline once it shut itself down and stays off on the target, even though its
metadata server lost the ack in between (the engine keeps its own copy).

The guests speak from their own address (``curl --interface 127.0.8.N``), as a droplet would. The engine runs
in this process with the simulated hypervisor; its clock is a FakeClock and the simulator follows a
monotonic clock the test moves by hand, so nothing waits for real time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from host_engine import planner
from host_engine.config import EngineConfig
from host_engine.drivers.base import DomainState
from host_engine.engine import Engine
from host_engine.engine_steps import SimTickStep
from host_engine.executor import WAIT_RECHECK_S, ExecutorConfig
from host_engine.metadata.acks import ACK_READ_EVERY
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Droplet, Host, Migration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests.servers import MetadataServer, curl
from tests.support import require_binary
from tests.unit.host_engine.conftest import FakeClock

GIB = 1024**3
ADDR = {"web1": "127.0.8.1", "web2": "127.0.8.2"}
NOTICE = timedelta(minutes=10)
WINDOW = timedelta(minutes=30)  # not_before, from the plan


@dataclass
class Rig:
    ms: MetadataServer
    store: Store
    clock: FakeClock
    engine: Engine
    step: SimTickStep
    mono: list[float]

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.mono[0] += seconds
        self.engine.tick()

    def tick_until_acks_read(self) -> None:
        """Ticks of a second until the engine reads the acks again (every ``ACK_READ_EVERY``)."""
        for _ in range(int(ACK_READ_EVERY.total_seconds())):
            self.tick(1.0)

    def migration(self, droplet_id: str) -> Migration:
        [m] = self.store.list_migrations(droplet_id=droplet_id)
        return m

    def drive_until(self, droplet_id: str, state: S, max_ticks: int = 600) -> Migration:
        for _ in range(max_ticks):
            m = self.migration(droplet_id)
            if m.state is state:
                return m
            self.tick(1.0)
        raise AssertionError(f"{droplet_id} never became {state.value}: {self.migration(droplet_id)}")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_binary("curl")
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    with MetadataServer.start(tmp_path / "ms") as ms:
        store = Store.open(tmp_path / "engine.db", clock=clock)
        for name in ("hv1", "hv2", "hv3"):
            store.add_host(
                Host(name=name, datacenter="lo", vcpus=16, memory_bytes=64 * GIB, disk_bytes=1024 * GIB,
                     metadata_url=ms.admin_url, metadata_token_file=str(ms.token_file))
            )  # fmt: skip
        for did, address in ADDR.items():
            store.add_droplet(
                Droplet(
                    id=did, host="hv1", vcpus=1, memory_bytes=GIB, disk_bytes=4 * GIB, addresses=(address,)
                )
            )
        sync = MetadataSync(store, default_client_factory(timeout_s=5, attempts=2, sleep=lambda s: None))
        mono = [0.0]
        step = SimTickStep.open(
            store, ExecutorConfig(worker="w1", tick_s=1.0), monotonic=lambda: mono[0], hooks=sync
        )
        engine = Engine(store, EngineConfig(), sync, clock=clock, sleep=clock.sleep, steps=[step])
        req = planner.Request(
            start=clock() + WINDOW,
            notice=NOTICE,
            limits=planner.Limits(10, 10, 10),
            requested_by="tester",
        )
        planner.evacuate(store, "hv1", req, EngineConfig())
        rig = Rig(ms, store, clock, engine, step, mono)
        try:
            rig.tick()
            rig.tick((WINDOW - NOTICE).total_seconds())  # notice time: both guests read live_migrate
            assert {m.state for m in store.list_migrations()} == {S.NOTIFIED}
            yield rig
        finally:
            sync.close()
            store.close()


def guest_event(ms: MetadataServer, droplet_id: str) -> dict[str, Any]:
    out = curl(ms.guest_url + "/v1/maintenance_event.json", ADDR[droplet_id])
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def guest_acks(ms: MetadataServer, droplet_id: str, action: str, *, power_on_after: bool = True) -> None:
    """The guest answers its current event, from its own address."""
    event = guest_event(ms, droplet_id)
    assert event["event"] == "live_migrate"
    body = json.dumps({"id": event["id"], "action": action, "power_on_after": power_on_after})
    out = curl(
        ms.guest_url + "/v1/maintenance_event/ack",
        ADDR[droplet_id],
        "-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body, "-w", "\n%{http_code}",
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.endswith(b"\n200"), (out.stdout, out.stderr)


def test_engine_guest_acks_ready_and_is_migrated_before_not_before(rig: Rig) -> None:
    not_before = rig.migration("web1").not_before
    guest_acks(rig.ms, "web1", "ready")
    rig.tick_until_acks_read()
    m = rig.migration("web1")
    assert m.ack == "ready" and m.state is S.RUNNING  # claimed in the tick that read the ack
    assert rig.clock() < not_before
    done = rig.drive_until("web1", S.COMPLETED)
    assert done.finished_at is not None and done.finished_at < not_before
    log = [e.message for e in rig.store.migration_log(done.id)]
    assert "guest acknowledged ready, power_on_after=true" in log
    assert rig.step.world.hosts_holding("web1") == [done.target_host]
    assert rig.step.world.droplets["web1"].state is DomainState.RUNNING
    assert guest_event(rig.ms, "web1")["event"] == ""  # the flag is cleared
    assert rig.migration("web2").state is S.NOTIFIED  # no ack: it waits for its window


def test_engine_guest_acks_offline_power_off_after_and_ends_shut_off_on_the_target(rig: Rig) -> None:
    guest_acks(rig.ms, "web2", "offline", power_on_after=False)
    rig.tick_until_acks_read()
    m = rig.migration("web2")
    assert (m.ack, m.power_on_after, m.state) == ("offline", False, S.NOTIFIED)
    # The server loses its disk (and the ack); the engine puts the event back and keeps the ack it read.
    rig.ms.wipe_and_restart()
    rig.engine.reconcile()
    assert rig.ms.admin("GET", "/admin/v1/droplets/web2").json()["ack"] is None
    rig.tick_until_acks_read()
    assert rig.migration("web2").ack == "offline"
    # The window opens before the guest has shut down: the executor waits, it does not pull the plug.
    rig.tick((m.not_before - rig.clock()).total_seconds())
    assert rig.migration("web2").state is S.NOTIFIED
    rig.tick(5.0)
    assert rig.migration("web2").state is S.NOTIFIED
    # The guest powers itself off, as it said it would.
    rig.step.world.droplets["web2"].state = DomainState.SHUT_OFF
    rig.tick(WAIT_RECHECK_S + 1.0)
    assert rig.migration("web2").state is S.OFFLINE_RUNNING
    done = rig.drive_until("web2", S.COMPLETED)
    log = rig.store.migration_log(done.id)
    assert "guest acknowledged offline, power_on_after=false" in [e.message for e in log]
    assert any(e.kind == "wait" and "shut down for the offline copy" in e.message for e in log)
    assert done.stats["last_attempt"]["offline"] is True
    assert rig.step.world.hosts_holding("web2") == [done.target_host]
    assert rig.step.world.droplets["web2"].state is DomainState.SHUT_OFF  # as acknowledged
    assert rig.ms.admin("GET", "/admin/v1/droplets/web2").json()["event"] is None
