"""The real agent against the real metadata server on loopback: the whole policy, end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import AGENT_BIN, DROPLET, AgentProcess, append_hook, lines
from tests.servers import MetadataServer, free_port
from tests.support import require

# The harness's fixtures, used here by name.
metadata = harness.metadata
agent_factory = harness.agent_factory

pytestmark = pytest.mark.slow


def _ack(ms: MetadataServer) -> Any:
    return ms.admin("GET", f"/admin/v1/droplets/{DROPLET}").json().get("ack")


def test_agent_live_migrate_drains_within_a_second_and_restores_after_clear(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    drain, restore = tmp_path / "drain", tmp_path / "restore"
    agent = agent_factory(
        hooks={
            "on_notice": [append_hook("drain", drain)],
            "after_migration": [append_hook("restore", restore)],
        }
    ).start()
    agent.wait_for(lambda: "guest-agent started" in agent.log(), "the agent to start")
    time.sleep(1.0)  # let its first long-poll settle: the change must wake it, not its start-up read

    set_at = time.time()
    metadata.set_event(DROPLET, "ev-1", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(drain), "the drain hook")
    started_at = float(lines(drain)[0].split()[1])
    assert started_at - set_at < 1.0, f"drain started {started_at - set_at:.2f} s after the flag was set"
    assert lines(drain)[0].split()[0] == "ev-1"
    agent.wait_status("ev-1", "drained")
    assert lines(restore) == []

    metadata.clear_event(DROPLET)
    agent.wait_for(lambda: lines(restore), "the after_migration hook")
    agent.wait_status("ev-1", "done")
    assert len(lines(drain)) == 1
    assert len(lines(restore)) == 1
    assert not (agent.workdir / "poweroff").exists()
    assert agent.stop() == 0


@pytest.mark.parametrize(
    ("event", "prefer_offline", "power_on_after"),
    [("offline_migrate", False, True), ("live_migrate", True, False)],
)
def test_agent_shutdown_path_acks_offline_then_runs_the_power_off_command(
    tmp_path: Path,
    metadata: MetadataServer,
    agent_factory: Callable[..., AgentProcess],
    event: str,
    prefer_offline: bool,
    power_on_after: bool,
) -> None:
    drain, stop_app, restore = tmp_path / "drain", tmp_path / "stop-app", tmp_path / "restore"
    agent = agent_factory(
        agent={"prefer_offline": prefer_offline, "power_on_after": power_on_after},
        hooks={
            "on_notice": [append_hook("drain", drain)],
            "before_offline": [append_hook("stop-app", stop_app)],
            "after_migration": [append_hook("restore", restore)],
        },
    ).start()
    metadata.set_event(DROPLET, "ev-off", event=event, state="scheduled")
    poweroff = agent.workdir / "poweroff"
    agent.wait_for(lambda: lines(poweroff), "the (harmless) power-off command")
    agent.wait_status("ev-off", "powered_off")
    ack = _ack(metadata)
    assert ack is not None
    assert ack["action"] == "offline"
    assert ack["power_on_after"] is power_on_after
    # Order: drain, stop-app, then the ack, then the power-off.
    assert float(lines(drain)[0].split()[1]) <= float(lines(stop_app)[0].split()[1])
    assert lines(poweroff) == ["poweroff"]

    # "The next boot": a new agent process after the migration cleared the flag restores.
    agent.stop()
    metadata.clear_event(DROPLET)
    agent.start()
    agent.wait_for(lambda: lines(restore), "after_migration on the next start")
    agent.wait_status("ev-off", "done")
    assert lines(poweroff) == ["poweroff"]  # never twice
    assert len(lines(drain)) == 1
    assert len(lines(stop_app)) == 1


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]]
    fail_first: list[bool]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers["Idempotency-Key"], body))
        if self.fail_first and self.fail_first.pop():
            self.send_response(503)
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]], list[bool]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    fail_first = [True]
    handler = type("Handler", (_Receiver,), {"received": received, "fail_first": fail_first})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/lb", received, fail_first
    server.shutdown()
    server.server_close()


def test_agent_webhook_is_sent_first_retried_and_never_resent_after_success(
    tmp_path: Path,
    metadata: MetadataServer,
    agent_factory: Callable[..., AgentProcess],
    receiver: tuple[str, list[tuple[str, dict[str, Any]]], list[bool]],
) -> None:
    url, received, _ = receiver
    drain = tmp_path / "drain"
    agent = agent_factory(
        hooks={"on_notice": [append_hook("drain", drain), {"name": "tell-lb", "type": "webhook", "url": url}]}
    ).start()
    metadata.set_event(DROPLET, "ev-w", event="live_migrate", state="scheduled")
    agent.wait_status("ev-w", "drained")
    assert [k for k, _ in received] == ["ev-w:on_notice:tell-lb"] * 2  # a 503, then delivered
    assert received[-1][1]["event"] == "live_migrate"
    assert agent.hook_outcome("ev-w", "on_notice", "tell-lb") == "ok"

    agent.kill9()
    agent.start()
    agent.wait_for(lambda: "resuming event_id=ev-w" in agent.log(), "the restart")
    time.sleep(1.0)
    assert len(received) == 2  # recorded success: not sent again
    assert len(lines(drain)) == 1


def test_agent_keeps_trying_while_the_metadata_service_is_down(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    drain = tmp_path / "drain"
    agent = agent_factory(hooks={"on_notice": [append_hook("drain", drain)]}).start()
    agent.wait_for(lambda: "guest-agent started" in agent.log(), "the start")
    metadata.stop()
    agent.wait_for(lambda: "metadata service unreachable" in agent.log(), "the outage to be noticed")
    time.sleep(3.0)  # several backoff rounds (max_backoff_s = 1)
    assert agent.proc is not None
    assert agent.proc.poll() is None  # never exits
    assert agent.log().count("metadata service unreachable") == 1  # logged once per outage

    metadata.launch()  # same ports, same state file
    metadata.set_event(DROPLET, "ev-back", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(drain), "the drain after the outage", timeout_s=30)
    assert "metadata service reachable again" in agent.log()


def test_agent_sigterm_lets_the_running_hook_finish_and_the_next_start_resumes(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    slow, after = tmp_path / "slow", tmp_path / "after"
    agent = agent_factory(
        hooks={
            "on_notice": [
                append_hook("slow", slow, extra=f"sleep 2; echo finished >> {slow}"),
                append_hook("after-slow", after),
            ]
        }
    ).start()
    metadata.set_event(DROPLET, "ev-t", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(slow), "the slow hook to start")
    assert agent.stop(signal.SIGTERM) == 0
    assert lines(slow)[-1] == "finished"  # it was allowed to finish
    assert agent.hook_outcome("ev-t", "on_notice", "slow") == "ok"
    assert lines(after) == []  # nothing new was started
    agent.start()
    agent.wait_status("ev-t", "drained")
    assert len(lines(after)) == 1
    assert len(lines(slow)) == 2  # one start line + "finished": it did not run again


def test_agent_sighup_reloads_the_config(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    agent = agent_factory(hooks={"on_notice": [append_hook("first", first)]}).start()
    agent.wait_for(lambda: "guest-agent started" in agent.log(), "the start")
    text = agent.config_path.read_text()
    agent.config_path.write_text("[[on_notice]]\nname = 3\n")  # a broken edit: kept the old config
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(lambda: "config not reloaded" in agent.log(), "the refused reload")
    agent.config_path.write_text(text.replace("first", "second"))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(lambda: "config reloaded" in agent.log(), "the reload")
    metadata.set_event(DROPLET, "ev-h", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(second), "the new hook")
    assert lines(first) == []


def test_agent_status_shows_the_event_and_the_hooks(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory(hooks={"on_notice": [append_hook("drain", tmp_path / "drain")]}).start()
    metadata.set_event(DROPLET, "ev-s", event="live_migrate", state="scheduled")
    agent.wait_status("ev-s", "drained")
    out = subprocess.run(
        [str(AGENT_BIN), "status", "--config", str(agent.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["metadata"]["event"] == "live_migrate"
    assert doc["metadata"]["id"] == "ev-s"
    assert doc["active"]["status"] == "drained"
    assert [(h["name"], h["outcome"]) for h in doc["active"]["hooks"]] == [("drain", "ok")]

    second = subprocess.run(
        [str(AGENT_BIN), "run", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode != 0
    assert "another guest-agent is running" in second.stderr


def test_agent_nested_vms_restarts_exactly_the_running_ones(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    """libvirt's test driver: a node with running and shut-off domains; the restart goes through a command."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        have_libvirt = False
    else:
        have_libvirt = True
    require(have_libvirt, "libvirt-python is not installed (pip install '.[libvirt]' after libvirt-dev)")
    node = tmp_path / "node.xml"
    domain = (
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{}</name>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>{}</domain>"
    )
    off = "<test:runstate>5</test:runstate>"
    node.write_text(
        "<node>"
        + domain.format("web1", "")
        + domain.format("web2", "")
        + domain.format("batch", off)
        + domain.format("old", off)
        + "</node>"
    )
    uri = f"test://{node}"
    restarted = tmp_path / "restarted"
    agent = agent_factory(
        hooks={
            "on_notice": [{"name": "record-vms", "type": "nested_vms", "uri": uri}],
            "after_migration": [
                {
                    "name": "restart-vms",
                    "type": "nested_vms",
                    "uri": uri,
                    "restart": "command",
                    "command": ["/bin/sh", "-c", f'echo "$0" >> {restarted}', "{domain}"],
                }
            ],
        }
    ).start()
    metadata.set_event(DROPLET, "ev-vm", event="live_migrate", state="scheduled")
    agent.wait_status("ev-vm", "drained")
    assert (agent.event("ev-vm") or {})["data"] == {f"nested_vms:{uri}": {"running": ["web1", "web2"]}}
    metadata.clear_event(DROPLET)
    agent.wait_status("ev-vm", "done")
    assert sorted(lines(restarted)) == ["web1", "web2"]
    assert agent.hook_outcome("ev-vm", "after_migration", "restart-vms") == "ok"


def test_agent_serves_prometheus_metrics_when_enabled(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    port = free_port()
    agent = agent_factory(hooks={"on_notice": [append_hook("drain", tmp_path / "drain")]})
    agent.config_path.write_text(
        agent.config_path.read_text() + f'\n[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    )
    agent.start()
    metadata.set_event(
        DROPLET, "ev-m", event="live_migrate", state="scheduled", deadline="2099-01-01T00:00:00Z"
    )
    agent.wait_status("ev-m", "drained")
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'guest_agent_events_seen_total{kind="live_migrate"} 1' in text
    assert 'guest_agent_hook_duration_seconds_count{phase="on_notice",hook="drain"} 1' in text
    assert "guest_agent_metadata_up 1" in text
    lead = next(
        line for line in text.splitlines() if line.startswith("guest_agent_notice_lead_time_seconds ")
    )
    assert float(lead.split()[1]) > 365 * 24 * 3600
