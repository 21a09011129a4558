"""``guest-agent run`` / ``check-config`` as real processes with bad config files: one line, exit 3, nothing started."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.test_agent_harness import AGENT_BIN

CASES = {
    "wrong type": ('[metadata]\nlong_poll_s = "60"\n', "metadata.long_poll_s: must be an integer"),
    "unknown key": (
        '[[on_notice]]\nname = "d"\ncommand = ["x"]\nshell = true\n',
        "on_notice[0].shell: unknown key",
    ),
    "missing command": ('[[after_migration]]\nname = "restore"\n', "after_migration[0].command: required"),
    "timeout zero": ('[[on_notice]]\nname = "d"\ncommand = ["x"]\ntimeout_s = 0\n', "on_notice[0].timeout_s"),
    "timeout negative": ("[agent]\npower_off_timeout_s = -5\n", "agent.power_off_timeout_s"),
    "malformed url": ('[metadata]\nurl = "http://bad host"\n', "metadata.url"),
    "poll flood": (
        "[metadata]\npoll_interval_s = 1e-9\n",
        "metadata.poll_interval_s: must be a number between",
    ),
    "timeout overflow": ("[metadata]\ntimeout_s = 1e300\n", "metadata.timeout_s: must be a number between"),
    "missing program": (
        '[[on_notice]]\nname = "d"\ncommand = ["/nonexistent/drain"]\n',
        "on_notice[0].command: no such program: /nonexistent/drain",
    ),
}


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_agent_bad_config_starts_nothing(tmp_path: Path, command: str, case: str) -> None:
    text, expected = CASES[case]
    marker = tmp_path / "hook-ran"
    journal = tmp_path / "state" / "journal.json"
    config = tmp_path / "config.toml"
    # A valid [agent] table pointing at a journal we can watch, then the broken part.
    head = f'[agent]\njournal_path = "{journal}"\npower_off_command = ["/bin/touch", "{marker}"]\n'
    if text.startswith("[agent]"):
        head = head.rstrip("\n") + "\n" + text.split("\n", 1)[1]
        text = ""
    config.write_text(head + text)
    result = subprocess.run(
        [str(AGENT_BIN), command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not journal.parent.exists()  # no journal, no lock: nothing started
    assert not marker.exists()
