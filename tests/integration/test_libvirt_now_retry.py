"""``host-engine migrate --now`` on real libvirt retries seconds after a failed attempt, not minutes (issue
11.6: "a retry is 120 s away even under --now"), and the retry on the restarted target completes.

The real CLI drives a migration between the two harness hosts; the target's libvirtd is killed once memory
moves, then restarted. The attempt fails (the target was at fault), the source keeps the guest, and since no
other host fits, the retry goes to the same target once it answers again: seconds later. The guest converges
at the test's bandwidth cap, so the retry must complete: the command exits 0, the guest runs on the target,
the store says so, and the source holds nothing of it. The metadata servers' admin API is faked at the HTTP
transport (libvirt is real).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner

from tests.integration.test_libvirt_record import assert_record_matches_hosts
from tests.libvirt_harness import support
from tests.libvirt_harness.engine_store import harness_store
from tests.libvirt_harness.guest import GuestSpec
from tests.libvirt_harness.jobs import wait_until_memory_moves
from tests.libvirt_harness.support import Conns, start_guest, wait_counter_advances
from tests.unit.host_engine.fake_admin import FakeAdmin

pytestmark = pytest.mark.libvirt

hosts = support.hosts
conns = support.conns

ADMIN_URL = "http://127.0.0.1:8112"  # answered by ``responses``: nothing listens there
BANDWIDTH_MIBPS = 8
# A guest that converges at the cap, with a memory phase long enough to kill the target in: it streams
# 256 KiB per tick (~4.6 MiB/s, about half the link) over 32 MiB, so the first memory round carries ~32 MiB
# of written pages (~4 s at 8 MiB/s) and each further round about half the last. A small hot set would
# converge too, but its first round lasts a fraction of a second: the target could not be killed within it.
CONVERGING_GUEST = GuestSpec(mem_kib=256, mem_span_kib=32 * 1024, disk_sectors=32, paced=True)
# Passes that write the whole span once: the pages the first memory round must carry.
FILL_PASSES = 32 * 1024 // 256
# The whole command: one failed attempt, the retry's backoff (4-6 s), the second attempt to its end.
COMMAND_BOUND_S = 120.0
# Before the fix the retry came 96-144 s after the failure.
RETRY_BOUND_S = 30.0


def test_migrate_now_retries_seconds_after_the_target_daemon_died_and_the_retry_completes(
    hosts: Any, conns: Conns, tmp_path: Path
) -> None:
    import libvirt

    from host_engine.cli import Deps, cli
    from host_engine.metadata.reconcile import default_client_factory
    from host_engine.states import MigrationState
    from host_engine.store import Store

    name = "nowretry"
    src_dom = start_guest(hosts, conns, name, CONVERGING_GUEST)
    wait_counter_advances(src_dom, passes=FILL_PASSES)
    token = tmp_path / "token"
    token.write_text("s3cret")
    db = tmp_path / "engine.db"
    harness_store(
        db, hosts, name, metadata_url=ADMIN_URL, metadata_token_file=token, addresses=("127.0.0.78",)
    ).close()
    killed_mid_copy = threading.Event()

    def kill_target_once_memory_moves_then_restart_it() -> None:
        if wait_until_memory_moves(src_dom):
            hosts.target.kill_daemon()
            killed_mid_copy.set()
        time.sleep(1.0)
        if not hosts.target.daemon_running:
            hosts.target.start()

    settings = ["--set", f"libvirt.bandwidth_mibps={BANDWIDTH_MIBPS}", "--set", "schedule.max_attempts=2"]
    for h in hosts.hosts:
        settings += ["--set", f"libvirt.peer_uris.{h.name}={h.peer_uri}"]
    deps = Deps(
        user="tester",
        install_signals=False,
        client_factory=default_client_factory(attempts=1, sleep=lambda s: None),
    )
    killer = threading.Thread(target=kill_target_once_memory_moves_then_restart_it, daemon=True)
    admin = FakeAdmin(ADMIN_URL)
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            admin.install(rsps)
            killer.start()
            started = time.monotonic()
            args = ["--db", str(db), *settings, "migrate", name, "--to", hosts.target.name]
            args += ["--now", "--unsafe-short-notice"]
            r = CliRunner().invoke(cli, args, obj=deps, catch_exceptions=False)
            took_s = time.monotonic() - started
            killer.join(30)
        print(r.output, r.stderr)
        assert killed_mid_copy.is_set(), "the first attempt ended before the target could be killed"
        with Store.open(db) as store:
            [m] = store.list_migrations()
            log = store.migration_log(m.id)
            print("\n".join(f"{e.at} {e.to_state} {e.message}" for e in log))
            assert m.attempt == 2 and m.target_host == hosts.target.name, (r.output, r.stderr)
            assert m.state is MigrationState.COMPLETED, (m.state, m.last_error, r.output, r.stderr)
            assert r.exit_code == 0, (r.output, r.stderr)
            failed_at = next(e.at for e in log if e.to_state is MigrationState.FAILED)
            second_at = [e.at for e in log if e.to_state is MigrationState.RUNNING][1]
            assert (second_at - failed_at).total_seconds() < RETRY_BOUND_S, log
            assert took_s < COMMAND_BOUND_S, took_s
            # The store says the target; the target runs the guest; the source holds no domain, no disk.
            assert assert_record_matches_hosts(store, m.id, name, hosts, conns) == hosts.target.name
        wait_counter_advances(conns.dst.lookupByName(name))  # and the guest goes on running there
    finally:
        if not hosts.target.daemon_running:
            hosts.target.start()
        for conn in (conns.src, conns.dst):
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        for h in hosts.hosts:
            h.path(h.image_path(f"{name}.qcow2")).unlink(missing_ok=True)
