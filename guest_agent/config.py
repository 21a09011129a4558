"""The agent's configuration: a TOML file (+ ``GUEST_AGENT_*`` variables) → frozen dataclasses.

Built once at the entry point (and again on SIGHUP), then passed down. Every problem is reported as a
:class:`~guest_agent.errors.ConfigError` whose message names the file and the key, e.g.
``/etc/guest-agent/config.toml: on_notice[1].timeout_s: must be a number > 0, got 0``.

The whole reference, with a full example, is in ``docs/agent.md``.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from guest_agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/guest-agent/config.toml")
DEFAULT_METADATA_URL = "http://169.254.169.254"
DEFAULT_JOURNAL_PATH = "/var/lib/guest-agent/journal.json"
DEFAULT_POWER_OFF_COMMAND = ("systemctl", "poweroff")
DEFAULT_HOOK_TIMEOUT_S = 60.0
DEFAULT_METRICS_LISTEN = "127.0.0.1:9475"
LONG_POLL_MIN_S = 1
LONG_POLL_MAX_S = 300  # the server's cap on timeout_sec
ENV_PREFIX = "GUEST_AGENT_"

_HOOK_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class Phase(enum.Enum):
    """When a group of hooks runs (docs/agent.md, "Hooks")."""

    ON_NOTICE = "on_notice"  # the event was first seen: drain
    BEFORE_OFFLINE = "before_offline"  # the shutdown path, before the ack `offline` and the power-off
    AFTER_MIGRATION = "after_migration"  # the flag cleared: restore


class RestartMethod(enum.Enum):
    """How ``nested_vms`` restarts a nested domain that was running at notice."""

    RESET = "reset"
    DESTROY_START = "destroy_start"
    COMMAND = "command"


class SystemdAction(enum.Enum):
    STOP = "stop"
    START = "start"
    RESTART = "restart"


@dataclass(frozen=True, kw_only=True)
class HookSpec:
    """What every hook has: a name unique in its phase, a timeout, and how a crash is handled."""

    name: str
    timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    # Re-run after a crash interrupted it? Commands default to no (we cannot know); the others to yes.
    idempotent: bool = False
    stop_on_failure: bool = False

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class CommandHookSpec(HookSpec):
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None

    @property
    def kind(self) -> str:
        return "command"


@dataclass(frozen=True, kw_only=True)
class WebhookHookSpec(HookSpec):
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    request_timeout_s: float = 10.0
    attempts: int = 5
    idempotent: bool = True  # delivered at least once, with an idempotency key

    @property
    def kind(self) -> str:
        return "webhook"


@dataclass(frozen=True, kw_only=True)
class NestedVMsHookSpec(HookSpec):
    uri: str = "qemu:///system"
    domains: tuple[str, ...] = ("*",)  # fnmatch patterns
    exclude: tuple[str, ...] = ()
    restart: RestartMethod = RestartMethod.RESET
    command: tuple[str, ...] = ()  # for restart = "command"; "{domain}" is replaced by the name
    idempotent: bool = True

    @property
    def kind(self) -> str:
        return "nested_vms"


@dataclass(frozen=True, kw_only=True)
class SystemdHookSpec(HookSpec):
    units: tuple[str, ...]
    action: SystemdAction
    systemctl: tuple[str, ...] = ("systemctl",)
    idempotent: bool = True

    @property
    def kind(self) -> str:
        return "systemd"


@dataclass(frozen=True)
class MetadataConfig:
    url: str = DEFAULT_METADATA_URL
    source_address: str | None = None
    timeout_s: float = 5.0
    long_poll_s: int = 60
    poll_interval_s: float = 5.0  # against a server that cannot long-poll (a plain text-only endpoint)
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class PolicyConfig:
    journal_path: Path = Path(DEFAULT_JOURNAL_PATH)
    prefer_offline: bool = False
    power_on_after: bool = True
    power_off_command: tuple[str, ...] = DEFAULT_POWER_OFF_COMMAND
    power_off_timeout_s: float = 60.0
    acknowledge_ready: bool = False
    # Deadline on a text-only server (no JSON details): this long after the event was first seen.
    default_notice_s: float = 600.0
    # Hooks of on_notice/before_offline must end this long before the deadline (room for ack + power-off).
    deadline_margin_s: float = 30.0
    log_level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9475


@dataclass(frozen=True)
class AgentConfig:
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    agent: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    hooks: Mapping[Phase, tuple[HookSpec, ...]] = field(default_factory=dict)
    source: str | None = None  # the file it came from, for messages

    def phase_hooks(self, phase: Phase) -> tuple[HookSpec, ...]:
        return tuple(self.hooks.get(phase, ()))


# --------------------------------------------------------------------------------------------------
# Reading


def load_config(path: Path | str, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, merge the environment into, and validate the config file at ``path``; then check it against
    this machine (``config_safety``: no file another user could change, no program that does not exist)."""
    # Imported here: config_safety builds on this module's types.
    from guest_agent.config_safety import check_config_file, check_installation

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError("file not found", source=source) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", source=source) from e
    check_config_file(Path(path), source=source)
    config = parse_config(text, source=source, environ=environ)
    check_installation(config, environ=os.environ if environ is None else environ)
    return config


