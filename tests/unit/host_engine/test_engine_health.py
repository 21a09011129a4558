"""The engine's health: ``/livez`` (every loop went round lately), ``/readyz`` (store answers, worker name held),
the last successful tick, tick durations and one ``up`` gauge per metadata server, and a metrics listener that
answers hostile requests in one line. Metadata servers are faked at the transport (``responses``); the HTTP
listener is real, on loopback, and is spoken to over raw sockets (``responses`` would catch ``requests``)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import responses

from host_engine.config import EngineConfig, EngineLoopConfig
from host_engine.engine import Engine
from host_engine.engine_metrics import EngineMetrics, Loop, Readiness, server_label
from host_engine.errors import AdminAPIUnavailable, NotifierError, StoreError
from host_engine.metadata.client import AdminClient
from host_engine.metadata.probe import ServerProbe
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.metrics_http import serve_metrics
from host_engine.store import Store, create_db_engine, database_url
from host_engine.workers import WorkerName
from tests.unit.host_engine.conftest import add_hosts_served_by, make_droplet, make_host
from tests.unit.host_engine.fake_admin import FakeAdmin, answering

URL_A = "http://127.0.0.1:8121"
URL_B = "http://127.0.0.1:8122"
WAIT_S = 10.0


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: EngineMetrics, name: str, **labels: str) -> float | None:
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def healthz(server: FakeAdmin) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], str]]:
    """The admin listener's ``GET /healthz`` (with the token), which FakeAdmin leaves out."""

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        server.calls.append(("GET", "/healthz"))
        if server.down:
            raise requests.ConnectionError("connection refused")
        if request.headers.get("Authorization") != f"Bearer {server.token}":
            return 401, {}, json.dumps({"error": "unauthorized", "message": "bad token"})
        return 200, {}, json.dumps({"status": "ok"})

    return answer


@pytest.fixture
def servers() -> Iterator[tuple[FakeAdmin, FakeAdmin]]:
    a, b = FakeAdmin(URL_A), FakeAdmin(URL_B)

    def probes(rsps: responses.RequestsMock) -> None:
        for server in (a, b):  # registered first: matched before FakeAdmin's catch-all
            rsps.add_callback("GET", server.base_url + "/healthz", callback=healthz(server))

    with answering(a, b, before=probes):
        yield a, b


@pytest.fixture
def world(sqlite_store: Store, tmp_path: Path) -> Store:
    add_hosts_served_by(sqlite_store, {"hv1": URL_A + "/", "hv2": URL_B}, tmp_path)
    sqlite_store.add_droplet(make_droplet("d1", "hv1", addresses=("10.0.0.1",)))
    return sqlite_store


# ---- labels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://127.0.0.1:8121/", "http://127.0.0.1:8121"),
        ("https://engine:s3cret@md1.example:8443/admin/?token=x#f", "https://md1.example:8443/admin"),
        ("https://md1.example", "https://md1.example"),
    ],
)
def test_server_label_is_the_admin_url_without_credentials(url: str, label: str) -> None:
    assert server_label(url) == label


# ---- liveness -----------------------------------------------------------------------------------------------


def test_liveness_fails_when_either_loop_is_silent_past_the_bound_and_recovers_when_it_beats() -> None:
    mono = Ticker()
    m = EngineMetrics("w1", poll_interval_s=1.0, slack_s=30.0, monotonic=mono)
    assert m.stale_after_s == 33.0
    assert m.live()  # a loop that has not beaten yet counts from the start
    mono.now += 34
    assert not m.live()  # neither loop went round since the start
    m.tick_finished(False, 0.5)  # a tick that met a store outage still proves the loop turns
    assert not m.live()  # the executor loop is still silent
    m.beat_step().tick()
    assert m.live()
    mono.now += 20
    m.beat(Loop.ENGINE)
    mono.now += 20
    assert not m.live()  # the executor loop stuck for 40 s
    m.beat(Loop.EXECUTOR)
    assert m.live()


