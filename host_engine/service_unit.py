"""``host-engine install-unit``: the packaged systemd unit for ``host-engine run``, rendered for this host.

The unit (``host-engine.service`` beside this module) carries the hardening; this fills in the command line
(config file, optional worker name and metrics listener) and the user it runs as. Every value is checked
before anything is written: a path or name that would need quoting in a unit (spaces, ``%`` specifiers, ``$``
expansions, newlines that would add directives) is refused, not escaped.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from host_engine.errors import InvalidInput
from host_engine.metrics_http import parse_listen

UNIT_NAME = "host-engine.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CONFIG = Path("/etc/host-engine/config.toml")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
# systemd's own rule for User= names (a portable subset of what useradd accepts).
_SAFE_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SAFE_WORKER = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


@dataclass(frozen=True)
class UnitSettings:
    executable: str
    config: Path
    worker: str | None = None
    metrics_listen: str | None = None
    user: str | None = None


def _path(value: Path | str, flag: str) -> str:
    text = str(value)
    if not _SAFE_PATH.match(text) or "//" in text or "/../" in f"{text}/":
        raise InvalidInput(
            f"{flag}: {text!r} must be an absolute path of letters, digits and ._/@+- only "
            "(it goes into the unit unquoted)",
            field=flag.lstrip("-"),
        )
    return text


def render(settings: UnitSettings) -> str:
    """The unit's text for ``settings``; ``InvalidInput`` (one line) for anything unsafe or malformed."""
    argv = [_path(settings.executable, "executable"), "--config", _path(settings.config, "--config"), "run"]
    if settings.worker is not None:
        if not _SAFE_WORKER.match(settings.worker):
            raise InvalidInput(
                f"--worker: {settings.worker!r} must be 1-128 of letters, digits and ._:@-", field="worker"
            )
        argv += ["--worker", settings.worker]
    if settings.metrics_listen is not None:
        host, port = parse_listen(settings.metrics_listen)  # the same check `run` makes
        if not re.fullmatch(r"[0-9A-Za-z.:-]+", host):
            raise InvalidInput(f"--metrics-listen: {host!r} is not an address", field="metrics_listen")
        argv += ["--metrics-listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    user_lines = ""
    if settings.user is not None:
        if not _SAFE_USER.match(settings.user):
            raise InvalidInput(f"--user: {settings.user!r} is not a valid user name", field="user")
        user_lines = f"User={settings.user}\nGroup={settings.user}"
    else:
        user_lines = (
            "# Runs as root (with no capabilities) so qemu:///system sockets work; --user NAME to change."
        )
    template = importlib.resources.files("host_engine").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    return template.replace("@EXEC@", "ExecStart=" + " ".join(argv)).replace("@USER@", user_lines)


def write(text: str, dest: Path, *, force: bool) -> Path:
    """Write the unit into ``dest``; an existing unit is kept unless ``force``."""
    target = dest / UNIT_NAME
    if target.exists() and not force:
        raise InvalidInput(f"{target} exists (use --force to overwrite)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"cannot write {target}: {e.strerror or e}") from e
    return target


def engine_executable() -> str:
    """This installation's ``host-engine`` (beside the running Python, else on PATH)."""
    beside = Path(sys.executable).parent / "host-engine"
    if beside.exists():
        return str(beside)
    return shutil.which("host-engine") or "/usr/local/bin/host-engine"
