"""Flags, the token file and the environment: wrong, missing, oversized and hostile values."""

from __future__ import annotations

from pathlib import Path

import pytest

from metadata_server.config import TOKEN_ENV, build_config, load_token
from metadata_server.errors import ConfigError


def token_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "at least 16"),
        (b"short\n", "at least 16"),
        (b"has a space in it ok", "without spaces"),
        (b"\xff\xfe\x00binary-token-bytes", "cannot read"),
        (b"x" * 5000, "larger than 4096 bytes"),
        (b"tok\x1ben-with-escape-chars", "printable"),
    ],
)
def test_config_bad_token_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_token(token_file(tmp_path, content), environ={})


def test_config_token_file_missing_or_world_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(tmp_path / "absent", environ={})
    with pytest.raises(ConfigError, match="readable by other users"):
        load_token(token_file(tmp_path, b"k" * 32, 0o644), environ={})


def test_config_token_from_file_wins_over_environment(tmp_path: Path) -> None:
    assert load_token(token_file(tmp_path, b"f" * 32 + b"\n"), environ={TOKEN_ENV: "e" * 32}) == "f" * 32
    assert load_token(None, environ={TOKEN_ENV: " " + "e" * 32 + "\n"}) == "e" * 32
    with pytest.raises(ConfigError, match="no admin token"):
        load_token(None, environ={TOKEN_ENV: "   "})


def _config(tmp_path: Path, **overrides: object) -> object:
    args: dict[str, object] = {
        "guest_listen": "127.0.0.1:8080",
        "admin_listen": "127.0.0.1:8775",
        "db": tmp_path / "db",
        "token": "k" * 32,
        "tls_cert": None,
        "tls_key": None,
        "insecure_admin": False,
        "workers": 2,
        "max_waits_per_droplet": 8,
        "log_level": "info",
    }
    args.update(overrides)
    return build_config(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"guest_listen": "127.0.0.1"}, "expected HOST:PORT"),
        ({"guest_listen": ":80"}, "expected HOST:PORT"),
        ({"guest_listen": "example.com:80"}, "not an IP address"),
        ({"admin_listen": "127.0.0.1:0"}, "expected HOST:PORT"),
        ({"admin_listen": "127.0.0.1:\uff18\uff10"}, "expected HOST:PORT"),  # fullwidth "80"
        ({"admin_listen": "127.0.0.1:8080"}, "must not share"),
        ({"admin_listen": "10.0.0.1:8775"}, "not a loopback address"),
        ({"tls_key": Path("/nonexistent")}, "given together"),
        ({"max_waits_per_droplet": 0}, "at least 1"),
        ({"workers": 65}, "from 1 to 64"),
    ],
)
def test_config_bad_flags_are_refused(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_config_insecure_admin_allows_clear_text_on_a_network_address(tmp_path: Path) -> None:
    config = _config(tmp_path, admin_listen="[::]:8775", insecure_admin=True)
    assert config.admin_scheme == "http"  # type: ignore[attr-defined]
    v6 = _config(tmp_path, guest_listen="[fe80::1]:80", admin_listen="[::1]:8775")
    assert str(v6.guest_listen) == "[fe80::1]:80"  # type: ignore[attr-defined]


def test_config_unusable_tls_files_are_one_clear_error(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a PEM certificate and its private key"):
        _config(tmp_path, tls_cert=cert, tls_key=key)
