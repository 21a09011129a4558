"""The three daemons log the same way (guest_sdk.daemon_logging), checked on the real processes.

* under systemd (``$JOURNAL_STREAM`` set) every stderr line is ``<priority>logger: message``, with the syslog
  priority of its level and no timestamp (journald adds its own): ``host-engine run``, ``metadata-server
  serve`` with its gunicorn arbiters and workers, ``guest-agent run``;
* with ``--log-format json`` every stderr line is one JSON object with time, level, logger and message, and
  the migration, droplet and event ids as fields when the line is about them;
* the admin token never appears; ``--log-format xml`` is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import engine_run as engine
from tests.integration.test_agent_harness import AGENT_BIN, AgentProcess, append_hook, render_config
from tests.integration.test_engine_run_executor import fleet, migrations, stop, wait_for
from tests.servers import BIN as SERVER_BIN
from tests.servers import MetadataServer, free_port

ENGINE_BIN = Path(sys.executable).parent / "host-engine"
JOURNAL_LINE = re.compile(r"<([0-7])>(.*)")
RECORD = re.compile(r"([\w.]+): (.*)")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d")
JSON_FIELDS = {"time", "level", "logger", "message", "pid"}


def journal_lines(text: str) -> list[tuple[int, str, str]]:
    """(priority, logger, message) of every record; fails on a line without a priority or with a timestamp.

    A record's continuation lines (a traceback, a warning's source line) carry its priority too.
    """
    parsed: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        m = JOURNAL_LINE.fullmatch(line)
        assert m is not None, f"not a journal line: {line!r}\n{text}"
        assert not TIMESTAMP.match(m[2]), f"journal line with a timestamp: {line!r}"
        record = RECORD.fullmatch(m[2])
        if record is not None:
            parsed.append((int(m[1]), record[1], record[2]))
        else:
            assert parsed and parsed[-1][0] == int(m[1]), f"a continuation line of no record: {line!r}"
    assert parsed, "nothing logged"
    return parsed


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line as JSON with the common fields; fails on a line that is not."""
    docs = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{text}")
        assert isinstance(doc, dict) and set(doc) >= JSON_FIELDS, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), line
        docs.append(doc)
    assert docs, "nothing logged"
    return docs


def has(lines: list[tuple[int, str, str]], priority: int, logger: str, text: str) -> bool:
    return any(p == priority and lg == logger and text in msg for p, lg, msg in lines)


# ---- host-engine run + metadata-server serve -----------------------------------------------------------