def test_last_successful_tick_is_set_only_by_ticks_without_a_store_failure() -> None:
    wall = [1_800_000_000.0]
    m = EngineMetrics("w1", poll_interval_s=1.0, wall=lambda: wall[0])
    name = "host_engine_last_successful_tick_timestamp_seconds"
    assert sample(m, name, worker="w1") is None  # absent until the first one
    m.tick_finished(True, 0.02)
    assert sample(m, name, worker="w1") == 1_800_000_000.0
    wall[0] += 60
    m.tick_finished(False, 3.0)
    assert sample(m, name, worker="w1") == 1_800_000_000.0
    assert sample(m, "host_engine_tick_duration_seconds_count") == 2
    assert sample(m, "host_engine_tick_duration_seconds_bucket", le="0.025") == 1
    assert sample(m, "host_engine_tick_duration_seconds_sum") == pytest.approx(3.02)


# ---- up gauges from the engine's own requests ---------------------------------------------------------------


def test_up_gauge_follows_each_request_outcome(servers: tuple[FakeAdmin, FakeAdmin]) -> None:
    a, _ = servers
    m = EngineMetrics("w1", poll_interval_s=1.0)
    up = "host_engine_metadata_server_up"
    with AdminClient(URL_A + "/", "s3cret", attempts=2, sleep=lambda s: None) as client:
        client.observer = m.server_answered
        client.list_droplets()
        assert sample(m, up, server=URL_A) == 1
        a.down = True
        with pytest.raises(AdminAPIUnavailable):
            client.list_droplets()
        assert sample(m, up, server=URL_A) == 0
        a.down = False
        assert client.get_droplet("nobody") is None  # a 404 is an answer: the server is up
        assert sample(m, up, server=URL_A) == 1
        a.fail_next = [503, 503]  # 5xx through every retry
        with pytest.raises(AdminAPIUnavailable):
            client.list_droplets()
        assert sample(m, up, server=URL_A) == 0
        a.token = "rotated"  # the engine's token is refused: it cannot use the server
        with pytest.raises(NotifierError):
            client.list_droplets()
        assert sample(m, up, server=URL_A) == 0


