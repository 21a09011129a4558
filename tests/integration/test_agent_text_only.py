"""The agent against a plain DigitalOcean-style endpoint: only ``GET /v1/maintenance_event``, a bare string.

No ids, no deadline, no acks, no long-poll: the agent polls, makes up an event id, and counts the deadline
from first sight (``default_notice_s``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_agent_harness import AgentProcess, append_hook, lines, render_config

pytestmark = pytest.mark.slow


class _TextOnly(BaseHTTPRequestHandler):
    value: list[str]

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/v1/maintenance_event":
            self.send_error(404)
            return
        body = self.value[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def text_server() -> Iterator[tuple[str, list[str]]]:
    value = [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_TextOnly,), {"value": value}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", value
    server.shutdown()
    server.server_close()


def test_agent_text_only_server_drains_restores_and_shuts_down(
    tmp_path: Path, text_server: tuple[str, list[str]]
) -> None:
    url, value = text_server
    drain, restore = tmp_path / "drain", tmp_path / "restore"
    workdir = tmp_path / "agent"
    workdir.mkdir()
    config = workdir / "config.toml"
    text = render_config(
        metadata_url=url,
        workdir=workdir,
        source_address="127.0.0.1",
        agent={"default_notice_s": 900},
        hooks={
            "on_notice": [append_hook("drain", drain)],
            "after_migration": [append_hook("restore", restore)],
        },
    )
    config.write_text(text.replace("max_backoff_s = 1", "max_backoff_s = 1\npoll_interval_s = 0.5"))
    agent = AgentProcess(workdir, config).start()
    try:
        value[0] = "live_migrate\n"
        agent.wait_for(lambda: lines(drain), "the drain hook")
        active = agent.journal()["active"]
        assert active.startswith("text-live_migrate-")
        ev = agent.event(active)
        assert ev is not None
        assert ev["server_id"] is None
        assert ev["deadline"] == pytest.approx(ev["first_seen"] + 900, abs=1)

        value[0] = ""
        agent.wait_for(lambda: lines(restore), "the restore hook")
        agent.wait_status(active, "done")

        value[0] = "offline_migrate"  # no ack possible: skipped, and the power-off still happens
        poweroff = workdir / "poweroff"
        agent.wait_for(lambda: lines(poweroff), "the power-off")
        offline = agent.journal()["active"]
        assert agent.hook_outcome(offline, "before_offline", "@ack-offline") == "skipped"
        assert len(lines(drain)) == 2
    finally:
        agent.stop()