def parse_config(
    text: str, *, source: str | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Validate TOML ``text``; ``GUEST_AGENT_*`` variables in ``environ`` override the file."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", source=source) from e
    env = os.environ if environ is None else environ
    return _build(doc, source=source, environ=env)


_ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    # variable suffix -> (table, key); the value is parsed like the file's value would be
    "METADATA_URL": ("metadata", "url"),
    "SOURCE_ADDRESS": ("metadata", "source_address"),
    "JOURNAL_PATH": ("agent", "journal_path"),
    "LOG_LEVEL": ("agent", "log_level"),
}


def _build(doc: dict[str, Any], *, source: str | None, environ: Mapping[str, str]) -> AgentConfig:
    root = _Table(doc, "", source)
    for suffix, (table, key) in _ENV_OVERRIDES.items():
        value = environ.get(ENV_PREFIX + suffix)
        if value is not None:
            sub = doc.setdefault(table, {})
            if isinstance(sub, dict):
                sub[key] = value
    metadata = _metadata(root.table("metadata"))
    policy = _policy(root.table("agent"))
    metrics = _metrics(root.table("metrics"))
    hooks = {phase: _hooks(root, phase) for phase in Phase}
    _check_nested_vms(hooks, source)
    root.done()
    return AgentConfig(metadata=metadata, agent=policy, metrics=metrics, hooks=hooks, source=source)


def _check_nested_vms(hooks: Mapping[Phase, tuple[HookSpec, ...]], source: str | None) -> None:
    """An after_migration nested_vms hook restarts what one before it recorded: make sure one does."""
    recorded = {
        h.uri
        for phase in (Phase.ON_NOTICE, Phase.BEFORE_OFFLINE)
        for h in hooks[phase]
        if isinstance(h, NestedVMsHookSpec)
    }
    for i, h in enumerate(hooks[Phase.AFTER_MIGRATION]):
        if isinstance(h, NestedVMsHookSpec) and h.uri not in recorded:
            raise ConfigError(
                f"restarts the nested VMs recorded at notice, but no nested_vms hook in on_notice "
                f"records {h.uri!r}",
                key=f"after_migration[{i}].uri",
                source=source,
            )


def _metadata(t: _Table) -> MetadataConfig:
    url = t.url("url", DEFAULT_METADATA_URL, allow_path=False)
    source_address = t.opt_str("source_address")
    if source_address is not None:
        try:
            ipaddress.ip_address(source_address)
        except ValueError:
            t.fail("source_address", f"not an IP address: {source_address!r}")
    cfg = MetadataConfig(
        url=url,
        source_address=source_address,
        timeout_s=t.number_in("timeout_s", 5.0, lo=0.5, hi=300),
        long_poll_s=t.integer("long_poll_s", 60, lo=LONG_POLL_MIN_S, hi=LONG_POLL_MAX_S),
        poll_interval_s=t.number_in("poll_interval_s", 5.0, lo=0.5, hi=3600),
        max_backoff_s=t.number_in("max_backoff_s", 30.0, lo=1, hi=3600),
    )
    t.done()
    return cfg


