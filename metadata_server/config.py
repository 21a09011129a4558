"""The server's configuration, built once by the CLI from flags, environment and files."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# prometheus-client reads this when first imported: set it before importing metrics.py.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TOKEN_ENV = "METADATA_SERVER_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096
DEFAULT_GUEST_LISTEN = "169.254.169.254:80"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8775"
DEFAULT_DB = Path("/var/lib/metadata-server/state.sqlite3")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str, flag: str) -> Listen:
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{flag}: expected HOST:PORT (e.g. 127.0.0.1:8775), got {value!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError as e:
            raise ConfigError(f"{flag}: {host!r} is not an IP address") from e
        return cls(host, int(port))

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    guest_listen: Listen
    admin_listen: Listen
    db_path: Path
    admin_token: str
    tls_cert: Path | None = None
    tls_key: Path | None = None
    workers: int = 2
    max_waits_per_droplet: int = 8
    log_level: str = "info"

    @property
    def admin_scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def load_token(token_file: Path | None, environ: dict[str, str] | None = None) -> str:
    """The admin token from ``--admin-token-file`` or the environment; refuses to run without one."""
    environ = dict(os.environ) if environ is None else environ
    if token_file is not None:
        try:
            mode = token_file.stat().st_mode
            with token_file.open("rb") as f:
                raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
            token = raw.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--admin-token-file: cannot read {token_file}: {e}") from e
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"--admin-token-file: {token_file} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ConfigError(f"--admin-token-file: {token_file} is readable by other users; chmod 600 it")
        source = str(token_file)
    else:
        token = environ.get(TOKEN_ENV, "").strip()
        source = TOKEN_ENV
        if not token:
            raise ConfigError(f"no admin token: give --admin-token-file or set {TOKEN_ENV}")
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            f"admin token from {source} must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
            "without spaces"
        )
    return token


def _check_tls_files(cert: Path, key: Path) -> None:
    """Load the pair once now: a bad file is one clear error, not a worker failing at every start."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"--admin-tls-cert {cert} / --admin-tls-key {key}: "
            f"not a PEM certificate and its private key ({e})"
        ) from e


def build_config(
    *,
    guest_listen: str,
    admin_listen: str,
    db: Path,
    token: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure_admin: bool,
    workers: int,
    max_waits_per_droplet: int,
    log_level: str,
) -> ServerConfig:
    guest = Listen.parse(guest_listen, "--guest-listen")
    admin = Listen.parse(admin_listen, "--admin-listen")
    if guest.port == admin.port and (guest.host == admin.host or "0.0.0.0" in (guest.host, admin.host)):  # noqa: S104
        raise ConfigError("--guest-listen and --admin-listen must not share an address and port")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--admin-tls-cert and --admin-tls-key must be given together")
    for flag, path in (("--admin-tls-cert", tls_cert), ("--admin-tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: {path} is not a readable file")
    if tls_cert is not None and tls_key is not None:
        _check_tls_files(tls_cert, tls_key)
    if tls_cert is None and not admin.is_loopback and not insecure_admin:
        raise ConfigError(
            f"--admin-listen {admin} is not a loopback address: give --admin-tls-cert/--admin-tls-key, "
            "or --insecure-admin to serve the admin API in clear text"
        )
    if workers < 1 or workers > 64:
        raise ConfigError("--workers must be from 1 to 64")
    if max_waits_per_droplet < 1:
        raise ConfigError("--max-waits-per-droplet must be at least 1")
    return ServerConfig(
        guest_listen=guest,
        admin_listen=admin,
        db_path=db,
        admin_token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        workers=workers,
        max_waits_per_droplet=max_waits_per_droplet,
        log_level=log_level,
    )
