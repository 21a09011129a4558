"""``check-config`` (and ``run``) refuse what makes the root daemon unsafe or useless, as sshd does.

Before: a world-writable config, hook file or hook directory, and a command that does not exist, were all "OK".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from guest_agent.cli import main
from guest_agent.errors import EXIT_CONFIG

Setup = Callable[[Path], str]  # builds what the case needs under tmp_path; returns the config's hook part


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"GUEST_AGENT_CONFIG": None, "JOURNAL_STREAM": None})


def _script(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def _hook(command: str, extra: str = "") -> str:
    return f'[[on_notice]]\nname = "drain"\ncommand = ["{command}"]\n{extra}'


def _world_writable_hook(tmp: Path) -> str:
    return _hook(str(_script(tmp / "hooks" / "drain", 0o777)))


def _world_writable_hook_dir(tmp: Path) -> str:
    hook = _script(tmp / "hooks" / "drain")
    (tmp / "hooks").chmod(0o777)
    return _hook(str(hook))


def _symlink_to_world_writable(tmp: Path) -> str:
    target = _script(tmp / "elsewhere" / "real-drain", 0o757)
    link = tmp / "hooks" / "drain"
    link.parent.mkdir()
    link.symlink_to(target)
    return _hook(str(link))


def _foreign_owner(tmp: Path) -> str:
    hook = _script(tmp / "hooks" / "drain")
    os.chown(hook, 4242, 4242)
    return _hook(str(hook))


def _foreign_dir(tmp: Path) -> str:
    hook = _script(tmp / "hooks" / "drain")
    os.chown(tmp / "hooks", 4242, 4242)
    return _hook(str(hook))


def _not_executable(tmp: Path) -> str:
    return _hook(str(_script(tmp / "hooks" / "drain", 0o644)))


UNSAFE: dict[str, tuple[Setup, str, str]] = {
    "world-writable hook": (_world_writable_hook, "on_notice[0].command", "world-writable"),
    "world-writable hook directory": (_world_writable_hook_dir, "on_notice[0].command", "world-writable"),
    "symlink to a world-writable hook": (
        _symlink_to_world_writable,
        "on_notice[0].command",
        "world-writable",
    ),
    "hook owned by another user": (_foreign_owner, "on_notice[0].command", "owned by uid 4242"),
    "hook directory owned by another user": (_foreign_dir, "on_notice[0].command", "owned by uid 4242"),
    "hook not executable": (_not_executable, "on_notice[0].command", "not an executable"),
    "absolute command missing": (
        lambda tmp: _hook(str(tmp / "nope" / "drain")),
        "on_notice[0].command",
        "no such program",
    ),
    "command not on PATH": (
        lambda tmp: _hook("no-such-program-on-this-machine"),
        "on_notice[0].command",
        "no such program: no-such-program-on-this-machine on PATH",
    ),
    "relative command without cwd": (
        lambda tmp: _hook("bin/drain"),
        "on_notice[0].command",
        "no such program",
    ),
    "cwd missing": (
        lambda tmp: _hook("/bin/true", f'cwd = "{tmp / "gone"}"\n'),
        "on_notice[0].cwd",
        "no such directory",
    ),
    "systemctl missing": (
        lambda tmp: (
            '[[on_notice]]\nname = "s"\ntype = "systemd"\nunits = ["a"]\naction = "stop"\n'
            f'systemctl = ["{tmp / "no-systemctl"}"]\n'
        ),
        "on_notice[0].systemctl",
        "no such program",
    ),
    "nested vms restart command missing": (
        lambda tmp: (
            '[[on_notice]]\nname = "r"\ntype = "nested_vms"\n'
            '[[after_migration]]\nname = "v"\ntype = "nested_vms"\nrestart = "command"\n'
            f'command = ["{tmp / "no-restart"}", "{{domain}}"]\n'
        ),
        "after_migration[0].command",
        "no such program",
    ),
    "power-off command missing": (
        lambda tmp: "",  # the [agent] table below names it
        "agent.power_off_command",
        "no such program",
    ),
}


def _write_config(tmp: Path, hooks: str, *, power_off: str = "/bin/true") -> Path:
    config = tmp / "etc" / "config.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(
        f'[metadata]\nurl = "http://127.0.0.1:1"\n[agent]\njournal_path = "{tmp / "state" / "journal.json"}"\n'
        f'power_off_command = ["{power_off}"]\n{hooks}'
    )
    return config


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_config_safety_refuses_unsafe_or_missing_programs(
    runner: CliRunner, tmp_path: Path, command: str, case: str
) -> None:
    setup, key, words = UNSAFE[case]
    power_off = str(tmp_path / "no-poweroff") if case == "power-off command missing" else "/bin/true"
    config = _write_config(tmp_path, setup(tmp_path), power_off=power_off)
    result = runner.invoke(main, [command, "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == EXIT_CONFIG, result.stdout
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"guest-agent: {config}: {key}: ")
    assert words in line
    assert not (tmp_path / "state").exists()  # `run` started nothing


@pytest.mark.parametrize("mode", [0o666, 0o602])
def test_config_safety_refuses_a_world_writable_config_file(
    runner: CliRunner, tmp_path: Path, mode: int
) -> None:
    config = _write_config(tmp_path, _hook("/bin/true"))
    config.chmod(mode)
    result = runner.invoke(main, ["check-config", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == EXIT_CONFIG
    assert "refusing an unsafe config file" in result.stderr and "world-writable" in result.stderr


def test_config_safety_refuses_a_config_in_a_world_writable_directory(
    runner: CliRunner, tmp_path: Path
) -> None:
    config = _write_config(tmp_path, _hook("/bin/true"))
    config.parent.chmod(0o777)
    result = runner.invoke(main, ["check-config", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == EXIT_CONFIG
    assert f"{config.parent} is world-writable" in result.stderr


def test_config_safety_accepts_safe_setups(runner: CliRunner, tmp_path: Path) -> None:
    # A sticky world-writable ancestor (like /tmp) is fine: others cannot replace what is ours in it.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    hook = _script(tmp_path / "shared" / "mine" / "drain")
    on_path = _script(tmp_path / "bin" / "my-drain")
    config = _write_config(
        tmp_path,
        _hook(str(hook))
        + '[[on_notice]]\nname = "by-name"\ncommand = ["my-drain"]\n'
        + f'env = {{ PATH = "{on_path.parent}" }}\n'
        + '[[on_notice]]\nname = "relative"\ncommand = ["./drain"]\n'
        + f'cwd = "{hook.parent}"\n'
        + '[[on_notice]]\nname = "shell"\ncommand = ["sh", "-c", "true"]\n',
    )
    result = runner.invoke(main, ["check-config", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "OK" in result.stdout
