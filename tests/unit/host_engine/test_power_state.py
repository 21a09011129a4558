"""A droplet's power state is a ``PowerState``: checked when written, read back as the enum, and a value a
newer engine wrote (one this engine does not know) is read as it is — ``droplet list`` shows it, the sim
starts such a droplet running — instead of failing every read of the droplets table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from host_engine import schema
from host_engine.cli import Deps, cli
from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import StoredWorld
from host_engine.states import PowerState
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock, make_droplet, make_host


@pytest.fixture
def fleet(store: Store) -> Store:
    store.add_host(make_host("hv1"))
    store.add_droplet(make_droplet("web1", "hv1"))
    store.add_droplet(make_droplet("db1", "hv1", power_state=PowerState.SHUT_OFF))
    return store


def _stored(store: Store, droplet_id: str) -> str:
    d = schema.droplets
    with store.engine.connect() as conn:
        value: str = conn.execute(sa.select(d.c.power_state).where(d.c.id == droplet_id)).scalar_one()
    return value


def _write_raw(store: Store, droplet_id: str, value: str) -> None:
    """What a newer engine sharing the database would do."""
    d = schema.droplets
    with store.engine.begin() as conn:
        conn.execute(d.update().where(d.c.id == droplet_id).values(power_state=value))


def test_power_state_is_stored_as_its_value_and_read_back_as_the_enum(fleet: Store) -> None:
    assert _stored(fleet, "db1") == "shut_off"  # the column's values are unchanged
    assert _stored(fleet, "web1") == "running"
    web1, db1 = fleet.get_droplet("web1"), fleet.get_droplet("db1")
    assert web1.power_state is PowerState.RUNNING
    assert db1.power_state is PowerState.SHUT_OFF
    with fleet.begin() as tx:
        tx.update_droplet("web1", power_state=PowerState.PAUSED)
    assert fleet.get_droplet("web1").power_state is PowerState.PAUSED


def test_an_unknown_power_state_is_refused_on_write(fleet: Store) -> None:
    with pytest.raises(ValueError, match="'hibernating'"):
        fleet.add_droplet(make_droplet("new1", "hv1", power_state="hibernating"))
    with pytest.raises(ValueError, match="'hibernating'"), fleet.begin() as tx:
        tx.update_droplet("web1", power_state="hibernating")
    assert [d.id for d in fleet.list_droplets()] == ["db1", "web1"]
    assert fleet.get_droplet("web1").power_state is PowerState.RUNNING


def test_a_power_state_a_newer_engine_wrote_is_read_as_it_is(fleet: Store) -> None:
    _write_raw(fleet, "web1", "hibernating")
    web1 = fleet.get_droplet("web1")  # reading does not fail
    assert web1.power_state == "hibernating"
    assert not isinstance(web1.power_state, PowerState)
    assert {d.id: d.power_state for d in fleet.list_droplets()} == {
        "db1": PowerState.SHUT_OFF,
        "web1": "hibernating",
    }


def test_droplet_list_shows_a_power_state_it_does_not_know(tmp_path: Path, clock: FakeClock) -> None:
    db = str(tmp_path / "engine.db")
    store = Store.open(db)
    store.add_host(make_host("hv1"))
    store.add_droplet(make_droplet("web1", "hv1"))
    store.add_droplet(make_droplet("db1", "hv1", power_state=PowerState.SHUT_OFF))
    _write_raw(store, "web1", "hibernating")
    store.close()

    def run(*args: str) -> str:
        r = CliRunner().invoke(
            cli,
            ["--db", db, *args],
            obj=Deps(clock=clock, user="tester", install_signals=False),
            catch_exceptions=False,
        )
        assert r.exit_code == 0, (r.output, r.stderr)
        return r.output

    table = {line.split()[0]: line.split()[-1] for line in run("droplet", "list").splitlines()[1:]}
    assert table == {"db1": "shut_off", "web1": "hibernating"}
    docs = {d["id"]: d["power_state"] for d in json.loads(run("droplet", "list", "--json"))}
    assert docs == {"db1": "shut_off", "web1": "hibernating"}


def test_the_sim_starts_droplets_in_their_recorded_power_state(fleet: Store) -> None:
    fleet.add_droplet(make_droplet("cache1", "hv1"))
    _write_raw(fleet, "cache1", "hibernating")
    world = StoredWorld.open(fleet)
    assert world.droplet("db1").state is DomainState.SHUT_OFF
    assert world.droplet("web1").state is DomainState.RUNNING
    assert world.droplet("cache1").state is DomainState.RUNNING  # unknown: started like a new droplet
