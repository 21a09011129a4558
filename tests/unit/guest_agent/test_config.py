"""Config parsing: a full example works; each mistake is one error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent.config import (
    CommandHookSpec,
    NestedVMsHookSpec,
    Phase,
    RestartMethod,
    SystemdAction,
    SystemdHookSpec,
    WebhookHookSpec,
    load_config,
    parse_config,
)
from guest_agent.errors import ConfigError

FULL = """
[metadata]
url = "http://169.254.169.254"
source_address = "127.0.0.5"
timeout_s = 3
long_poll_s = 120
max_backoff_s = 20

[agent]
journal_path = "/var/lib/guest-agent/journal.json"
prefer_offline = false
power_on_after = true
power_off_command = ["systemctl", "poweroff"]
power_off_timeout_s = 30
acknowledge_ready = true
default_notice_s = 600
deadline_margin_s = 20
log_level = "debug"

[metrics]
enabled = true
listen = "127.0.0.1:9475"

[[on_notice]]
name = "tell-lb"
type = "webhook"
url = "https://lb.example.com/api/pools/web/members/self/drain"
headers = { Authorization = "Bearer xyz" }
timeout_s = 30
attempts = 4

[[on_notice]]
name = "haproxy-drain"
command = ["/usr/local/bin/haproxy-drain", "web/node1"]
timeout_s = 120
idempotent = true
env = { SOCKET = "/run/haproxy/admin.sock" }

[[on_notice]]
name = "record-vms"
type = "nested_vms"
uri = "qemu:///system"
domains = ["ci-*"]
exclude = ["ci-keep"]

[[before_offline]]
name = "stop-app"
type = "systemd"
units = ["app.service", "worker.service"]
action = "stop"

[[after_migration]]
name = "restart-vms"
type = "nested_vms"
uri = "qemu:///system"
restart = "destroy_start"

