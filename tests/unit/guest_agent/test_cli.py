"""The CLI through click's CliRunner: one clear line per mistake, the right exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from guest_agent.cli import main
from guest_agent.errors import EXIT_CONFIG, EXIT_HOOK_FAILED, EXIT_UNAVAILABLE

BAD_CONFIGS = {
    "wrong type": ('[agent]\nprefer_offline = "yes"\n', "agent.prefer_offline"),
    "unknown key": ("[agent]\nprefer_ofline = true\n", "agent.prefer_ofline: unknown key"),
    "missing command": ('[[on_notice]]\nname = "drain"\n', "on_notice[0].command: required"),
    "zero timeout": ('[[on_notice]]\nname = "d"\ncommand = ["x"]\ntimeout_s = 0\n', "on_notice[0].timeout_s"),
    "negative timeout": ("[metadata]\ntimeout_s = -1\n", "metadata.timeout_s"),
    "malformed url": ('[metadata]\nurl = "http//169.254.169.254"\n', "metadata.url"),
    "malformed webhook url": (
        '[[on_notice]]\nname = "w"\ntype = "webhook"\nurl = "lb.example.com"\n',
        "on_notice[0].url",
    ),
    "not toml": ("[agent\n", "not valid TOML"),
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"GUEST_AGENT_CONFIG": None, "JOURNAL_STREAM": None})


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_bad_config_is_one_line_and_exit_3(
    runner: CliRunner, tmp_path: Path, command: str, case: str
) -> None:
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "config.toml"
    config.write_text(f'[metadata]\nurl = "http://127.0.0.1:1"\n{text}' if "[metadata]" not in text else text)
    result = runner.invoke(main, [command, "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == EXIT_CONFIG
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"guest-agent: {config}: ")
    assert expected in lines[0]


def test_cli_missing_config_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["check-config", "--config", str(tmp_path / "none.toml")], catch_exceptions=False
    )
    assert result.exit_code == EXIT_CONFIG
    assert "file not found" in result.stderr


def test_cli_check_config_summarises_a_good_file(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[on_notice]]\nname = "drain"\ncommand = ["/bin/true"]\n')
    result = runner.invoke(main, ["check-config", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "OK" in result.stdout
    assert "on_notice: drain (command)" in result.stdout


def _sim_config(tmp_path: Path, *, fail: bool = False) -> Path:
    config = tmp_path / "config.toml"
    journal = tmp_path / "journal.json"
    out = tmp_path / "ran"
    config.write_text(
        f"""
[agent]
journal_path = "{journal}"
power_off_command = ["/bin/sh", "-c", "echo POWEROFF >> {out}"]
[[on_notice]]
name = "drain"
command = ["/bin/sh", "-c", "echo drain $MAINTENANCE_SIMULATED >> {out}"]
[[before_offline]]
name = "stop"
command = ["/bin/sh", "-c", "echo stop >> {out}; exit {1 if fail else 0}"]
[[after_migration]]
name = "restore"
command = ["/bin/sh", "-c", "echo restore >> {out}"]
"""
    )
    return config


@pytest.mark.parametrize(
    ("event", "expected"),
    [("live_migrate", ["drain 1", "restore"]), ("offline_migrate", ["drain 1", "stop", "restore"])],
)
def test_cli_simulate_runs_the_hooks_but_never_powers_off(
    runner: CliRunner, tmp_path: Path, event: str, expected: list[str]
) -> None:
    config = _sim_config(tmp_path)
    result = runner.invoke(
        main, ["simulate", "--config", str(config), "--event", event], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ran").read_text().splitlines() == expected  # no POWEROFF line
    assert not (tmp_path / "journal.json").exists()  # the daemon's journal is untouched
    if event == "offline_migrate":
        assert "would run /bin/sh" in result.stdout


def test_cli_simulate_dry_run_runs_nothing(runner: CliRunner, tmp_path: Path) -> None:
    config = _sim_config(tmp_path)
    args = ["simulate", "--config", str(config), "--event", "offline_migrate", "--dry-run"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ran").exists()
    assert "[dry run] on_notice/drain: would run" in result.stdout


def test_cli_simulate_reports_a_failing_hook(runner: CliRunner, tmp_path: Path) -> None:
    config = _sim_config(tmp_path, fail=True)
    args = ["simulate", "--config", str(config), "--event", "offline_migrate"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == EXIT_HOOK_FAILED
    assert "before_offline/stop: failed" in result.stdout
    assert "POWEROFF" not in (tmp_path / "ran").read_text()


def test_cli_install_unit_writes_the_packaged_unit(runner: CliRunner, tmp_path: Path) -> None:
    dest = tmp_path / "systemd"
    args = ["install-unit", "--dest", str(dest), "--config", "/etc/ga.toml"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    unit = (dest / "guest-agent.service").read_text()
    assert "[Service]" in unit
    assert "KillMode=mixed" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("guest-agent run --config /etc/ga.toml")
    again = runner.invoke(main, args, catch_exceptions=False)
    assert again.exit_code != 0
    assert "--force" in again.stderr
    assert runner.invoke(main, [*args, "--force"], catch_exceptions=False).exit_code == 0


def test_cli_status_with_the_service_down(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[metadata]\nurl = "http://127.0.0.1:9"\ntimeout_s = 1\n[agent]\njournal_path = "{tmp_path / "j.json"}"\n'
    )
    result = runner.invoke(main, ["status", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "metadata: unreachable" in result.stdout
    assert "agent: idle" in result.stdout
