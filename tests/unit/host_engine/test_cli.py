"""The host-engine CLI: happy paths, and every bad input ends in one line, a non-zero exit, no change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from host_engine.cli import Deps, cli
from tests.unit.host_engine.cli_run import snapshot
from tests.unit.host_engine.conftest import FakeClock


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "engine.db")


def invoke(db: str, clock: FakeClock, *args: str, **deps: Any) -> Result:
    runner = CliRunner()
    return runner.invoke(
        cli,
        ["--db", db, *args],
        obj=Deps(clock=clock, user="tester", install_signals=False, **deps),
        catch_exceptions=False,
    )


def ok(db: str, clock: FakeClock, *args: str, **deps: Any) -> Result:
    r = invoke(db, clock, *args, **deps)
    assert r.exit_code == 0, (args, r.output, r.stderr)
    return r


@pytest.fixture
def fleet(db: str, clock: FakeClock) -> str:
    for i in (1, 2, 3):
        ok(
            db,
            clock,
            "host",
            "add",
            f"hv{i}",
            "--datacenter",
            "nyc1",
            "--vcpus",
            "16",
            "--memory",
            "64GiB",
            "--disk",
            "1TiB",
            "--compat-group",
            "g1",
            "--metadata-url",
            "http://127.0.0.1:9",
        )
    ok(
        db,
        clock,
        "host",
        "add",
        "small",
        "--datacenter",
        "nyc1",
        "--vcpus",
        "2",
        "--memory",
        "2GiB",
        "--disk",
        "10GiB",
        "--compat-group",
        "g1",
    )
    ok(
        db,
        clock,
        "droplet",
        "add",
        "web1",
        "--host",
        "hv1",
        "--vcpus",
        "2",
        "--memory",
        "4GiB",
        "--disk",
        "80GiB",
        "--owner-tag",
        "acme",
        "--address",
        "10.0.0.1",
    )
    ok(
        db,
        clock,
        "droplet",
        "add",
        "web2",
        "--host",
        "hv1",
        "--vcpus",
        "2",
        "--memory",
        "4GiB",
        "--disk",
        "80GiB",
        "--owner-tag",
        "acme",
        "--address",
        "10.0.0.2",
    )
    ok(
        db,
        clock,
        "droplet",
        "add",
        "big",
        "--host",
        "hv2",
        "--vcpus",
        "8",
        "--memory",
        "60GiB",
        "--disk",
        "100GiB",
        "--address",
        "10.0.0.3",
    )
    return db


def test_cli_host_and_droplet_listing(fleet: str, clock: FakeClock) -> None:
    r = ok(fleet, clock, "host", "list")
    assert "hv1" in r.output and "4/16" in r.output
    doc = json.loads(ok(fleet, clock, "host", "show", "hv1", "--json").output)
    assert doc["memory_bytes"] == 64 * 1024**3 and [d["id"] for d in doc["droplets"]] == ["web1", "web2"]
    doc = json.loads(ok(fleet, clock, "droplet", "show", "web1", "--json").output)
    assert doc["owner_tag"] == "acme" and doc["migration"] is None
    assert "web2" in ok(fleet, clock, "droplet", "list", "--host", "hv1").output
    ok(fleet, clock, "host", "set-state", "hv3", "down", "--reason", "psu")
    assert json.loads(ok(fleet, clock, "host", "show", "hv3", "--json").output)["state"] == "down"


def test_cli_plan_evacuate_explain_and_json(fleet: str, clock: FakeClock) -> None:
    r = ok(fleet, clock, "plan", "evacuate", "hv1", "--explain", "web1")
    assert "RUNNERS-UP" in r.output and "web1: every host's verdict" in r.output
    assert "rejected: source" in r.output
    doc = json.loads(ok(fleet, clock, "plan", "evacuate", "hv1", "--json", "--explain", "web2").output)
    targets = {c["droplet"]: c["target"] for c in doc["choices"]}
    assert targets["web1"] != targets["web2"]  # anti-affinity by owner tag
    [web2] = [c for c in doc["choices"] if c["droplet"] == "web2"]
    assert {v["host"] for v in web2["verdicts"]} == {"hv1", "hv2", "hv3", "small"}
    assert snapshot(fleet)["migrations"] == []


def test_cli_evacuate_status_history_cancel(fleet: str, clock: FakeClock) -> None:
    r = ok(fleet, clock, "evacuate", "hv1", "--start", "2026-12-01T02:00Z", "--reason", "kernel 6.12")
    assert "host hv1 is in maintenance; 2 migration(s) planned" in r.output
    assert json.loads(ok(fleet, clock, "host", "show", "hv1", "--json").output)["state"] == "maintenance"
    ms = json.loads(ok(fleet, clock, "status", "--json").output)
    assert {m["droplet"] for m in ms} == {"web1", "web2"}
    assert all(m["state"] == "planned" and m["requested_by"] == "tester" for m in ms)
    assert all(
        m["notice_at"] == "2026-12-01T01:50:00Z" for m in ms if m["not_before"] == "2026-12-01T02:00:00Z"
    )
    hist = ok(fleet, clock, "history", "web1").output
    assert "planned hv1 ->" in hist and "kernel 6.12" in hist
    r = ok(fleet, clock, "cancel", ms[0]["id"], "--reason", "wrong host")
    assert "cancelled" in r.output
    r = ok(fleet, clock, "cancel", "--host", "hv1")
    assert "stays in maintenance" in r.output
    assert ok(fleet, clock, "status").output.strip() == "no active migrations"
    assert "cancelled" in ok(fleet, clock, "history", ms[0]["droplet"]).output


def test_cli_evacuate_dry_run_writes_nothing(fleet: str, clock: FakeClock) -> None:
    before = snapshot(fleet)
    r = ok(fleet, clock, "evacuate", "hv1", "--start", "+1h", "--dry-run")
    assert "dry run: 2 migration(s) would be planned" in r.output
    assert snapshot(fleet) == before


def test_cli_evacuate_spacing_respects_limits(db: str, clock: FakeClock) -> None:
    for i in range(1, 5):
        ok(
            db,
            clock,
            "host",
            "add",
            f"h{i}",
            "--datacenter",
            "d",
            "--vcpus",
            "64",
            "--memory",
            "256GiB",
            "--disk",
            "4TiB",
        )
    for i in range(6):
        ok(
            db,
            clock,
            "droplet",
            "add",
            f"d{i}",
            "--host",
            "h1",
            "--vcpus",
            "1",
            "--memory",
            "1GiB",
            "--disk",
            "10GiB",
        )
    doc = json.loads(
        ok(
            db,
            clock,
            "evacuate",
            "h1",
            "--start",
            "+1h",
            "--max-parallel",
            "2",
            "--max-per-target",
            "1",
            "--json",
        ).output
    )
    starts = sorted(m["not_before"] for m in doc["moves"])
    assert len(set(starts)) == 3  # 6 moves, 2 at a time
    assert Counter_of(starts) == {starts[0]: 2, starts[2]: 2, starts[4]: 2}


def Counter_of(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def test_cli_migrate_one_droplet(fleet: str, clock: FakeClock) -> None:
    r = ok(fleet, clock, "migrate", "web1", "--to", "hv3", "--start", "+30m")
    assert "planned" in r.output
    [m] = json.loads(ok(fleet, clock, "status", "--json").output)
    assert (m["source"], m["target"]) == ("hv1", "hv3")
    assert json.loads(ok(fleet, clock, "host", "show", "hv1", "--json").output)["state"] == "active"


# ---- bad input: one line, non-zero, store unchanged --------------------------------------------------------

BAD: list[tuple[str, list[str], int, str]] = [
    ("unknown host", ["evacuate", "nope", "--start", "+1h"], 3, "unknown host 'nope'"),
    ("unknown host in plan", ["plan", "evacuate", "nope"], 3, "unknown host"),
    ("unknown droplet", ["migrate", "ghost", "--start", "+1h"], 3, "unknown droplet"),
    ("unknown target", ["migrate", "web1", "--to", "nope", "--start", "+1h"], 3, "unknown host"),
    ("unknown migration", ["cancel", "m-nothere"], 3, "unknown migration"),
    ("history of unknown", ["history", "ghost"], 3, "unknown droplet"),
    (
        "droplet on unknown host",
        ["droplet", "add", "x", "--host", "nope", "--vcpus", "1", "--memory", "1GiB", "--disk", "1GiB"],
        3,
        "unknown host",
    ),
    (
        "negative vcpus",
        ["droplet", "add", "x", "--host", "hv1", "--vcpus", "-1", "--memory", "1GiB", "--disk", "1GiB"],
        2,
        "must not be negative",
    ),
    (
        "negative memory",
        ["droplet", "add", "x", "--host", "hv1", "--vcpus", "1", "--memory", "-4GiB", "--disk", "1GiB"],
        2,
        "must not be negative",
    ),
    (
        "negative host disk",
        ["host", "add", "h9", "--datacenter", "d", "--vcpus", "1", "--memory", "1GiB", "--disk", "-1TiB"],
        2,
        "must not be negative",
    ),
    (
        "size without unit",
        ["host", "add", "h9", "--datacenter", "d", "--vcpus", "1", "--memory", "4096", "--disk", "1TiB"],
        2,
        "needs a unit",
    ),
    (
        "bad address",
        [
            "droplet",
            "add",
            "x",
            "--host",
            "hv1",
            "--vcpus",
            "1",
            "--memory",
            "1GiB",
            "--disk",
            "1GiB",
            "--address",
            "10.0.0.999",
        ],
        2,
        "not an IPv4 or IPv6",
    ),
    (
        "bad droplet id",
        ["droplet", "add", "a/b", "--host", "hv1", "--vcpus", "1", "--memory", "1GiB", "--disk", "1GiB"],
        2,
        "must be 1-64",
    ),
    (
        "duplicate host",
        ["host", "add", "hv1", "--datacenter", "d", "--vcpus", "1", "--memory", "1GiB", "--disk", "1GiB"],
        4,
        "already exists",
    ),
    ("start in the past", ["evacuate", "hv1", "--start", "2020-01-01T00:00Z"], 2, "in the past"),
    ("malformed time", ["evacuate", "hv1", "--start", "next tuesday"], 2, "malformed time"),
    ("time without zone", ["evacuate", "hv1", "--start", "2026-12-01T02:00"], 2, "no timezone"),
    ("malformed notice", ["evacuate", "hv1", "--start", "+1h", "--notice", "soon"], 2, "malformed duration"),
    ("notice too short", ["evacuate", "hv1", "--start", "+1h", "--notice", "5m"], 2, "shorter than the 10m"),
    ("too soon for notice", ["evacuate", "hv1", "--start", "+5m"], 2, "too soon"),
    ("zero parallel", ["evacuate", "hv1", "--start", "+1h", "--max-parallel", "0"], 2, "at least 1"),
    ("missing start", ["evacuate", "hv1"], 2, "Missing option '--start'"),
    ("unknown state", ["host", "set-state", "hv1", "broken"], 2, "Invalid value"),
    ("migrate to own host", ["migrate", "web1", "--to", "hv1", "--start", "+1h"], 2, "already on hv1"),
    ("migrate to full host", ["migrate", "web1", "--to", "small", "--start", "+1h"], 5, "rejected by memory"),
    ("full datacenter", ["evacuate", "hv2", "--start", "+1h"], 5, "no host can take droplet big"),
    ("cancel needs a target", ["cancel"], 2, "either a migration id or --host"),
    ("bad poll interval", ["run", "--poll-interval", "0s", "--max-ticks", "1"], 2, "must be positive"),
]


@pytest.mark.parametrize(("what", "args", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_cli_bad_input_one_line_nonzero_store_unchanged(
    fleet: str, clock: FakeClock, what: str, args: list[str], code: int, message: str
) -> None:
    # Fill hv1 and hv3 so that "big" (60 GiB) has nowhere to go from hv2.
    ok(
        fleet,
        clock,
        "droplet",
        "add",
        "filler3",
        "--host",
        "hv3",
        "--vcpus",
        "1",
        "--memory",
        "30GiB",
        "--disk",
        "1GiB",
        "--address",
        "10.0.1.3",
    )
    before = snapshot(fleet)
    r = invoke(fleet, clock, *args)
    assert r.exit_code == code, (r.output, r.stderr)
    err_lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, r.stderr
    assert err_lines[0].startswith("host-engine: error: ")
    assert message in err_lines[0]
    assert "Traceback" not in r.output
    assert snapshot(fleet) == before


def test_cli_config_file_errors_are_one_line(fleet: str, clock: FakeClock, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[overcommit]\nvcpu = -1\n")
    r = invoke(fleet, clock, "--config", str(bad), "host", "list")
    assert r.exit_code == 6 and "must be positive" in r.stderr
    bad.write_text("[nonsense]\n")
    r = invoke(fleet, clock, "--config", str(bad), "host", "list")
    assert r.exit_code == 6 and "unknown section [nonsense]" in r.stderr
    r = invoke(fleet, clock, "--config", str(tmp_path / "missing.toml"), "host", "list")
    assert r.exit_code == 6 and "does not exist" in r.stderr


def test_cli_config_overcommit_changes_placement(fleet: str, clock: FakeClock, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[overcommit]\nmemory = 2.0\n[notice]\ndefault = "15m"\n')
    # With memory over-committed 2x, "big" fits on hv1 or hv3.
    r = ok(fleet, clock, "--config", str(cfg), "evacuate", "hv2", "--start", "+1h", "--json")
    doc = json.loads(r.output)
    [move] = doc["moves"]
    assert move["target"] in ("hv1", "hv3")
    assert move["not_before"] == "2026-12-01T01:00:00Z"
    assert move["notice_at"] == "2026-12-01T00:45:00Z"  # the config's 15m default notice


def test_cli_end_to_end_on_sqlite_and_postgres(db_url: str, clock: FakeClock) -> None:
    """The same commands against either store (``db_url`` is parametrized: SQLite file, real PostgreSQL)."""
    for i in (1, 2):
        ok(
            db_url,
            clock,
            "host",
            "add",
            f"hv{i}",
            "--datacenter",
            "d",
            "--vcpus",
            "8",
            "--memory",
            "32GiB",
            "--disk",
            "500GiB",
        )
    ok(
        db_url,
        clock,
        "droplet",
        "add",
        "web1",
        "--host",
        "hv1",
        "--vcpus",
        "2",
        "--memory",
        "4GiB",
        "--disk",
        "40GiB",
        "--address",
        "10.0.0.1",
    )
    before = snapshot(db_url)
    r = invoke(db_url, clock, "evacuate", "hv1", "--start", "+1h", "--notice", "1m")
    assert r.exit_code == 2 and snapshot(db_url) == before
    ok(db_url, clock, "evacuate", "hv1", "--start", "+1h", "--reason", "firmware")
    [m] = json.loads(ok(db_url, clock, "status", "--json").output)
    assert (m["droplet"], m["target"], m["state"]) == ("web1", "hv2", "planned")
    ok(db_url, clock, "cancel", m["id"])
    hist = json.loads(ok(db_url, clock, "history", "web1", "--json").output)
    assert [h["to"] for h in hist] == ["planned", "cancelled"]


def test_cli_set_overrides_config_values(fleet: str, clock: FakeClock, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[overcommit]\nmemory = 1.0\n")
    ok(fleet, clock, "droplet", "add", "filler3", "--host", "hv3", "--vcpus", "1", "--memory", "30GiB", "--disk",
       "1GiB", "--address", "10.0.1.3")  # fmt: skip
    # "big" (60 GiB) fits nowhere at 1.0; --set wins over the file and makes room.
    r = invoke(fleet, clock, "--config", str(cfg), "plan", "evacuate", "hv2")
    assert r.exit_code == 5
    r = ok(fleet, clock, "--config", str(cfg), "--set", "overcommit.memory=2", "--set", "notice.default=15m",
           "evacuate", "hv2", "--start", "+1h", "--json")  # fmt: skip
    [move] = json.loads(r.output)["moves"]
    assert move["notice_at"] == "2026-12-01T00:45:00Z"
    r = invoke(fleet, clock, "--set", "overcommit", "host", "list")
    assert r.exit_code == 6 and "SECTION.KEY=VALUE" in r.stderr
    r = invoke(fleet, clock, "--set", "overcommit.gpu=2", "host", "list")
    assert r.exit_code == 6 and "unknown key [overcommit] gpu" in r.stderr


def test_cli_unknown_global_option_is_one_line(fleet: str, clock: FakeClock) -> None:
    r = invoke(fleet, clock, "--bogus", "host", "list")
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("host-engine: error: No such option '--bogus'")
