"""The admin API client against a real metadata server whose admin listener serves TLS with a certificate from
a private CA (here: self-signed for 127.0.0.1): trusted with ``[metadata] ca_file``, refused without it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from host_engine.cli import Deps, cli
from host_engine.errors import NotifierError
from host_engine.metadata.client import AdminClient
from tests.servers import MetadataServer, free_port
from tests.tls import self_signed
from tests.unit.host_engine.conftest import FakeClock


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[MetadataServer, str, Path]]:
    """A metadata server with a TLS admin listener, its https admin URL and its (self-signed) certificate.

    Started by hand: ``MetadataServer.launch`` waits for its admin listener over http://."""
    cert, key = self_signed(tmp_path, "admin")
    ms = MetadataServer(tmp_path / "ms", free_port(), free_port(), "s" * 32,
                        ["--admin-tls-cert", str(cert), "--admin-tls-key", str(key)])  # fmt: skip
    ms.workdir.mkdir()
    ms.token_file.write_text(ms.token)
    ms.token_file.chmod(0o600)
    url = f"https://127.0.0.1:{ms.admin_port}"
    with (tmp_path / "ms.log").open("wb") as log:
        proc = subprocess.Popen(ms.argv(), stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "ms.log").read_text()
            try:
                auth = {"Authorization": f"Bearer {ms.token}"}
                if requests.get(url + "/healthz", headers=auth, verify=str(cert), timeout=1).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet; a busy machine
                pass
            assert time.monotonic() < deadline, (tmp_path / "ms.log").read_text()
            time.sleep(0.05)
        yield ms, url, cert
    finally:
        proc.terminate()
        proc.wait(15)


def test_admin_client_trusts_the_private_ca_in_ca_file(
    tls_server: tuple[MetadataServer, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms, url, cert = tls_server
    with AdminClient(url, ms.token, ca_file=str(cert)) as client:
        assert client.healthz()
        client.put_droplet("d1", ["127.0.5.1"])
        assert [d["id"] for d in client.list_droplets()] == ["d1"]

    # Without it: certifi's bundle does not know the CA. One clear TLS error, not retried; and the
    # environment's REQUESTS_CA_BUNDLE is ignored (the client does not trust the environment).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    sleeps: list[float] = []
    with AdminClient(url, ms.token, attempts=4, sleep=sleeps.append) as client:
        started = time.monotonic()
        with pytest.raises(
            NotifierError, match=r"TLS error talking to https://127\.0\.0\.1:\d+: .*CERTIFICATE_VERIFY_FAILED"
        ):
            client.list_droplets()
        assert sleeps == [] and time.monotonic() - started < 5  # not retried
    # Another CA's certificate is no better.
    other, _ = self_signed(tmp_path, "other")
    with AdminClient(url, ms.token, ca_file=str(other), attempts=4, sleep=sleeps.append) as client:
        with pytest.raises(NotifierError, match="CERTIFICATE_VERIFY_FAILED"):
            client.healthz()
        assert sleeps == []


def test_engine_run_reaches_a_tls_metadata_server_with_ca_file(
    tls_server: tuple[MetadataServer, str, Path], tmp_path: Path
) -> None:
    """``host-engine run`` with ``[metadata] ca_file`` reconciles the TLS server (registers the droplet);
    a missing ca_file stops it at start-up with one line naming the key (exit 6)."""
    ms, url, cert = tls_server
    db = str(tmp_path / "engine.db")
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))

    def invoke(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(
            cli,
            ["--db", db, *args],
            obj=Deps(clock=clock, user="ops", install_signals=False, sleep=clock.sleep),
            catch_exceptions=False,
        )
        return r.exit_code, r.output  # stdout and stderr

    for args in (
        ["host", "add", "hv1", "--datacenter", "lo1", "--vcpus", "8", "--memory", "16GiB", "--disk", "200GiB",
         "--metadata-url", url, "--metadata-token-file", str(ms.token_file)],
        ["droplet", "add", "d1", "--host", "hv1", "--vcpus", "1", "--memory", "1GiB", "--disk", "10GiB",
         "--address", "127.0.5.1"],
    ):  # fmt: skip
        code, out = invoke(*args)
        assert code == 0, out

    code, out = invoke("--set", f"metadata.ca_file={tmp_path / 'nope.pem'}", "run", "--max-ticks", "1")
    assert code == 6, out
    assert [line for line in out.splitlines() if line.strip()] == [
        f"host-engine: error: config [metadata] ca_file: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    ]
    auth = {"Authorization": f"Bearer {ms.token}"}
    r = requests.get(url + "/admin/v1/droplets", headers=auth, verify=str(cert), timeout=5)
    assert r.json()["droplets"] == []  # nothing reached the server

    code, out = invoke("--set", f"metadata.ca_file={cert}", "run", "--max-ticks", "1")
    assert code == 0, out
    r = requests.get(url + "/admin/v1/droplets/d1", headers=auth, verify=str(cert), timeout=5)
    assert r.status_code == 200 and r.json()["addresses"] == ["127.0.5.1"]