def test_engine_and_server_under_journald(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:424242")  # as systemd sets it: auto picks the journal format
    db, log = tmp_path / "engine.db", tmp_path / "engine.log"
    with MetadataServer.start(tmp_path / "ms", "--log-level", "debug") as ms:
        ms.register("d1", ["127.0.8.1"])
        ms.set_event("d1", "ev-1")
        fleet(db, ms, {"web1": (1, 4)})
        # hv4 has a metadata server that is not there: the engine warns about it every tick.
        dead = tmp_path / "dead-token"
        dead.write_text("dead-token-s3cret")
        r = subprocess.run(
            [str(ENGINE_BIN), "--db", str(db), "host", "add", "hv4", "--datacenter", "lo", "--vcpus", "4",
             "--memory", "8GiB", "--disk", "100GiB", "--metadata-url", f"http://127.0.0.1:{free_port()}",
             "--metadata-token-file", str(dead)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with engine(db, log, "--max-ticks", "5") as proc:
            assert proc.wait(timeout=60) == 0, log.read_text()
    engine_lines = journal_lines(log.read_text())
    assert has(engine_lines, 6, "host_engine.engine", "engine starting")
    assert has(engine_lines, 4, "host_engine.metadata.reconcile", "failed")
    server_text = ms.log_path.read_text()
    server_lines = journal_lines(server_text)
    assert has(server_lines, 6, "metadata_server", "guest listener http://127.0.0.1:")
    assert has(server_lines, 6, "metadata_server.admin", "droplet_id=d1 event_id=ev-1 set")
    # gunicorn's own lines (its arbiters' and workers'), at their priorities: debug 7, info 6.
    assert has(server_lines, 7, "gunicorn.error", "Arbiter booted")
    assert has(server_lines, 6, "gunicorn.error", "Booting worker with pid")
    for text in (log.read_text(), server_text):
        assert ms.token not in text and "dead-token-s3cret" not in text


def test_engine_and_server_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:424242")  # an explicit --log-format wins over the environment
    db, log = tmp_path / "engine.db", tmp_path / "engine.log"
    with MetadataServer.start(tmp_path / "ms", "--log-format", "json", "--log-level", "debug") as ms:
        fleet(db, ms, {"web1": (1, 4)})
        r = subprocess.run(
            [str(ENGINE_BIN), "--db", str(db), "evacuate", "hv1", "--start", "+1s", "--notice", "1s",
             "--unsafe-short-notice"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with engine(db, log, "--sim-speed", "10", "--log-format", "json") as proc:
            wait_for("the migration to complete", lambda: migrations(db)["web1"]["state"] == "completed", log)
            stop(proc, log)
    migration_id = migrations(db)["web1"]["id"]
    engine_docs = json_lines(log.read_text())
    about = [d for d in engine_docs if d.get("migration_id") == migration_id]
    assert about, log.read_text()
    assert any(d.get("droplet_id") == "web1" and "completed" in d["message"] for d in about)
    assert {d["level"] for d in engine_docs} <= {"debug", "info", "warning", "error", "critical"}
    assert any(
        d["logger"] == "host_engine.engine" and d["message"].startswith("engine stopped") for d in engine_docs
    )

    server_text = ms.log_path.read_text()
    server_docs = json_lines(server_text)
    set_lines = [
        d for d in server_docs if d["logger"] == "metadata_server.admin" and d.get("droplet_id") == "web1"
    ]
    assert any(d.get("event_id") for d in set_lines), server_text
    gunicorn = [d for d in server_docs if d["logger"] == "gunicorn.error"]
    # Both arbiters and their workers (2 guest + 1 admin) logged, each in its own process.
    assert len({d["pid"] for d in gunicorn if "Booting worker" in d["message"]}) == 3, server_text
    assert {d["level"] for d in gunicorn} >= {"debug", "info"}
    for text in (log.read_text(), server_text):
        assert ms.token not in text


# ---- guest-agent run -----------------------------------------------------------------------------------


def start_agent(agent: AgentProcess, *args: str) -> None:
    out = agent.log_path.open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUEST_AGENT_")}
    agent.proc = subprocess.Popen(
        [str(AGENT_BIN), "run", "--config", str(agent.config_path), *args], stdout=out, stderr=out, env=env
    )


@pytest.mark.parametrize("mode", ["journal", "json"])
def test_agent_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "journal":
        monkeypatch.setenv("JOURNAL_STREAM", "8:424242")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with MetadataServer.start(tmp_path / "ms") as ms:
        ms.register("d1", ["127.0.0.2"])
        workdir = tmp_path / "agent"
        workdir.mkdir()
        config = workdir / "config.toml"
        hooks = {"on_notice": [append_hook("drain", workdir / "drain.out", extra="exit 3")]}
        config.write_text(render_config(metadata_url=ms.guest_url, workdir=workdir, hooks=hooks))
        agent = AgentProcess(workdir, config)
        start_agent(agent, *(["--log-format", "json"] if mode == "json" else []))
        try:
            agent.wait_for(lambda: "guest-agent started" in agent.log(), "the start line")
            ms.set_event("d1", "ev-42")
            agent.wait_for(lambda: agent.hook_outcome("ev-42", "on_notice", "drain") is not None, "the hook")
            agent.wait_for(lambda: "hook=drain" in agent.log(), "the hook's log line")
            assert agent.stop() == 0
        finally:
            if agent.proc is not None:
                agent.proc.kill()
                agent.proc.wait(10)
    text = agent.log()
    if mode == "journal":
        lines = journal_lines(text)
        assert has(lines, 6, "guest_agent.daemon", "guest-agent started")
        assert any(p == 3 and "event_id=ev-42 phase=on_notice hook=drain" in msg for p, _, msg in lines), text
    else:
        docs = json_lines(text)
        failed = [d for d in docs if "hook=drain" in d["message"] and d["level"] == "error"]
        assert failed and failed[0]["event_id"] == "ev-42", text
        assert any(d["message"].startswith("guest-agent started") for d in docs)
    assert ms.token not in text


# ---- bad values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        ([str(ENGINE_BIN), "run", "--log-format", "xml"], {}),
        ([str(ENGINE_BIN), "run"], {"HOST_ENGINE_LOG_FORMAT": "xml"}),
        ([str(SERVER_BIN), "serve", "--log-format", "xml"], {}),
        ([str(SERVER_BIN), "serve"], {"METADATA_SERVER_LOG_FORMAT": "xml"}),
        ([str(AGENT_BIN), "run", "--log-format", "xml"], {}),
        ([str(AGENT_BIN), "run"], {"GUEST_AGENT_LOG_FORMAT": "xml"}),
    ],
    ids=["engine", "engine-env", "server", "server-env", "agent", "agent-env"],
)
def test_a_bad_log_format_is_one_line_and_exit_2(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> None:
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env={**os.environ, **env}
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert (
        "'--log-format'" in lines[0] and "'xml' is not one of 'auto', 'text', 'journal', 'json'" in lines[0]
    )
    assert list(tmp_path.iterdir()) == []  # nothing created


# ---- the line a daemon exits with ----------------------------------------------------------------------


def fatal_error_line(argv: list[str], mode: str, tmp_path: Path, code: int) -> tuple[int, str, str]:
    """Run a daemon that fails after its logging is set up; (priority or -1, logger, message) of its one line."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM" and not k.startswith("GUEST_AGENT_")}
    if mode == "journal":
        env["JOURNAL_STREAM"] = "8:424242"
    else:
        argv = [*argv, "--log-format", "json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env=env)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    if mode == "journal":
        return journal_lines(r.stderr)[0]
    doc = json_lines(r.stderr)[0]
    return {"error": 3}.get(doc["level"], -1), doc["logger"], doc["message"]


@pytest.mark.parametrize("mode", ["journal", "json"])
def test_the_error_a_daemon_exits_with_is_an_error_record(tmp_path: Path, mode: str) -> None:
    """Under journald a bare error line would be stored at the default priority (info): ``journalctl -p err``
    would not show why the daemon stopped, and a JSON pipeline would get a line it cannot parse."""
    engine_argv = [str(ENGINE_BIN), "--db", "postgresql://engine:hunter2@127.0.0.1:1/engine", "run"]
    priority, logger, message = fatal_error_line(engine_argv, mode, tmp_path, 7)
    assert (priority, logger) == (3, "host_engine")
    assert message.startswith("host-engine: error: cannot open store") and "hunter2" not in message

    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server_argv = [str(SERVER_BIN), "serve", "--guest-listen", f"127.0.0.1:{port}", "--admin-listen",
                       f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "state.db"), "--admin-token-file",
                       str(token)]  # fmt: skip
        priority, logger, message = fatal_error_line(server_argv, mode, tmp_path, 3)
    assert (priority, logger) == (3, "metadata_server")
    assert message == f"metadata-server: error: --guest-listen 127.0.0.1:{port}: address already in use"

    # The agent: a second one on the same journal is refused.
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[metadata]\nurl = "http://127.0.0.1:{free_port()}"\n[agent]\njournal_path = "{tmp_path / "j.json"}"\n'
    )
    first = AgentProcess(tmp_path, config)
    start_agent(first)
    try:
        first.wait_for(lambda: "guest-agent started" in first.log(), "the first agent")
        agent_argv = [str(AGENT_BIN), "run", "--config", str(config)]
        priority, logger, message = fatal_error_line(agent_argv, mode, tmp_path, 1)
    finally:
        first.stop()
    assert (priority, logger) == (3, "guest_agent")
    assert message.startswith("guest-agent: another guest-agent is running with the journal")