[[after_migration]]
name = "haproxy-ready"
command = ["/usr/local/bin/haproxy-ready", "web/node1"]
stop_on_failure = true
"""


def test_config_full_example_parses() -> None:
    cfg = parse_config(FULL, environ={})
    assert cfg.metadata.source_address == "127.0.0.5"
    assert cfg.metadata.long_poll_s == 120
    assert cfg.agent.power_off_command == ("systemctl", "poweroff")
    assert cfg.metrics.enabled
    assert cfg.metrics.port == 9475
    on_notice = cfg.phase_hooks(Phase.ON_NOTICE)
    assert [h.name for h in on_notice] == ["tell-lb", "haproxy-drain", "record-vms"]
    assert isinstance(on_notice[0], WebhookHookSpec)
    assert on_notice[0].idempotent  # webhooks default to at-least-once
    assert dict(on_notice[0].headers) == {"Authorization": "Bearer xyz"}
    assert isinstance(on_notice[1], CommandHookSpec)
    assert on_notice[1].command == ("/usr/local/bin/haproxy-drain", "web/node1")
    assert on_notice[1].timeout_s == 120
    assert isinstance(on_notice[2], NestedVMsHookSpec)
    systemd = cfg.phase_hooks(Phase.BEFORE_OFFLINE)[0]
    assert isinstance(systemd, SystemdHookSpec)
    assert systemd.action is SystemdAction.STOP
    restart = cfg.phase_hooks(Phase.AFTER_MIGRATION)[0]
    assert isinstance(restart, NestedVMsHookSpec)
    assert restart.restart is RestartMethod.DESTROY_START


def test_config_docs_example_is_valid() -> None:
    """The full example in docs/agent.md is the one users copy: it must parse."""
    text = (Path(__file__).parents[3] / "docs" / "agent.md").read_text()
    block = text.split("<!-- full-example -->", 2)[1]
    toml = block.split("```toml", 1)[1].split("```", 1)[0]
    cfg = parse_config(toml, environ={})
    assert cfg.phase_hooks(Phase.ON_NOTICE)


def test_config_empty_file_gives_safe_defaults() -> None:
    cfg = parse_config("", environ={})
    assert cfg.metadata.url == "http://169.254.169.254"
    assert cfg.agent.power_off_command == ("systemctl", "poweroff")
    assert not cfg.agent.prefer_offline
    assert all(cfg.phase_hooks(p) == () for p in Phase)


def test_config_environment_overrides_the_file() -> None:
    cfg = parse_config(
        '[metadata]\nurl = "http://10.0.0.1"\n',
        environ={
            "GUEST_AGENT_METADATA_URL": "http://127.0.0.1:8080",
            "GUEST_AGENT_SOURCE_ADDRESS": "127.0.0.9",
        },
    )
    assert cfg.metadata.url == "http://127.0.0.1:8080"
    assert cfg.metadata.source_address == "127.0.0.9"


HOOK = '[[on_notice]]\nname = "h"\n'


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[metadata]\ntimeout_s = "5"\n', "metadata.timeout_s", "must be a number"),
        ("[metadata]\ntimeout_s = 0\n", "metadata.timeout_s", "between 0.5 and 300"),
        ("[metadata]\ntimeout_s = -1.5\n", "metadata.timeout_s", "between 0.5 and 300"),
        # Every number has a sane range: these made a root daemon useless or a flood.
        ("[metadata]\ntimeout_s = 1e300\n", "metadata.timeout_s", "between 0.5 and 300, got 1e+300"),
        ("[metadata]\npoll_interval_s = 1e-9\n", "metadata.poll_interval_s", "between 0.5 and 3600"),
        ("[metadata]\npoll_interval_s = 1e9\n", "metadata.poll_interval_s", "between 0.5 and 3600"),
        ("[metadata]\nmax_backoff_s = 0.001\n", "metadata.max_backoff_s", "between 1 and 3600"),
        ("[metadata]\nmax_backoff_s = 1e300\n", "metadata.max_backoff_s", "between 1 and 3600"),
        ("[agent]\npower_off_timeout_s = 1e300\n", "agent.power_off_timeout_s", "between 1 and 3600"),
        ("[agent]\ndefault_notice_s = 1e-9\n", "agent.default_notice_s", "between 10 and 604800"),
        ("[agent]\ndefault_notice_s = 1e300\n", "agent.default_notice_s", "between 10 and 604800"),
        ("[agent]\ndeadline_margin_s = -1\n", "agent.deadline_margin_s", "between 0 and 3600"),
        (HOOK + 'command = ["x"]\ntimeout_s = 1e300\n', "on_notice[0].timeout_s", "between 1 and 86400"),
        (HOOK + 'command = ["x"]\ntimeout_s = 1e-9\n', "on_notice[0].timeout_s", "between 1 and 86400"),
        (
            HOOK + 'type = "webhook"\nurl = "http://x"\nrequest_timeout_s = 1e300\n',
            "on_notice[0].request_timeout_s",
            "between 0.5 and 300",
        ),
        ('[metadata]\nurl = "169.254.169.254"\n', "metadata.url", "http://"),
        ('[metadata]\nurl = "ftp://x"\n', "metadata.url", "http://"),
        ('[metadata]\nurl = "http://"\n', "metadata.url", "host"),
        ('[metadata]\nurl = "http://host:99999"\n', "metadata.url", "not a valid URL"),
        ('[metadata]\nurl = "http://host/some/path"\n', "metadata.url", "base URL"),
        ('[metadata]\nsource_address = "localhost"\n', "metadata.source_address", "IP address"),
        ("[metadata]\nlong_poll_s = 301\n", "metadata.long_poll_s", "between 1 and 300"),
        ('[metadata]\nurll = "http://x"\n', "metadata.urll", "unknown key"),
        ('[agent]\nprefer_offline = "yes"\n', "agent.prefer_offline", "true or false"),
        (
            '[agent]\npower_off_command = "systemctl poweroff"\n',
            "agent.power_off_command",
            "list of arguments",
        ),
        ("[agent]\npower_off_command = []\n", "agent.power_off_command", "empty"),
        ('[agent]\nlog_level = "loud"\n', "agent.log_level", "one of"),
        ("[agent]\ndeadline_margin_s = 700\n", "agent.deadline_margin_s", "less than"),
        ('[metrics]\nlisten = "9475"\n', "metrics.listen", "HOST:PORT"),
        ('[[on_notice]]\ncommand = ["x"]\n', "on_notice[0].name", "required"),
        (HOOK, "on_notice[0].command", "required"),
        (HOOK + "command = []\n", "on_notice[0].command", "empty"),
        (HOOK + 'command = "/bin/drain --now"\n', "on_notice[0].command", "list of arguments"),
        (HOOK + 'command = ["x", 3]\n', "on_notice[0].command", "list of non-empty strings"),
        (HOOK + 'command = ["x"]\ntimeout_s = 0\n', "on_notice[0].timeout_s", "between 1 and 86400"),
        (HOOK + 'command = ["x"]\ntimeout_s = -3\n', "on_notice[0].timeout_s", "between 1 and 86400"),
        (HOOK + 'command = ["x"]\ntimeout = 3\n', "on_notice[0].timeout", "unknown key"),
        (HOOK + 'command = ["x"]\nidempotent = 1\n', "on_notice[0].idempotent", "true or false"),
        (HOOK + 'type = "shell"\n', "on_notice[0].type", "one of command, webhook"),
        (HOOK + 'type = "webhook"\n', "on_notice[0].url", "required"),
        (HOOK + 'type = "webhook"\nurl = "lb.example.com/drain"\n', "on_notice[0].url", "http://"),
        (HOOK + 'type = "webhook"\nurl = "http://x"\nattempts = 0\n', "on_notice[0].attempts", "between"),
        (HOOK + 'type = "systemd"\nunits = ["a"]\naction = "kill"\n', "on_notice[0].action", "one of"),
        (HOOK + 'type = "systemd"\naction = "stop"\n', "on_notice[0].units", "required"),
        (HOOK + 'type = "nested_vms"\nrestart = "command"\n', "on_notice[0].command", "required when"),
        (HOOK + 'command = ["x"]\n' + HOOK + 'command = ["y"]\n', "on_notice[1].name", "duplicate"),
        ('[[on_notice]]\nname = "bad name!"\ncommand = ["x"]\n', "on_notice[0].name", "letters"),
        ('[[after_migrate]]\nname = "x"\n', "after_migrate", "unknown key"),
        ("on_notice = 3\n", "on_notice", "array of tables"),
        ('[[after_migration]]\nname = "v"\ntype = "nested_vms"\n', "after_migration[0].uri", "records"),
        ("metadata = 3\n", "metadata", "must be a table"),
    ],
)
def test_config_error_names_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/guest-agent/config.toml", environ={})
    message = str(info.value)
    assert info.value.key == key
    assert message.startswith(f"/etc/guest-agent/config.toml: {key}: ")
    assert words in message
    assert "\n" not in message


def test_config_not_toml_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[metadata\nurl=", source="c.toml", environ={})
    assert str(info.value).startswith("c.toml: not valid TOML")
    assert "\n" not in str(info.value)


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", environ={})