def test_the_engine_loop_sets_the_up_gauges_and_the_tick_metrics(
    world: Store, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    _, b = servers
    b.down = True
    m = EngineMetrics("w1", poll_interval_s=1.0)
    sync = MetadataSync(
        world, default_client_factory(attempts=2, sleep=lambda s: None), observer=m.server_answered
    )
    engine = Engine(world, EngineConfig(engine=EngineLoopConfig(worker="w1")), sync, sleep=lambda s: None)
    engine.on_tick = m.tick_finished
    assert engine.run(max_ticks=2) == 2  # reconciles every server first
    up = "host_engine_metadata_server_up"
    assert sample(m, up, server=URL_A) == 1
    assert sample(m, up, server=URL_B) == 0
    assert sample(m, "host_engine_tick_duration_seconds_count") == 2
    assert sample(m, "host_engine_last_successful_tick_timestamp_seconds", worker="w1") == pytest.approx(
        time.time(), abs=60
    )


def test_probe_asks_only_servers_not_heard_from_lately_and_forgets_removed_ones(
    world: Store, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, b = servers
    mono = Ticker()
    m = EngineMetrics("w1", poll_interval_s=1.0, monotonic=mono)
    probe = ServerProbe(world, default_client_factory(attempts=1, sleep=lambda s: None), m, every_s=10)
    assert probe.probe_due() == {URL_A: True, URL_B: True}  # never heard from: both asked
    assert ("GET", "/healthz") in a.calls
    mono.now += 5
    assert probe.probe_due() == {}  # both answered 5 s ago
    b.down = True
    mono.now += 6
    m.server_answered(URL_A, True)  # the engine itself just talked to A
    assert probe.probe_due() == {URL_B: False}
    assert sample(m, "host_engine_metadata_server_up", server=URL_B) == 0
    m.server_answered("http://127.0.0.1:8199", True)  # a server no host names any more
    probe.probe_due()
    assert sample(m, "host_engine_metadata_server_up", server="http://127.0.0.1:8199") is None
    assert sample(m, "host_engine_metadata_server_up", server=URL_A) == 1


def test_probe_marks_down_a_server_whose_token_file_cannot_be_read(
    sqlite_store: Store, tmp_path: Path, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    missing = str(tmp_path / "no-such-token")
    sqlite_store.add_host(make_host("hv1", metadata_url=URL_A, metadata_token_file=missing))
    m = EngineMetrics("w1", poll_interval_s=1.0)
    probe = ServerProbe(sqlite_store, default_client_factory(attempts=1), m)
    assert probe.probe_due() == {URL_A: False}
    assert sample(m, "host_engine_metadata_server_up", server=URL_A) == 0


# ---- readiness ----------------------------------------------------------------------------------------------


def test_ready_while_the_store_answers_and_the_name_is_held(sqlite_store: Store) -> None:
    name = WorkerName(sqlite_store, "w1").acquire()
    ready = Readiness(sqlite_store, "w1", lambda: name.held)
    assert ready()
    name.release()
    assert not ready()


def test_not_ready_until_the_engine_loop_has_ticked(sqlite_store: Store) -> None:
    """Start-up (wiring the driver, taking back this worker's attempts) does not ride out a store outage:
    a probe that said ready then would let an orchestrator count on a process about to exit."""
    name = WorkerName(sqlite_store, "w1").acquire()
    health = EngineMetrics("w1", poll_interval_s=1.0)
    ready = Readiness(sqlite_store, "w1", lambda: name.held, started=health.has_ticked)
    assert not ready()
    health.tick_finished(False, 0.1)  # a tick that met a store failure: the loop is not known to work yet
    assert not ready()
    health.tick_finished(True, 0.1)
    assert ready()
    name.release()


def test_not_ready_when_the_store_does_not_answer() -> None:
    unreachable = Store(create_db_engine(database_url("postgresql://nobody@127.0.0.1:1/none")))
    try:
        assert not Readiness(unreachable, "w1", lambda: True)()
    finally:
        unreachable.close()


# ---- the listener -------------------------------------------------------------------------------------------


@contextmanager
def listener(
    live: list[bool], ready: list[bool], exposition: bytes | None = b"x 1\n"
) -> Iterator[tuple[str, int]]:
    def expose() -> bytes:
        if exposition is None:
            raise StoreError("store error: connection refused")
        return exposition

    with serve_metrics("127.0.0.1", 0, expose, live=lambda: live[0], ready=lambda: ready[0]) as address:
        yield address


def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection(*address, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def raw(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_probes_answer_ok_or_503_and_nothing_else() -> None:
    live, ready = [True], [True]
    with listener(live, ready) as address:
        for path in ("/livez", "/readyz", "/livez?verbose=1"):
            status, body, headers = get(address, path)
            assert (status, body) == (200, b"ok\n")
            assert headers["content-type"] == "text/plain; charset=utf-8"
            assert headers["server"] == "host-engine"
        assert get(address, "/metrics")[:2] == (200, b"x 1\n")
        ready[0] = False
        assert get(address, "/readyz")[:2] == (503, b"not ready\n")
        assert get(address, "/livez")[:2] == (200, b"ok\n")  # alive, just not ready
        live[0] = False
        assert get(address, "/livez")[:2] == (503, b"not live\n")
        status, body, headers = get(address, "/livez", "HEAD")
        assert (status, body, headers["content-length"]) == (503, b"", "9")


def test_a_failing_scrape_or_check_is_one_line() -> None:
    def broken() -> bool:
        raise RuntimeError("boom /etc/secret")

    with serve_metrics("127.0.0.1", 0, lambda: b"", live=broken, ready=broken) as address:
        assert get(address, "/livez")[:2] == (503, b"not live\n")
        assert get(address, "/readyz")[:2] == (503, b"not ready\n")
    with listener([True], [True], exposition=None) as address:
        assert get(address, "/metrics")[:2] == (500, b"500 Internal Server Error\n")


@pytest.mark.parametrize(
    ("request_bytes", "status_line", "body"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 404 Not Found", b"404 Not Found\n"),
        (b"GET /livez/ HTTP/1.1\r\n\r\n", b"HTTP/1.0 404 Not Found", b"404 Not Found\n"),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.0 405 Method Not Allowed",
            b"405 Method Not Allowed\n",
        ),
        (
            b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            b"HTTP/1.0 431 Request Header Fields Too Large",
            b"431 Request Header Fields Too Large\n",
        ),
        (
            b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
            b"HTTP/1.0 431 Request Header Fields Too Large",
            b"431 Request Header Fields Too Large\n",
        ),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"HTTP/1.0 414 Request-URI Too Long", None),
        # a TLS hello: no HTTP version to answer in, so the bare line
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03<script>\r\n\r\n", None, b"400 Bad Request\n"),
        (b"BREW /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 501 Not Implemented", b"501 Not Implemented\n"),
    ],
)
def test_hostile_requests_get_one_line_and_reveal_nothing(
    request_bytes: bytes, status_line: bytes | None, body: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    with listener([True], [True]) as address:
        answer = raw(address, request_bytes)
        if status_line is None:
            got = answer
        else:
            head, _, got = answer.partition(b"\r\n\r\n")
            assert head.split(b"\r\n")[0] == status_line
        assert got.count(b"\n") == 1 and got.endswith(b"\n")
        if body is not None:
            assert got == body
        for leak in (b"Python", b"BaseHTTP", b"<html", b"<script>", b"Traceback", b"aaaa"):
            assert leak not in answer
        assert get(address, "/livez")[:2] == (200, b"ok\n")  # and it still serves
    assert "Traceback" not in caplog.text


def test_a_silent_client_is_dropped_and_does_not_block_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("host_engine.metrics_http._Handler.timeout", 1.0)
    with listener([True], [True]) as address, socket.create_connection(address, timeout=5) as silent:
        silent.sendall(b"GET /met")  # and nothing more
        assert get(address, "/livez")[:2] == (200, b"ok\n")
        started = time.monotonic()
        assert silent.recv(100) == b""  # dropped after the timeout
        assert time.monotonic() - started < WAIT_S


# ---- a stuck loop, end to end through the listener ---------------------------------------------------------


def test_a_stuck_executor_loop_turns_livez_503_until_it_moves_again(sqlite_store: Store) -> None:
    release = threading.Event()

    class Stuck:
        def tick(self) -> None:
            release.wait(WAIT_S * 2)  # a call that does not return

    config = EngineConfig(engine=EngineLoopConfig(worker="w1", poll_interval_s=0.05))
    m = EngineMetrics("w1", poll_interval_s=0.05, slack_s=1.0)
    with MetadataSync(sqlite_store) as sync:
        engine = Engine(sqlite_store, config, sync, steps=[Stuck(), m.beat_step()], threads=True)
        engine.on_tick = m.tick_finished
        runner = threading.Thread(target=engine.run, daemon=True)
        with serve_metrics("127.0.0.1", 0, m.exposition, live=m.live) as address:
            runner.start()
            try:
                deadline = time.monotonic() + WAIT_S
                while get(address, "/livez")[0] == 200:
                    assert time.monotonic() < deadline, "livez stayed 200 with a stuck loop"
                    time.sleep(0.1)
                # the engine loop itself kept ticking meanwhile
                assert (sample(m, "host_engine_tick_duration_seconds_count") or 0) > 1
                release.set()
                deadline = time.monotonic() + WAIT_S
                while get(address, "/livez")[0] != 200:
                    assert time.monotonic() < deadline, "livez stayed 503 once the loop moved again"
                    time.sleep(0.1)
            finally:
                release.set()
                engine.request_stop()
                runner.join(WAIT_S)


# ---- the docs -----------------------------------------------------------------------------------------------


def test_every_metric_the_health_docs_name_is_exported(sqlite_store: Store) -> None:
    """docs/host-engine.md "Health and metrics" (its table and alert rules) names only real metrics."""
    import re

    from host_engine.executor_metrics import ExecutorMetrics

    doc = (Path(__file__).parents[3] / "docs" / "host-engine.md").read_text()
    section = doc.split("## Health and metrics", 1)[1].split("\n## ", 1)[0]
    m = EngineMetrics("w1", poll_interval_s=1.0)
    ExecutorMetrics(sqlite_store, registry=m.registry)
    m.tick_finished(True, 0.1)
    m.server_answered(URL_A, True)
    lines = m.exposition().decode().splitlines()
    exported = {line.split()[2] for line in lines if line.startswith("# TYPE ")}  # histograms: base name
    exported |= {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}
    named = set(re.findall(r"host_engine_[a-z_]+[a-z]", section))
    named = {n for n in named if not n.endswith("_")} - {"host_engine_migration"}  # `host_engine_migration_*`
    assert named, "the section names no metric"
    assert named <= exported, named - exported
