"""``metadata-server install-unit``: the packaged systemd unit, rendered for this installation.

The unit (``metadata-server.service`` beside this module) carries the hardening; this fills in the command
line from the same flags ``serve`` takes (checked by the same rules, so a unit that would not start is refused
here) and hands the admin token and TLS files over as systemd credentials (``LoadCredential=``), so the
service user never needs to read /etc and no secret appears in the unit or the process list.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import MIN_TOKEN_CHARS, build_config
from .errors import ConfigError

UNIT_NAME = "metadata-server.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_TOKEN_SOURCE = Path("/etc/metadata-server/admin-token")
# What systemd puts in $CREDENTIALS_DIRECTORY for each LoadCredential= line.
TOKEN_CREDENTIAL = "admin-token"  # noqa: S105 - a credential name, not a secret
CERT_CREDENTIAL = "admin-tls-cert"
KEY_CREDENTIAL = "admin-tls-key"
# Paths go into ExecStart= and LoadCredential= unquoted: anything beyond these characters (spaces, quotes,
# '%' specifiers, '$' expansions, newlines that would add directives) is refused, not escaped.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")


@dataclass(frozen=True)
class UnitSettings:
    """What the rendered unit runs: ``serve``'s flags, with the secrets as credential sources."""

    executable: str
    guest_listen: str
    admin_listen: str
    db: Path
    token_file: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_admin: bool = False
    workers: int = 2


def _path(value: Path | str, flag: str) -> str:
    text = str(value)
    if not _SAFE_PATH.match(text) or "//" in text or "/../" in f"{text}/":
        raise ConfigError(
            f"{flag}: {text!r} must be an absolute path of letters, digits and ._/@+- only "
            "(it goes into the unit unquoted)"
        )
    return text


def check(settings: UnitSettings) -> None:
    """Refuse what ``serve`` would refuse at start (the same checks, TLS files loaded), and anything that
    cannot go into a unit safely. The token file is only named here: systemd reads it at each start."""
    build_config(
        guest_listen=settings.guest_listen,
        admin_listen=settings.admin_listen,
        db=settings.db,
        token="x" * MIN_TOKEN_CHARS,  # the real one is read by the service, from its credential
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        insecure_admin=settings.insecure_admin,
        workers=settings.workers,
        max_waits_per_droplet=1,
        log_level="info",
    )
    _path(settings.executable, "executable")
    _path(settings.db, "--db")
    _path(settings.token_file, "--admin-token-file")
    for path, flag in ((settings.tls_cert, "--admin-tls-cert"), (settings.tls_key, "--admin-tls-key")):
        if path is not None:
            _path(path, flag)


def render(settings: UnitSettings) -> str:
    """The unit's text for ``settings`` (checked first)."""
    check(settings)
    creds = "${CREDENTIALS_DIRECTORY}"
    argv = [
        settings.executable,
        "serve",
        "--guest-listen",
        settings.guest_listen,
        "--admin-listen",
        settings.admin_listen,
        "--db",
        str(settings.db),
        "--admin-token-file",
        f"{creds}/{TOKEN_CREDENTIAL}",
        "--workers",
        str(settings.workers),
    ]
    credentials = [f"LoadCredential={TOKEN_CREDENTIAL}:{settings.token_file}"]
    if settings.tls_cert is not None and settings.tls_key is not None:
        argv += ["--admin-tls-cert", f"{creds}/{CERT_CREDENTIAL}"]
        argv += ["--admin-tls-key", f"{creds}/{KEY_CREDENTIAL}"]
        credentials.append(f"LoadCredential={CERT_CREDENTIAL}:{settings.tls_cert}")
        credentials.append(f"LoadCredential={KEY_CREDENTIAL}:{settings.tls_key}")
    if settings.insecure_admin:
        argv.append("--insecure-admin")
    template = importlib.resources.files("metadata_server").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    return template.replace("@EXEC@", "ExecStart=" + " ".join(argv)).replace(
        "@CREDENTIALS@", "\n".join(credentials)
    )


def write(text: str, dest: Path, *, force: bool) -> Path:
    """Write the unit into ``dest``; an existing unit is kept unless ``force``."""
    target = dest / UNIT_NAME
    if target.exists() and not force:
        raise ConfigError(f"{target} exists (use --force to overwrite)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {target}: {e.strerror or e}") from e
    return target


def server_executable() -> str:
    """This installation's ``metadata-server`` (beside the running Python, else on PATH)."""
    beside = Path(sys.executable).parent / "metadata-server"
    if beside.exists():
        return str(beside)
    return shutil.which("metadata-server") or "/usr/local/bin/metadata-server"
