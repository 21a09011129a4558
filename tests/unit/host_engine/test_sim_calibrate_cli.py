"""``host-engine sim calibrate``: [sim] fitted from the store's records of real migrations."""

from __future__ import annotations

import json
import tomllib
from datetime import timedelta
from pathlib import Path

from host_engine.config import config_from_dict
from host_engine.models import NewMigration
from host_engine.states import LogKind
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock, make_droplet, make_host
from tests.unit.host_engine.test_cli import invoke, ok

RUNS = Path(__file__).resolve().parents[3] / "bench" / "results" / "sim_fidelity_runs.json"
T0_OFFSET = timedelta(minutes=30)


def _record(store: Store, clock: FakeClock, run: dict[str, object], i: int) -> None:
    """Store one real run the way the executor does: progress log entries, then the attempt's numbers."""
    droplet = f"g{i}"
    store.add_droplet(make_droplet(droplet, "hv1"))
    nb = clock() + T0_OFFSET
    [m] = store.create_migrations(
        [NewMigration(droplet, "hv1", "hv2", nb, nb - timedelta(minutes=10), nb, "test", "alice")]
    )
    store.transition(m.id, S.NOTIFIED, notified_at=clock())
    clock.advance(3600)
    [c] = store.claim("w1", due_by=clock())
    store.transition(c.id, S.RUNNING, worker="w1", started_at=clock())
    for s in run["samples"]:  # type: ignore[attr-defined]
        data = {
            k: v for k, v in s.items() if k not in ("t", "disk_processed_bytes", "memory_processed_bytes")
        }
        data["elapsed_s"] = s["t"]
        store.append_log(c.id, LogKind.PROGRESS, "progress", data=data)
    last = {k: run[k] for k in ("duration_s", "downtime_ms", "bytes_transferred")}
    if run["converged"]:
        store.complete(c.id, worker="w1", stats={"last_attempt": last})
    else:
        store.transition(c.id, S.FAILED, worker="w1", stats={"last_attempt": last}, last_error="gave up")


def _store_of_real_runs(
    tmp_path: Path, clock: FakeClock, workload: str
) -> tuple[str, list[dict[str, object]]]:
    """A store of two real hypervisors holding the recorded first-repetition runs of ``workload``."""
    db = str(tmp_path / "e.db")
    store = Store.open(db, clock=clock)
    for h in ("hv1", "hv2"):
        store.add_host(make_host(h, hypervisor_uri=f"qemu+tcp://{h}.example/system"))
    runs = [r for r in json.loads(RUNS.read_text())["runs"] if r["rep"] == 1 and r["workload"] == workload]
    for i, run in enumerate(runs):
        _record(store, clock, run, i)
    store.close()
    return db, runs


def test_sim_calibrate_fits_sim_settings_from_recorded_real_runs(tmp_path: Path, clock: FakeClock) -> None:
    db, runs = _store_of_real_runs(tmp_path, clock, "memory 8 MiB")
    doc = json.loads(ok(db, clock, "sim", "calibrate", "--json", "--cap-mibps", "0").output)
    assert doc["runs"] == len(runs) == 2
    assert set(doc["workloads"]) == {"g0", "g1"}
    assert 0.5 < doc["setup_s"] < 6
    assert doc["link_bps"] > 10 * 1024 * 1024
    # The text form is a [sim] section the config loader takes as it is.
    text = ok(db, clock, "sim", "calibrate").output
    settings = config_from_dict(tomllib.loads(text)).sim
    assert settings.workload("g0").disk_allocated_bytes is not None
    # ... with how the fitted workload writes (it used to come back as the default workload's pattern).
    fitted = doc["workloads"]["g0"]
    assert settings.workload("g0").memory_pattern.value == fitted["memory_pattern"]
    assert settings.workload("g0").disk_pattern.value == fitted["disk_pattern"]


def test_sim_calibrate_simulates_the_disk_mirror_the_runs_used(tmp_path: Path, clock: FakeClock) -> None:
    # A fleet on libvirt's background mirror ([libvirt] sync_disk_writes = false) is fitted with that mirror,
    # and the [sim] section says so; the flag overrides the config either way.
    db, _ = _store_of_real_runs(tmp_path, clock, "memory + disk")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[libvirt]\nsync_disk_writes = false\n")
    background = json.loads(ok(db, clock, "--config", str(cfg), "sim", "calibrate", "--json").output)
    assert background["sync_disk_writes"] is False
    text = ok(db, clock, "--config", str(cfg), "sim", "calibrate").output
    assert config_from_dict(tomllib.loads(text)).sim.host("hv2").model.sync_disk_writes is False
    blocking = json.loads(
        ok(db, clock, "--config", str(cfg), "sim", "calibrate", "--json", "--sync-writes").output
    )
    assert blocking["sync_disk_writes"] is True
    default = json.loads(ok(db, clock, "sim", "calibrate", "--json").output)
    assert default["sync_disk_writes"] is True
    # Under the write-blocking mirror the guest's writes cross the link beside the one pass over the disk, so
    # the two fits read the same bytes as different guests.
    assert background["workloads"] != blocking["workloads"]


def test_sim_calibrate_with_nothing_to_learn_from_is_one_line(tmp_path: Path, clock: FakeClock) -> None:
    db = str(tmp_path / "e.db")
    Store.open(db, clock=clock).close()
    r = invoke(db, clock, "sim", "calibrate")
    assert r.exit_code != 0
    assert "no finished migration" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