def _policy(t: _Table) -> PolicyConfig:
    default_notice_s = t.number_in("default_notice_s", 600.0, lo=10, hi=7 * 86400)
    margin = t.number_in("deadline_margin_s", 30.0, lo=0, hi=3600)
    if margin >= default_notice_s:
        t.fail(
            "deadline_margin_s", f"must be less than default_notice_s ({default_notice_s:g}), got {margin:g}"
        )
    level = t.string("log_level", "info").lower()
    if level not in _LOG_LEVELS:
        t.fail("log_level", f"must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    cfg = PolicyConfig(
        journal_path=Path(t.string("journal_path", DEFAULT_JOURNAL_PATH, non_empty=True)),
        prefer_offline=t.boolean("prefer_offline", False),
        power_on_after=t.boolean("power_on_after", True),
        power_off_command=t.argv("power_off_command", DEFAULT_POWER_OFF_COMMAND),
        power_off_timeout_s=t.number_in("power_off_timeout_s", 60.0, lo=1, hi=3600),
        acknowledge_ready=t.boolean("acknowledge_ready", False),
        default_notice_s=default_notice_s,
        deadline_margin_s=margin,
        log_level=level,
    )
    t.done()
    return cfg


def _metrics(t: _Table) -> MetricsConfig:
    enabled = t.boolean("enabled", False)
    listen = t.string("listen", DEFAULT_METRICS_LISTEN, non_empty=True)
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        t.fail("listen", f"must be HOST:PORT with a port 1-65535, got {listen!r}")
    t.done()
    return MetricsConfig(enabled=enabled, host=host.strip("[]"), port=int(port_text))


def _hooks(root: _Table, phase: Phase) -> tuple[HookSpec, ...]:
    items = root.array_of_tables(phase.value)
    specs: list[HookSpec] = []
    seen: set[str] = set()
    for t in items:
        spec = _hook(t)
        if spec.name in seen:
            t.fail("name", f"duplicate hook name {spec.name!r} in {phase.value}")
        seen.add(spec.name)
        specs.append(spec)
    return tuple(specs)


def _hook(t: _Table) -> HookSpec:
    kind = t.string("type", "command")
    name = t.string("name")
    if not _HOOK_NAME_RE.fullmatch(name):
        t.fail("name", f"must be 1-64 of letters, digits, '.', '_', '-', got {name!r}")
    common: dict[str, Any] = {
        "name": name,
        "timeout_s": t.number_in("timeout_s", DEFAULT_HOOK_TIMEOUT_S, lo=1, hi=86400),
        "stop_on_failure": t.boolean("stop_on_failure", False),
    }
    spec: HookSpec
    if kind == "command":
        spec = CommandHookSpec(
            **common,
            idempotent=t.boolean("idempotent", False),
            command=t.argv("command"),
            env=tuple(t.str_map("env").items()),
            cwd=t.opt_str("cwd"),
        )
    elif kind == "webhook":
        spec = WebhookHookSpec(
            **common,
            idempotent=t.boolean("idempotent", True),
            url=t.url("url"),
            headers=tuple(t.str_map("headers").items()),
            request_timeout_s=t.number_in("request_timeout_s", 10.0, lo=0.5, hi=300),
            attempts=t.integer("attempts", 5, lo=1, hi=100),
        )
    elif kind == "nested_vms":
        restart_text = t.string("restart", RestartMethod.RESET.value)
        try:
            restart = RestartMethod(restart_text)
        except ValueError:
            t.fail("restart", f"must be one of reset, destroy_start, command, got {restart_text!r}")
        command = t.argv("command", ())
        if restart is RestartMethod.COMMAND and not command:
            t.fail("command", 'required when restart = "command"')
        spec = NestedVMsHookSpec(
            **common,
            idempotent=t.boolean("idempotent", True),
            uri=t.string("uri", "qemu:///system", non_empty=True),
            domains=t.str_list("domains", ("*",), non_empty=True),
            exclude=t.str_list("exclude", ()),
            restart=restart,
            command=command,
        )
    elif kind == "systemd":
        action_text = t.string("action")
        try:
            action = SystemdAction(action_text)
        except ValueError:
            t.fail("action", f"must be one of stop, start, restart, got {action_text!r}")
        spec = SystemdHookSpec(
            **common,
            idempotent=t.boolean("idempotent", True),
            units=t.str_list("units", non_empty=True),
            action=action,
            systemctl=t.argv("systemctl", ("systemctl",)),
        )
    else:
        t.fail("type", f"must be one of command, webhook, nested_vms, systemd, got {kind!r}")
    t.done()
    return spec


