"""The admin API client: idempotent calls, retries only for transient failures, one root error."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from host_engine.errors import AdminAPIUnavailable, ConfigError, NotifierError, TransientError
from host_engine.metadata.client import AdminClient, read_token_file
from tests.unit.host_engine.conftest import FAKE_ADMIN_URL
from tests.unit.host_engine.fake_admin import FakeAdmin

URL = FAKE_ADMIN_URL  # the conftest's ``admin`` fake answers there


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> Iterator[AdminClient]:
    with AdminClient(URL, "s3cret", attempts=4, sleep=sleeps.append) as c:
        yield c


def test_notifier_sets_and_clears_event(admin: FakeAdmin, client: AdminClient) -> None:
    client.put_droplet("d1", ["10.0.0.1"], hostname="web1", region="nyc1")
    nb = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    doc = client.set_event("d1", "m-1-live", "live_migrate", "scheduled", not_before=nb, deadline=nb)
    assert doc["event"]["not_before"] == "2026-12-01T02:00:00Z"
    # Idempotent: the same PUT again changes nothing.
    client.set_event("d1", "m-1-live", "live_migrate", "scheduled", not_before=nb, deadline=nb)
    assert admin.event("d1") is not None and admin.event("d1")["id"] == "m-1-live"  # type: ignore[index]
    client.clear_event("d1")
    client.clear_event("d1")
    client.clear_event("unknown")  # nothing to clear is success
    assert admin.event("d1") is None
    assert [d["id"] for d in client.list_droplets()] == ["d1"]


def test_notifier_retries_transient_then_succeeds(
    admin: FakeAdmin, client: AdminClient, sleeps: list[float]
) -> None:
    admin.fail_next = [503, 429]
    client.put_droplet("d1", ["10.0.0.1"])
    assert len(sleeps) == 2 and all(0 <= s <= 5 for s in sleeps)
    assert "d1" in admin.droplets


def test_notifier_gives_up_as_transient(admin: FakeAdmin, client: AdminClient, sleeps: list[float]) -> None:
    admin.down = True
    with pytest.raises(AdminAPIUnavailable, match="after 4 attempts") as e:
        client.list_droplets()
    assert isinstance(e.value, TransientError)
    assert len(admin.calls) == 4 and len(sleeps) == 3


def test_notifier_does_not_retry_client_errors(admin: FakeAdmin, sleeps: list[float]) -> None:
    with AdminClient(URL, "wrong", sleep=sleeps.append) as c, pytest.raises(NotifierError) as e:
        c.put_droplet("d1", ["10.0.0.1"])
    assert e.value.status == 401 and e.value.code == "unauthorized"
    assert not isinstance(e.value, TransientError)
    assert len(admin.calls) == 1 and sleeps == []


def test_notifier_unknown_droplet_event_is_404(admin: FakeAdmin, client: AdminClient) -> None:
    with pytest.raises(NotifierError) as e:
        client.set_event("nope", "m-1-live", "live_migrate", "scheduled")
    assert e.value.status == 404
    assert client.get_droplet("nope") is None


def test_notifier_token_never_shown() -> None:
    c = AdminClient(URL, "s3cret")
    assert "s3cret" not in repr(c)
    c.close()


def test_notifier_token_file(tmp_path: Path) -> None:
    p = tmp_path / "tok"
    p.write_text("abc\n")
    assert read_token_file(p) == "abc"
    p.write_text("  ")
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(p)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_notifier_refuses_non_http_url() -> None:
    with pytest.raises(ConfigError):
        AdminClient("ftp://x", "t")


def test_notifier_ca_file_is_checked_once_at_start_up(tmp_path: Path) -> None:
    """[metadata] ca_file: a missing, unreadable or non-PEM bundle is one ConfigError naming the key, when
    the client factory is built (the engine's start-up), not at the first notice."""
    from host_engine.metadata.reconcile import default_client_factory

    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"config \[metadata\] ca_file: cannot read .*missing\.pem"):
        default_client_factory(ca_file=str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"\[metadata\] ca_file: .*garbage\.pem holds no usable PEM"):
        default_client_factory(ca_file=str(garbage))
    with pytest.raises(ConfigError, match=r"\[metadata\] ca_file: cannot read"):
        default_client_factory(ca_file=str(tmp_path))  # a directory
    with pytest.raises(ConfigError, match=r"\[metadata\] ca_file"):
        AdminClient("https://127.0.0.1:1", "t", ca_file=str(missing))
    assert AdminClient("https://127.0.0.1:1", "t").session.verify is True  # certifi's bundle
