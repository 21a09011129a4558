"""The listeners keep serving while clients hold slow or idle connections open.

A slowloris client opens many connections and sends a request (or a TLS handshake) one byte every few
seconds. The admin listener must answer the engine's requests at once all the same, close each slow
connection when its request-head deadline passes, and refuse one source's connections past its cap. The
guest listener caps each droplet's connections likewise, so one droplet cannot starve the others.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from metadata_server.admin_worker import CONNECTIONS_PER_SOURCE, REQUEST_HEAD_TIMEOUT_S
from metadata_server.gevent_worker import CONNECTIONS_PER_SOURCE as GUEST_CONNECTIONS_PER_SOURCE
from tests.servers import MetadataServer, curl
from tests.support import require_binary
from tests.tls import self_signed

SLOW_CONNECTIONS = 200
SLOW_SOURCES = [f"127.0.3.{n}" for n in range(1, 5)]  # 50 each: under the per-source cap
TRICKLE_EVERY_S = 2.0
ADMIN_BOUND_S = 0.1  # the bound for an admin request under attack
HTTP_HEAD = (
    b"GET /admin/v1/droplets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n" + b"X: y\r\n" * 50
)
# A TLS record header announcing a 512-byte ClientHello, then its first bytes: the server waits for the rest.
TLS_HEAD = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataServer]:
    args: list[str] = []
    if request.param == "https":
        cert, key = self_signed(tmp_path)
        args = ["--admin-tls-cert", str(cert), "--admin-tls-key", str(key)]
    with MetadataServer.start(tmp_path / "ms", *args) as ms:
        yield ms


class Slowloris:
    """Slow connections from given source addresses, each sending its next byte every ``TRICKLE_EVERY_S``."""

    def __init__(self, port: int, sources: list[str], count: int, payload: bytes) -> None:
        self.payload = payload
        self.socks: list[socket.socket] = []
        self.sent: dict[socket.socket, int] = {}
        self.closed_by_server: dict[socket.socket, float] = {}
        for n in range(count):
            s = socket.socket()
            s.bind((sources[n % len(sources)], 0))
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            self.socks.append(s)
            self.sent[s] = 0
        self.started = time.monotonic()
        self.next_trickle = self.started

    def step(self) -> None:
        """Send each open connection its next byte when due; note the ones the server closed."""
        now = time.monotonic()
        if now >= self.next_trickle:
            self.next_trickle = now + TRICKLE_EVERY_S
            for s in self.open():
                try:
                    s.send(self.payload[self.sent[s] : self.sent[s] + 1])
                    self.sent[s] += 1
                except OSError:
                    self.closed_by_server.setdefault(s, now)
        readable, _, _ = select.select(self.open(), [], [], 0)
        for s in readable:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.closed_by_server.setdefault(s, time.monotonic())

    def open(self) -> list[socket.socket]:
        return [s for s in self.socks if s not in self.closed_by_server]

    def close(self) -> None:
        for s in self.socks:
            s.close()


def timed_admin_requests(server: MetadataServer, n: int) -> list[float]:
    """The engine's requests, each on a fresh connection: register a droplet, set its event, read it back."""
    took = []
    for i in range(n):
        start = time.perf_counter()
        if i % 3 == 0:
            r = server.admin(
                "PUT", f"/admin/v1/droplets/d{i}", json={"addresses": [f"127.0.9.{i + 1}"]}, timeout=5
            )
        elif i % 3 == 1:
            body = {"id": f"ev-{i}", "event": "live_migrate", "state": "scheduled"}
            r = server.admin("PUT", f"/admin/v1/droplets/d{i - 1}/maintenance", json=body, timeout=5)
        else:
            r = server.admin("GET", f"/admin/v1/droplets/d{i - 2}", timeout=5)
        took.append(time.perf_counter() - start)
        assert r.status_code in (200, 201), r.text
    return took


