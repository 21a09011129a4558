"""Config files, sizes, durations and times: what a user types, parsed or refused with one clear message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.config import EngineConfig, apply_overrides, config_from_dict, load_config
from host_engine.errors import ConfigError, InvalidInput
from host_engine.timeparse import format_duration, format_time, parse_duration, parse_time
from host_engine.units import format_size, parse_size

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64GiB", 64 * 1024**3), ("512M", 512 * 1024**2), ("1.5TiB", int(1.5 * 1024**4)), ("2TB", 2 * 10**12),
     ("100 kb", 100_000), ("0B", 0), ("4g", 4 * 1024**3)],
)  # fmt: skip
def test_units_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "message"), [("-1GiB", "negative"), ("4096", "needs a unit"), ("4 XB", "unknown unit"),
                                               ("lots", "malformed"), ("", "malformed")])  # fmt: skip
def test_units_refuse_bad_sizes(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_size(text, field="--memory")


def test_units_format_size() -> None:
    assert format_size(64 * 1024**3) == "64GiB"
    assert format_size(1536 * 1024**2) == "1.5GiB"
    assert format_size(12) == "12B"


def test_timeparse_durations() -> None:
    assert parse_duration("10m") == timedelta(minutes=10)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration("45") == timedelta(seconds=45)
    for bad in ("", "ten minutes", "10x", "m10", "-5m"):
        with pytest.raises(InvalidInput):
            parse_duration(bad)
    assert format_duration(timedelta(minutes=9, seconds=30)) == "9m30s"
    assert format_duration(timedelta(hours=1, minutes=5)) == "1h05m"
    assert format_duration(timedelta(seconds=-120)) == "-2m"


def test_timeparse_times() -> None:
    assert parse_time("2026-12-01T02:00Z", now=NOW) == datetime(2026, 12, 1, 2, tzinfo=UTC)
    assert parse_time("2026-12-01T03:00+01:00", now=NOW) == datetime(2026, 12, 1, 2, tzinfo=UTC)
    assert parse_time("now", now=NOW) == NOW
    assert parse_time("+30m", now=NOW) == NOW + timedelta(minutes=30)
    with pytest.raises(InvalidInput, match="no timezone"):
        parse_time("2026-12-01T02:00", now=NOW)
    with pytest.raises(InvalidInput, match="malformed time"):
        parse_time("tomorrow", now=NOW)
    assert format_time(datetime(2026, 12, 1, 2, 0, 0, 123, tzinfo=UTC)) == "2026-12-01T02:00:00Z"


def test_config_defaults_and_file(tmp_path: Path) -> None:
    d = EngineConfig()
    assert (d.placement.overcommit.vcpu, d.placement.overcommit.memory, d.placement.overcommit.disk) == (
        4.0,
        1.0,
        1.0,
    )
    assert d.schedule.notice == timedelta(minutes=10)
    f = tmp_path / "c.toml"
    f.write_text(
        '[store]\nurl = "postgresql://x@y/z"\n[overcommit]\nvcpu = 8\n[placement]\nanti_affinity = false\n'
        '[placement.weights]\nleast_allocated = 2.5\n[notice]\ndefault = "20m"\n[concurrency]\nmax_parallel = 9\n'
        '[schedule]\nbandwidth = "500MiB"\n[engine]\npoll_interval = "250ms"\n[notifier]\nattempts = 2\n'
    )
    c = load_config(f)
    assert c.db == "postgresql://x@y/z" and c.placement.overcommit.vcpu == 8.0
    assert not c.placement.anti_affinity and c.placement.weights.least_allocated == 2.5
    assert c.schedule.notice == timedelta(minutes=20) and c.schedule.max_parallel == 9
    assert c.schedule.bandwidth_bps == 500 * 1024**2 and c.engine.poll_interval_s == 0.25
    assert c.engine.notifier_attempts == 2
    assert load_config(env={"HOST_ENGINE_CONFIG": str(f)}).schedule.max_parallel == 9
    assert load_config(f, overrides=["concurrency.max_parallel=3"]).schedule.max_parallel == 3


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"bogus": {}}, "unknown section"),
        ({"overcommit": {"cpu": 2}}, "unknown key"),
        ({"overcommit": {"vcpu": "lots"}}, "expected int or float"),
        ({"overcommit": {"vcpu": True}}, "expected int or float"),
        ({"overcommit": {"memory": 0}}, "must be positive"),
        ({"notice": {"default": "soon"}}, "malformed duration"),
        ({"concurrency": {"max_parallel": 0}}, "must be positive"),
        ({"placement": {"weights": {"gpu": 1}}}, "unknown weigher"),
        ({"placement": {"weights": {"least_allocated": -1}}}, "expected a number >= 0"),
        ({"placement": {"anti_affinity": "yes"}}, "expected bool"),
        ({"schedule": {"bandwidth": "fast"}}, "malformed size"),
        ({"schedule": {"retry_backoff": "0s"}}, r"\[schedule\] retry_backoff: must be positive"),
        ({"schedule": {"retry_backoff": "soon"}}, r"\[schedule\] retry_backoff"),
        ({"schedule": {"retry_backoff_max": True}}, r"\[schedule\] retry_backoff_max: expected"),
        (
            {"schedule": {"retry_backoff": "1h"}},
            r"retry_backoff \(1:00:00\) is longer than retry_backoff_max",
        ),
        (
            {"schedule": {"retry_backoff": "10s", "retry_backoff_max": "5s"}},
            r"retry_backoff \(0:00:10\) is longer than retry_backoff_max \(0:00:05\)",
        ),
        ({"overcommit": 3}, "must be a table"),
        (
            {"controller": {"max_downtime_ms": 5}},
            r"\[controller\] max_downtime_ms: must be within 10\.\.10000",
        ),
        ({"controller": {"max_downtime_ms": 10_001}}, r"\[controller\] max_downtime_ms"),
        ({"controller": {"max_downtime_ms": "300ms"}}, r"\[controller\] max_downtime_ms: expected int"),
        ({"controller": {"switchover_safety": 1}}, r"unknown key \[controller\] switchover_safety"),
        ({"libvirt": {"bandwidth_mibps": -1}}, r"\[libvirt\] bandwidth_mibps: must be within 0\.\."),
        ({"libvirt": {"bandwidth_mibps": 2_000_000}}, r"\[libvirt\] bandwidth_mibps"),
        ({"libvirt": {"bandwidth_mibps": 1.5}}, r"\[libvirt\] bandwidth_mibps: expected int"),
        ({"libvirt": {"tls": "yes"}}, r"\[libvirt\] tls: expected bool"),
        ({"libvirt": {"peer_uris": "qemu+tls://x/system"}}, r"\[libvirt\] peer_uris: expected dict"),
        (
            {"libvirt": {"peer_uris": {"hv2": "hv2.example"}}},
            r"\[libvirt\] peer_uris\.hv2: expected a libvirt URI",
        ),
        ({"libvirt": {"peer_uris": {"hv2": 7}}}, r"\[libvirt\] peer_uris\.hv2"),
        ({"libvirt": {"cap": 1}}, r"unknown key \[libvirt\] cap"),
        ({"libvirt": {"sync_disk_writes": 1}}, r"\[libvirt\] sync_disk_writes: expected bool"),
        (
            {"libvirt": {"parallel_connections": -1}},
            r"\[libvirt\] parallel_connections: must be within 0\.\.255",
        ),
        ({"libvirt": {"parallel_connections": 256}}, r"\[libvirt\] parallel_connections: must be within"),
        ({"libvirt": {"parallel_connections": True}}, r"\[libvirt\] parallel_connections: expected int"),
        ({"libvirt": {"parallel_connections": "4"}}, r"\[libvirt\] parallel_connections: expected int"),
        ({"metadata": {"ca_file": ""}}, r"\[metadata\] ca_file: must be a path"),
        ({"metadata": {"ca_file": 1}}, r"\[metadata\] ca_file: expected str"),
    ],
)
def test_config_refuses_bad_values(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(doc)


def test_config_overrides_merge() -> None:
    doc = apply_overrides({"overcommit": {"vcpu": 2.0}}, ["overcommit.memory=1.5", "notice.default=15m"])
    assert doc == {"overcommit": {"vcpu": 2.0, "memory": 1.5}, "notice": {"default": "15m"}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_config_libvirt_controller_and_metadata_sections(tmp_path: Path) -> None:
    d = EngineConfig()
    assert d.controller.max_downtime_ms == 300
    assert (d.libvirt.bandwidth_mibps, d.libvirt.tls, dict(d.libvirt.peer_uris)) == (0, False, {})
    assert d.libvirt.options() == {}  # no cap, no TLS: libvirt's defaults
    assert d.engine.metadata_ca_file == ""
    f = tmp_path / "c.toml"
    f.write_text(
        "[controller]\nmax_downtime_ms = 150\n"
        "[libvirt]\nbandwidth_mibps = 400\ntls = true\n"
        '[libvirt.peer_uris]\nhv2 = "qemu+tls://hv2.migration.example/system"\n'
        '[metadata]\nca_file = "/etc/host-engine/ca.pem"\n'
    )
    c = load_config(f)
    assert c.controller.max_downtime_ms == 150
    assert c.libvirt.options() == {"bandwidth_mibps": "400", "tls": "1"}
    # The transport: the driver's defaults (write-blocking mirror, 4 connections) are not repeated; a
    # fleet that turns them off says so in every migration's options.
    off = load_config(f, overrides=["libvirt.sync_disk_writes=false", "libvirt.parallel_connections=1"])
    assert off.libvirt.options() == {
        "bandwidth_mibps": "400",
        "tls": "1",
        "sync_writes": "0",
        "parallel_connections": "1",
    }
    assert dict(c.libvirt.peer_uris) == {"hv2": "qemu+tls://hv2.migration.example/system"}
    assert c.engine.metadata_ca_file == "/etc/host-engine/ca.pem"
    c = load_config(
        f,
        overrides=[
            "controller.max_downtime_ms=10",
            "libvirt.bandwidth_mibps=0",
            "libvirt.tls=false",
            "libvirt.peer_uris.hv3=qemu+ssh://root@hv3/system",
            "metadata.ca_file=~/ca.pem",
        ],
    )
    assert c.controller.max_downtime_ms == 10
    assert c.libvirt.options() == {}
    assert dict(c.libvirt.peer_uris) == {
        "hv2": "qemu+tls://hv2.migration.example/system",
        "hv3": "qemu+ssh://root@hv3/system",
    }
    assert c.engine.metadata_ca_file == str(Path("~/ca.pem").expanduser())
    with pytest.raises(ConfigError, match=r"\[controller\] max_downtime_ms"):
        load_config(overrides=["controller.max_downtime_ms=20000"])


def test_config_reference_in_the_docs_is_a_valid_config() -> None:
    """The TOML reference in docs/host-engine.md ("Configuration") parses, every key known and in range."""
    import re
    import tomllib

    doc = (Path(__file__).parents[3] / "docs" / "host-engine.md").read_text()
    section = doc.split("## Configuration", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    c = config_from_dict(tomllib.loads(block.group(1)))
    assert c.controller.max_downtime_ms == 300 and c.libvirt.bandwidth_mibps == 0 and not c.libvirt.tls
    assert c.engine.metadata_ca_file and "hv2" in c.libvirt.peer_uris


def test_config_retry_backoff_reaches_the_engines_retries() -> None:
    """``[schedule] retry_backoff`` / ``retry_backoff_max`` set when ``host-engine run`` retries a failed
    attempt; ``migrate --now`` keeps its seconds-apart retries whatever they say."""
    from host_engine.executor_config import ExecutorConfig
    from host_engine.retry import backoff_s

    config = config_from_dict({"schedule": {"retry_backoff": "15s", "retry_backoff_max": "1m"}})
    run = ExecutorConfig.for_engine(config).retry
    assert [backoff_s(n, run, rand=lambda: 0.5) for n in (1, 2, 3, 4)] == [15.0, 30.0, 60.0, 60.0]
    now = ExecutorConfig.for_engine(config, only=frozenset({"m1"})).retry
    assert backoff_s(1, now, rand=lambda: 0.5) == 5.0
    default = ExecutorConfig.for_engine(EngineConfig()).retry
    assert backoff_s(1, default, rand=lambda: 0.5) == 120.0
