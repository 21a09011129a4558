"""``host-engine install-unit`` and ``metadata-server install-unit``: units systemd accepts, hardened, and
refusing anything that would need quoting (or inject directives) rather than writing a broken unit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from host_engine.cli import cli as engine_cli
from metadata_server.cli import main as server_cli
from tests.support import require_binary
from tests.tls import self_signed

# `systemd-analyze security` scores 0 (locked down) to 10 (unsafe); both services must stay "OK" (< 2.5).
MAX_EXPOSURE = 2.5


def _verify(unit: Path) -> None:
    exe = require_binary("systemd-analyze")
    done = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # verify prints its complaints and still exits 0 for some


def _exposure(unit: Path) -> float:
    exe = require_binary("systemd-analyze")
    done = subprocess.run(
        [exe, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def _line(text: str, key: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(key + "=")]


def test_host_engine_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["install-unit", "--dest", str(tmp_path), "--worker", "hv-1", "--metrics-listen", "9100"]
    res = runner.invoke(engine_cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    unit = tmp_path / "host-engine.service"
    text = unit.read_text()
    (exec_start,) = _line(text, "ExecStart")
    assert exec_start.endswith(
        "--config /etc/host-engine/config.toml run --worker hv-1 --metrics-listen 127.0.0.1:9100"
    )
    assert _line(text, "Restart") == ["always"]
    assert _line(text, "StateDirectory") == ["host-engine"]
    assert _line(text, "CapabilityBoundingSet") == [""]
    _verify(unit)
    assert _exposure(unit) < MAX_EXPOSURE


def test_metadata_server_unit_verifies_and_passes_secrets_as_credentials(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["install-unit", "--dest", str(tmp_path), "--admin-token-file", "/etc/ms/token", "--workers", "3"]
    res = runner.invoke(server_cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    unit = tmp_path / "metadata-server.service"
    text = unit.read_text()
    (exec_start,) = _line(text, "ExecStart")
    assert "--admin-token-file ${CREDENTIALS_DIRECTORY}/admin-token" in exec_start
    assert "--guest-listen 169.254.169.254:80" in exec_start and "--workers 3" in exec_start
    assert _line(text, "LoadCredential") == ["admin-token:/etc/ms/token"]
    assert _line(text, "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert _line(text, "DynamicUser") == ["yes"]
    _verify(unit)
    assert _exposure(unit) < MAX_EXPOSURE


def test_metadata_server_unit_with_tls_loads_cert_and_key_as_credentials(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "admin")
    dest = tmp_path / "units"
    args = ["install-unit", "--dest", str(dest), "--admin-listen", "10.1.2.3:8775"]
    args += ["--admin-tls-cert", str(cert), "--admin-tls-key", str(key)]
    res = CliRunner().invoke(server_cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = (dest / "metadata-server.service").read_text()
    assert f"admin-tls-cert:{cert}" in _line(text, "LoadCredential")
    assert "--admin-tls-key ${CREDENTIALS_DIRECTORY}/admin-tls-key" in _line(text, "ExecStart")[0]
    _verify(dest / "metadata-server.service")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--engine-config", "etc/relative.toml"], "absolute path"),
        (["--engine-config", "/etc/host engine/c.toml"], "absolute path"),
        (["--engine-config", "/etc/%n.toml"], "absolute path"),
        (["--engine-config", "/etc/c.toml\nUser=root"], "absolute path"),
        (["--engine-config", "/etc/../root/c.toml"], "absolute path"),
        (["--worker", "a b"], "--worker"),
        (["--worker", "x\nExecStartPre=/bin/sh"], "--worker"),
        (["--worker", "w" * 129], "--worker"),
        (["--user", "Root;"], "--user"),
        (["--metrics-listen", "host:notaport"], "--metrics-listen"),
        (["--metrics-listen", "9100\nUser=root"], "--metrics-listen"),
    ],
)
def test_host_engine_unit_refuses_unsafe_values_and_writes_nothing(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    res = CliRunner().invoke(engine_cli, ["install-unit", "--dest", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert complaint in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "host-engine.service").exists()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--db", "/var/lib/x y.db"], "--db"),
        (["--db", "/var/lib/%i.db"], "--db"),
        (["--admin-token-file", "token"], "--admin-token-file"),
        (["--admin-token-file", "/etc/t\nExecStartPre=/bin/sh"], "--admin-token-file"),
        (["--admin-listen", "10.0.0.1:8775"], "not a loopback address"),
        (["--admin-listen", "127.0.0.1:80", "--guest-listen", "127.0.0.1:80"], "must not share"),
        (["--guest-listen", "metadata:80"], "--guest-listen"),
        (["--admin-tls-cert", "/nonexistent/cert.pem"], "must be given together"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_metadata_server_unit_refuses_unsafe_values_and_writes_nothing(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    res = CliRunner().invoke(server_cli, ["install-unit", "--dest", str(tmp_path), *args])
    assert res.exit_code != 0, res.output
    assert complaint in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "metadata-server.service").exists()


def test_an_existing_unit_is_kept_without_force(tmp_path: Path) -> None:
    unit = tmp_path / "host-engine.service"
    unit.write_text("mine\n")
    res = CliRunner().invoke(engine_cli, ["install-unit", "--dest", str(tmp_path)])
    assert res.exit_code == 2 and "--force" in res.output
    assert unit.read_text() == "mine\n"
    res = CliRunner().invoke(engine_cli, ["install-unit", "--dest", str(tmp_path), "--force"])
    assert res.exit_code == 0
    assert "ExecStart=" in unit.read_text()
    (tmp_path / "metadata-server.service").write_text("mine\n")
    res = CliRunner().invoke(server_cli, ["install-unit", "--dest", str(tmp_path)])
    assert res.exit_code != 0 and "--force" in res.output
    assert (tmp_path / "metadata-server.service").read_text() == "mine\n"
