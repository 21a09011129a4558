"""A droplet without an address can never be told of its migration (the metadata server knows droplets only by
address): ``evacuate`` and ``migrate`` refuse to plan it, in one line that names it and says how to fix it,
and write nothing."""

from __future__ import annotations

import json

from tests.unit.host_engine.cli_run import snapshot
from tests.unit.host_engine.conftest import FakeClock
from tests.unit.host_engine.test_cli import db, fleet, invoke, ok

__all__ = ["db", "fleet"]  # fixtures, used by name


def _add_bare(db: str, clock: FakeClock, droplet_id: str, host: str) -> None:
    ok(db, clock, "droplet", "add", droplet_id, "--host", host, "--vcpus", "1", "--memory", "1GiB",
       "--disk", "10GiB")  # fmt: skip


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_evacuate_refuses_droplets_without_an_address_and_writes_nothing(
    fleet: str, clock: FakeClock
) -> None:
    _add_bare(fleet, clock, "mute1", "hv1")
    _add_bare(fleet, clock, "mute2", "hv1")
    before = snapshot(fleet)
    for extra in ([], ["--dry-run"]):
        r = invoke(fleet, clock, "evacuate", "hv1", "--start", "+1h", *extra)
        assert r.exit_code == 4, r.output
        line = _one_line(r.stderr)
        assert "2 droplet(s) on hv1 have no address" in line and "mute1, mute2" in line
        assert "--address" in line
    assert snapshot(fleet) == before  # hv1 not put in maintenance, nothing planned


def test_migrate_refuses_a_droplet_without_an_address(fleet: str, clock: FakeClock) -> None:
    _add_bare(fleet, clock, "mute1", "hv1")
    before = snapshot(fleet)
    r = invoke(fleet, clock, "migrate", "mute1", "--start", "+1h")
    assert r.exit_code == 4 and "mute1" in _one_line(r.stderr)
    assert snapshot(fleet) == before
    # Given an address, the same droplet plans.
    ok(fleet, clock, "droplet", "set", "mute1", "--address", "10.0.9.9")
    r = ok(fleet, clock, "migrate", "mute1", "--start", "+1h", "--json")
    assert [m["droplet"] for m in json.loads(r.output)["moves"]] == ["mute1"]


def test_many_droplets_without_an_address_are_named_up_to_ten(fleet: str, clock: FakeClock) -> None:
    for i in range(12):
        _add_bare(fleet, clock, f"m{i:02d}", "hv3")
    r = invoke(fleet, clock, "evacuate", "hv3", "--start", "+1h")
    line = _one_line(r.stderr)
    assert "12 droplet(s)" in line and "m09" in line and "m10" not in line and "and 2 more" in line


def test_hosts_without_a_metadata_server_are_not_checked(fleet: str, clock: FakeClock) -> None:
    # "small" has no metadata server: no notices are sent there, so an address is not needed.
    _add_bare(fleet, clock, "quiet", "small")
    r = ok(fleet, clock, "migrate", "quiet", "--start", "+1h", "--json")
    assert [m["droplet"] for m in json.loads(r.output)["moves"]] == ["quiet"]
