"""Optional Prometheus metrics: a tiny text exposition of the agent's own, no client library needed.

Off by default (``[metrics] enabled = true`` to serve ``GET /metrics`` on ``listen``, loopback by default).
The metrics are kept either way (they cost nothing), so ``status`` and tests can read them.

* ``guest_agent_events_seen_total{kind}``
* ``guest_agent_notice_lead_time_seconds`` — deadline minus first sight, of the last event seen
* ``guest_agent_hook_duration_seconds{phase,hook}`` — a summary (``_sum`` / ``_count``)
* ``guest_agent_hook_runs_total{phase,hook,outcome}`` and ``guest_agent_hook_failures_total{phase,hook}``
* ``guest_agent_metadata_up`` — 1 while the metadata service answers
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from guest_agent.states import HookOutcome

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Thread-safe counters; :meth:`render` gives the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, int] = defaultdict(int)
        self._lead_time_s: float | None = None
        self._duration: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._runs: dict[tuple[str, str, str], int] = defaultdict(int)
        self._failures: dict[tuple[str, str], int] = defaultdict(int)
        self._metadata_up: int = 0

    def event_seen(self, kind: str, lead_time_s: float | None) -> None:
        with self._lock:
            self._events[kind] += 1
            if lead_time_s is not None:
                self._lead_time_s = lead_time_s

    def hook_done(self, phase: str, hook: str, duration_s: float, outcome: HookOutcome) -> None:
        with self._lock:
            acc = self._duration[(phase, hook)]
            acc[0] += duration_s
            acc[1] += 1
            self._runs[(phase, hook, outcome.value)] += 1
            if not outcome.success:
                self._failures[(phase, hook)] += 1

    def metadata_up(self, up: bool) -> None:
        with self._lock:
            self._metadata_up = int(up)

    def render(self) -> str:
        with self._lock:
            out: list[str] = []
            _family(out, "guest_agent_events_seen_total", "counter", "Maintenance events seen, by kind.")
            for kind, n in sorted(self._events.items()):
                out.append(f'guest_agent_events_seen_total{{kind="{_esc(kind)}"}} {n}')
            _family(
                out,
                "guest_agent_notice_lead_time_seconds",
                "gauge",
                "Deadline minus first sight, last event.",
            )
            if self._lead_time_s is not None:
                out.append(f"guest_agent_notice_lead_time_seconds {self._lead_time_s:.3f}")
            _family(out, "guest_agent_hook_duration_seconds", "summary", "How long hooks ran.")
            for (phase, hook), (total, count) in sorted(self._duration.items()):
                labels = f'phase="{_esc(phase)}",hook="{_esc(hook)}"'
                out.append(f"guest_agent_hook_duration_seconds_sum{{{labels}}} {total:.3f}")
                out.append(f"guest_agent_hook_duration_seconds_count{{{labels}}} {int(count)}")
            _family(out, "guest_agent_hook_runs_total", "counter", "Hook runs by outcome.")
            for (phase, hook, outcome), n in sorted(self._runs.items()):
                labels = f'phase="{_esc(phase)}",hook="{_esc(hook)}",outcome="{_esc(outcome)}"'
                out.append(f"guest_agent_hook_runs_total{{{labels}}} {n}")
            _family(out, "guest_agent_hook_failures_total", "counter", "Hook runs that did not succeed.")
            for (phase, hook), n in sorted(self._failures.items()):
                out.append(
                    f'guest_agent_hook_failures_total{{phase="{_esc(phase)}",hook="{_esc(hook)}"}} {n}'
                )
            _family(out, "guest_agent_metadata_up", "gauge", "1 while the metadata service answers.")
            out.append(f"guest_agent_metadata_up {self._metadata_up}")
            return "\n".join(out) + "\n"


def serve(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``GET /metrics`` in a daemon thread; the caller shuts the server down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not worth a log line each

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="guest-agent-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