def test_admin_listener_serves_the_engine_under_a_slowloris_and_drops_slow_heads(
    server: MetadataServer,
) -> None:
    payload = TLS_HEAD if server.tls_cert else HTTP_HEAD
    attack = Slowloris(server.admin_port, SLOW_SOURCES, SLOW_CONNECTIONS, payload)
    try:
        # Let every slow connection be accepted and start trickling before the engine's requests.
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            attack.step()
            time.sleep(0.05)
        assert len(attack.open()) == SLOW_CONNECTIONS, "slow connections were closed before their deadline"
        took: list[float] = []
        measure_until = attack.started + REQUEST_HEAD_TIMEOUT_S - 2
        while time.monotonic() < measure_until:
            attack.step()
            took.extend(timed_admin_requests(server, 3))
            time.sleep(0.2)
        assert len(took) >= 30
        took.sort()
        p95 = took[int(len(took) * 0.95) - 1]
        print(f"admin requests under attack: p95 {p95 * 1000:.1f} ms, worst {took[-1] * 1000:.1f} ms "
              f"over {len(took)} requests")  # fmt: skip
        # The bound holds for the requests; a rare one the shared 2-core machine itself delays (CI saw 125 ms
        # once, at load 5, beside other work) is not the attack's doing. A server that gave the slow connections
        # its workers would answer in seconds, or not at all.
        assert p95 < ADMIN_BOUND_S, f"admin requests under attack: p95 {p95 * 1000:.0f} ms"
        assert took[-1] < 1.0, f"an admin request under attack took {took[-1] * 1000:.0f} ms"
        assert len(attack.open()) == SLOW_CONNECTIONS  # still trickling: the attack lasted all along
        # Past the request-head deadline the server closes every slow connection, though bytes keep coming.
        give_up = attack.started + REQUEST_HEAD_TIMEOUT_S + 5
        while attack.open() and time.monotonic() < give_up:
            attack.step()
            time.sleep(0.05)
        assert not attack.open(), f"{len(attack.open())} slow connections outlived the request-head deadline"
        first_close = min(attack.closed_by_server.values()) - attack.started
        assert first_close >= REQUEST_HEAD_TIMEOUT_S - 1.5
    finally:
        attack.close()


def test_admin_listener_caps_connections_per_source(server: MetadataServer) -> None:
    extra = 20
    attack = Slowloris(server.admin_port, ["127.0.3.9"], CONNECTIONS_PER_SOURCE + extra, b"G")
    try:
        deadline = time.monotonic() + 3
        while len(attack.closed_by_server) < extra and time.monotonic() < deadline:
            attack.step()
            time.sleep(0.05)
        assert len(attack.closed_by_server) == extra, "connections past the per-source cap were not refused"
        assert len(attack.open()) == CONNECTIONS_PER_SOURCE
        assert max(timed_admin_requests(server, 3)) < ADMIN_BOUND_S  # other sources: served at once
        # The capped source gets a connection again as soon as one of its own closes.
        attack.open()[0].close()
        attack.socks = [s for s in attack.socks if s.fileno() != -1]
        time.sleep(0.2)
        with requests.Session() as s:
            s.mount("http://", _SourceAdapter("127.0.3.9"))
            s.mount("https://", _SourceAdapter("127.0.3.9"))
            r = s.get(
                server.admin_url + "/admin/v1/droplets",
                headers={"Authorization": f"Bearer {server.token}"},
                verify=server.tls_cert or True,
                timeout=5,
            )
        assert r.status_code == 200
    finally:
        attack.close()


class _SourceAdapter(requests.adapters.HTTPAdapter):
    """Requests from a given loopback source address."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def test_guest_listener_caps_one_droplets_connections_so_others_are_served(tmp_path: Path) -> None:
    require_binary("curl")
    with MetadataServer.start(tmp_path / "ms", "--workers", "1") as ms:
        ms.register("greedy", ["127.0.0.2"])
        ms.register("other", ["127.0.0.3"])
        ms.set_event("other", "ev-1")
        extra = 20
        attack = Slowloris(ms.guest_port, ["127.0.0.2"], GUEST_CONNECTIONS_PER_SOURCE + extra, b"G")
        try:
            deadline = time.monotonic() + 3
            while len(attack.closed_by_server) < extra and time.monotonic() < deadline:
                attack.step()
                time.sleep(0.05)
            assert len(attack.closed_by_server) == extra, "one droplet's connections past its cap were kept"
            assert len(attack.open()) == GUEST_CONNECTIONS_PER_SOURCE
            assert curl(ms.guest_url + "/v1/maintenance_event", "127.0.0.3").stdout == b"live_migrate"
            refused = curl(
                ms.guest_url + "/v1/maintenance_event", "127.0.0.2", "-w", "%{http_code}", timeout_s=3
            )
            assert refused.returncode != 0  # closed at once: the greedy droplet waits for its own connections
            attack.open()[0].close()
            attack.socks = [s for s in attack.socks if s.fileno() != -1]
            time.sleep(0.2)
            assert (
                curl(ms.guest_url + "/v1/maintenance_event", "127.0.0.2", "-w", "%{http_code}").stdout
                == b"200"
            )
        finally:
            attack.close()