_REQUIRED: Any = object()


class _Table:
    """A TOML table being read: typed getters that name the key, and a check for unknown keys."""

    def __init__(self, data: dict[str, Any], path: str, source: str | None) -> None:
        self._data = data
        self._path = path
        self._source = source
        self._used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(message, key=self._key(key), source=self._source)

    def _get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        if key in self._data:
            return self._data[key]
        if default is _REQUIRED:
            self.fail(key, "required")
        return default

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            self.fail(unknown[0], "unknown key")

    def table(self, key: str) -> _Table:
        value = self._get(key, {})
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ([{self._key(key)}]), got {_type(value)}")
        return _Table(value, self._key(key), self._source)

    def array_of_tables(self, key: str) -> list[_Table]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(key, f"must be an array of tables ([[{self._key(key)}]]), got {_type(value)}")
        return [_Table(v, f"{self._key(key)}[{i}]", self._source) for i, v in enumerate(value)]

    def string(self, key: str, default: Any = _REQUIRED, *, non_empty: bool = False) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_type(value)}")
        if non_empty and not value.strip():
            self.fail(key, "must not be empty")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {_type(value)}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_type(value)}")
        return value

    def _number(self, key: str, default: Any) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(key, f"must be a number, got {_type(value)}")
        return float(value)

    def number_in(self, key: str, default: Any = _REQUIRED, *, lo: float, hi: float) -> float:
        """A number in [lo, hi]: every duration has a sane range (1e-9 s polls flood the service, 1e300 s
        overflows the socket layer)."""
        value = self._number(key, default)
        if not lo <= value <= hi:
            self.fail(key, f"must be a number between {lo:g} and {hi:g}, got {value:g}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_type(value)}")
        if not lo <= value <= hi:
            self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def str_list(self, key: str, default: Any = _REQUIRED, *, non_empty: bool = False) -> tuple[str, ...]:
        value = self._get(key, default)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f"must be a list of non-empty strings, got {_type(value)}")
        if non_empty and not value:
            self.fail(key, "must not be empty")
        return tuple(value)

    def argv(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        """A command as an argv list (never a shell string: we do not run a shell)."""
        value = self._get(key, default)
        if isinstance(value, str):
            self.fail(
                key, f'must be a list of arguments like ["/usr/bin/prog", "--flag"], not a string {value!r}'
            )
        argv = self.str_list(key, default)
        if key in self._data and not argv:
            self.fail(key, "must not be empty")
        return argv

    def str_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            self.fail(key, f"must be a table of strings, got {_type(value)}")
        return dict(value)

    def url(self, key: str, default: Any = _REQUIRED, *, allow_path: bool = True) -> str:
        text = self.string(key, default, non_empty=True)
        try:
            parts = urlsplit(text)
            port = parts.port  # raises ValueError for a bad port
        except ValueError:
            self.fail(key, f"not a valid URL: {text!r}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(key, f"must be an http:// or https:// URL with a host, got {text!r}")
        if port == 0 or any(c.isspace() for c in text):
            self.fail(key, f"not a valid URL: {text!r}")
        if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
            self.fail(key, f"must be the service's base URL (scheme://host[:port]), got {text!r}")
        return text.rstrip("/") if not allow_path else text


def _type(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, int | float):
        return f"{value!r} (a number)"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
