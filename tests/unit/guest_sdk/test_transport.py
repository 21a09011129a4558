"""The client's transport against real sockets on loopback: proxies, source address, broken answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from guest_sdk import EventKind, MaintenanceClient, MetadataUnavailable, ProtocolError
from tests.unit.guest_sdk.conftest import FakeClock

Handler = Callable[[socket.socket, bytes], None]


@dataclass
class RawServer:
    """A one-thread TCP server on 127.0.0.1 that answers each connection with ``handler``; records peers."""

    handler: Handler
    peers: list[str] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self.peers.append(peer[0])
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                self.handler(conn, data)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


def _answer(body: bytes, extra: str = "") -> Handler:
    def handle(conn: socket.socket, _req: bytes) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}"
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    return handle


@pytest.fixture
def raw_server() -> Iterator[Callable[[Handler], RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_transport_proxies_from_environment_are_ignored(
    raw_server: Callable[[Handler], RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = raw_server(_answer(b"live_migrate"))
    proxy = raw_server(_answer(b"offline_migrate"))  # what a proxy would answer, were it used
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with MaintenanceClient(target.url) as client:
        assert client.event().kind is EventKind.LIVE_MIGRATE
    assert proxy.requests == []
    assert len(target.requests) == 1


def test_transport_proxies_on_a_caller_session_are_ignored(
    raw_server: Callable[[Handler], RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    target = raw_server(_answer(b"live_migrate"))
    proxy = raw_server(_answer(b"offline_migrate"))
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    session = requests.Session()  # trust_env=True: the environment applies to it
    session.proxies = {"http": proxy.url}
    with MaintenanceClient(target.url, session=session) as client:
        assert client.event().kind is EventKind.LIVE_MIGRATE
    session.close()
    assert proxy.requests == []


@pytest.mark.parametrize("source", ["127.0.0.7", "127.0.0.42"])
def test_transport_source_address_binds_the_client(
    raw_server: Callable[[Handler], RawServer], source: str
) -> None:
    server = raw_server(_answer(b""))
    with MaintenanceClient(server.url, source_address=source) as client:
        client.event()
        client.event()
    assert server.peers == [source, source]


def test_transport_server_closing_mid_response_is_unavailable_after_retries(
    raw_server: Callable[[Handler], RawServer],
) -> None:
    def cut_short(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nlive_")

    server = raw_server(cut_short)
    clock = FakeClock()
    with (
        MaintenanceClient(server.url, retry_attempts=3, sleep=clock.sleep, clock=clock.clock) as client,
        pytest.raises(MetadataUnavailable),
    ):
        client.event()
    assert len(server.requests) == 3
    assert len(clock.sleeps) == 2


def test_transport_server_closing_without_answer_is_unavailable(
    raw_server: Callable[[Handler], RawServer],
) -> None:
    server = raw_server(lambda conn, _req: None)  # read the request, close without a byte
    clock = FakeClock()
    with (
        MaintenanceClient(server.url, retry_attempts=2, sleep=clock.sleep, clock=clock.clock) as client,
        pytest.raises(MetadataUnavailable),
    ):
        client.event()
    assert len(server.requests) == 2


def test_transport_chunked_body_over_the_cap_is_refused(raw_server: Callable[[Handler], RawServer]) -> None:
    def endless_chunks(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 1000
        try:
            for _ in range(200):  # 200 kB at most, bounded
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            return  # the client hung up once past its cap: what we want

    server = raw_server(endless_chunks)
    with (
        MaintenanceClient(server.url, max_response_bytes=4096) as client,
        pytest.raises(ProtocolError, match="cap"),
    ):
        client.event()


def test_transport_read_timeout_is_explicit(raw_server: Callable[[Handler], RawServer]) -> None:
    hold = threading.Event()

    def silent(conn: socket.socket, _req: bytes) -> None:
        hold.wait(5)

    server = raw_server(silent)
    clock = FakeClock()
    try:
        with (
            MaintenanceClient(
                server.url, timeout_s=0.2, retry_attempts=1, sleep=clock.sleep, clock=clock.clock
            ) as client,
            pytest.raises(MetadataUnavailable, match="read timed out"),
        ):
            client.event()
    finally:
        hold.set()
