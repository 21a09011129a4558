#!/usr/bin/env python3
"""Metadata-server benchmark: the hot endpoint against baselines, and long-poll fan-out.

    .venv/bin/python bench/metadata_server.py [--json bench/results/metadata_server.json]

1. Hot endpoint. ``wrk -t2 -c32 -d10s --latency`` on ``GET /v1/maintenance_event`` (32 keep-alive
   connections from 127.0.0.1) against, one at a time and interleaved over ``--rounds`` rounds:
   the server the CLI starts (``metadata-server serve --workers W``, 127.0.0.1 registered as a droplet
   with a live_migrate event), a bare Flask app answering the same bytes under gunicorn gthread
   2 workers x 8 threads (the baseline of the target), and nginx ``return 200 "live_migrate"`` with
   2 workers (the ceiling). Each target answers one warm-up run before the measured one. Reported:
   the round with the median req/s, the req/s range over rounds, and the CPU time the server's
   process tree used per request.
2. Long-poll fan-out, for each ``--workers``: N droplets (127.0.0.2, 127.0.0.3, ...) each holding
   ``GET /v1/maintenance_event?wait_for_change=true&last_etag=<its etag>&timeout_sec=120`` on a
   keep-alive connection from its own source address; once the server's ``/metrics`` says all N are
   held, two changes, one after the other:
   a) admin API: one ``PUT /admin/v1/droplets/<id>/maintenance`` per droplet over 4 keep-alive
      admin connections as fast as the server acknowledges them. Per droplet: the time from its own
      PUT's 200 to its waiter's answer (negative: the waiter had the answer before the admin client had
      the 200), and from its own PUT being sent; plus the wall time from the first PUT to the last answer.
   b) one SQLite commit for all N (``UPDATE events SET state='in_progress'`` written straight into the
      state file, bypassing the admin API, as the host engine's bulk change would look to the
      guest workers): per droplet, the time from the commit returning to its waiter's answer. This
      isolates the wake-up path (watcher -> reload -> wake -> write) from admin-API throughput.
   Memory: VmRSS of the guest worker processes with N long-polls held minus before any was opened,
   divided by N.

The client is one thread with raw non-blocking sockets and a ``selectors`` loop (bench/_http.py).
Every loop is bounded in count and time; everything talks only to 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Run as a script, bench/ is sys.path[0], and this file would shadow the metadata_server package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench import _procs  # noqa: E402
from bench._http import Conn, Loop, LoopTimeout, Response, request_bytes  # noqa: E402
from bench._nginx import Nginx  # noqa: E402
from bench._stats import cpu_model, percentile  # noqa: E402
from host_engine.lab.launch import MetadataServerProcess, free_port  # noqa: E402

PATH = "/v1/maintenance_event"
BODY = b"live_migrate"
HOT_DROPLET = "bench-hot"
# gunicorn's gthread worker hands a freshly accepted connection to a thread that blocks reading its first
# request, so the admin listener's 8 threads must not all be taken by connections we open before using.
ADMIN_CONNS = 4
LONG_POLL_TIMEOUT_S = 120
PHASE_TIMEOUT_S = 90.0
# --server-bin: the metadata-server executable every server of this run is started with ("": this venv's).
SERVER_PROGRAM = ""


# ---- helpers ---------------------------------------------------------------------------------------------


def to_ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def wait_for_body(url: str, timeout_s: float = 10) -> None:
    """Block until ``url`` (fetched from 127.0.0.1) answers 200 with exactly BODY."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            r = requests.get(url, timeout=1)
            if r.status_code == 200 and r.content == BODY:
                return
            last = f"{r.status_code} {r.content!r}"
        time.sleep(0.05)
    raise RuntimeError(f"{url} never answered 200 {BODY!r} (last: {last})")


def droplet_address(i: int) -> str:
    """127.0.0.2, 127.0.0.3, ..., 127.0.0.255, 127.0.1.0, ... (never 127.0.0.1: that is the hot droplet)."""
    n = i + 2
    return f"127.0.{n // 256}.{n % 256}"


def guest_workers(ms: MetadataServerProcess) -> list[int]:
    """The guest listener's gunicorn workers: children of the arbiter that loaded gevent."""
    for arbiter in _procs.children(ms.proc.pid if ms.proc else -1):
        with contextlib.suppress(OSError):
            if "/gevent/" in Path(f"/proc/{arbiter}/maps").read_text():
                return _procs.children(arbiter)
    raise RuntimeError("guest listener arbiter not found")


# ---- 1. hot endpoint -------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: str
    server_cpu_s: float
    cpu_us_per_request: float
    wrk_cpu_s: float
    other_load_vcpus: float  # CPU the rest of the machine used meanwhile (other people's work), in vCPUs


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _latency_ms(text: str, label: str) -> float:
    m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no {label} latency in wrk output:\n{text}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(target: str, url: str, pids: list[int], args: argparse.Namespace, duration_s: int) -> WrkRun:
    cpu0, busy0, wrk0 = _procs.cpu_seconds(pids), _procs.machine_busy_seconds(), _children_cpu()
    started = time.monotonic()
    out = subprocess.run(
        ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{duration_s}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=True,
    ).stdout
    cpu = _procs.cpu_seconds(pids) - cpu0
    wall = time.monotonic() - started
    wrk_cpu = _children_cpu() - wrk0
    other = _procs.machine_busy_seconds() - busy0 - cpu - wrk_cpu
    total = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if not total or not rps:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    n = int(total.group(1))
    return WrkRun(
        target=target,
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(out, "50%"),
        p99_ms=_latency_ms(out, "99%"),
        requests=n,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sock_err.group(1).strip() if sock_err else "",
        server_cpu_s=round(cpu, 2),
        cpu_us_per_request=round(cpu / n * 1e6, 1) if n else 0.0,
        wrk_cpu_s=round(wrk_cpu, 2),
        other_load_vcpus=round(max(0.0, other) / wall, 2),
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


Target = Callable[[Path], contextlib.AbstractContextManager[tuple[str, list[int]]]]


@contextlib.contextmanager
def ours(workdir: Path, workers: int) -> Iterator[tuple[str, list[int]]]:
    with MetadataServerProcess.running(workdir, "--workers", str(workers), program=SERVER_PROGRAM) as ms:
        ms.register(HOT_DROPLET, ["127.0.0.1"])
        ms.set_event(HOT_DROPLET, "ev-hot")
        url = ms.guest_url + PATH
        wait_for_body(url)
        assert ms.proc is not None
        yield url, _procs.tree(ms.proc.pid)


@contextlib.contextmanager
def bare_flask(workdir: Path) -> Iterator[tuple[str, list[int]]]:
    port = free_port()
    log = (workdir / "gunicorn.log").open("ab")
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(BENCH), "-k", "gthread", "-w", "2",
            "--threads", "8", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
            "_flask_baseline:app"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        wait_for_body(url)
        time.sleep(0.5)  # let both workers finish booting
        yield url, _procs.tree(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def nginx(_workdir: Path) -> Iterator[tuple[str, list[int]]]:
    with Nginx.start(free_port(), body=BODY.decode(), path=PATH, workers=2) as ng:
        url = f"http://127.0.0.1:{ng.port}{PATH}"
        wait_for_body(url)
        yield url, _procs.tree(ng.proc.pid)


def hot_endpoint(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    targets: list[tuple[str, Target]] = [
        (f"metadata-server --workers {w}", lambda d, w=w: ours(d, w)) for w in args.hot_workers
    ]
    targets += [("bare Flask, gunicorn gthread 2x8", bare_flask), ("nginx return 200, 2 workers", nginx)]
    runs: dict[str, list[WrkRun]] = {name: [] for name, _ in targets}
    for rnd in range(args.rounds):
        for i, (name, factory) in enumerate(targets):
            workdir = tmp / f"hot-{rnd}-{i}"
            workdir.mkdir()
            with factory(workdir) as (url, pids):
                if args.warmup:
                    run_wrk(name, url, pids, args, args.warmup)
                run = run_wrk(name, url, pids, args, args.duration)
            if run.non_2xx:
                raise RuntimeError(f"{name}: {run.non_2xx} non-2xx responses")
            runs[name].append(run)
            print(f"  round {rnd + 1}: {name}: {run.rps:,.0f} req/s, p50 {round(run.p50_ms, 3)} ms, "
                  f"p99 {round(run.p99_ms, 2)} ms, {run.cpu_us_per_request} us CPU/request, "
                  f"others on the machine used {run.other_load_vcpus} vCPUs", flush=True)  # fmt: skip
    summary = []
    for rs in runs.values():
        median = sorted(rs, key=lambda r: r.rps)[len(rs) // 2]
        summary.append(
            asdict(median) | {"rps_min": min(r.rps for r in rs), "rps_max": max(r.rps for r in rs)}
        )
    return {"runs": {k: [asdict(r) for r in v] for k, v in runs.items()}, "summary": summary}


# ---- 2. long-poll fan-out --------------------------------------------------------------------------------


@dataclass
class Waiter:
    index: int
    droplet_id: str
    address: str
    conn: Conn | None = None
    etag: str = ""
    held_since: float = 0.0
    answers: list[Response] = field(default_factory=list)


class Admin:
    """Admin requests over ``ADMIN_CONNS`` keep-alive connections, as fast as the server answers them."""

    def __init__(self, loop: Loop, ms: MetadataServerProcess) -> None:
        self.loop, self.ms = loop, ms
        self.host = f"127.0.0.1:{ms.admin_port}"
        self.queue: list[tuple[str, str, Any, str]] = []
        self.sent: dict[str, float] = {}
        self.done: dict[str, Response] = {}
        self.conns = [
            Conn(loop, ("127.0.0.1", ms.admin_port), self._answered, "127.0.0.1") for _ in range(ADMIN_CONNS)
        ]
        self.tags: dict[int, str] = {}

    def run(self, requests_: list[tuple[str, str, Any, str]], then: Callable[[], bool] | None = None) -> None:
        """Send every request (method, path, json body, tag); wait for all answers (and ``then``)."""
        self.queue = list(reversed(requests_))
        self.sent, self.done = {}, {}
        for conn in self.conns:
            self._next(conn)
        total = len(requests_)
        self.loop.run_until(
            lambda: len(self.done) == total and (then is None or then()), PHASE_TIMEOUT_S, "admin requests"
        )
        bad = {tag: r.status for tag, r in self.done.items() if r.status >= 300}
        if bad:
            raise RuntimeError(f"admin requests failed: {dict(list(bad.items())[:5])}")

    def _next(self, conn: Conn) -> None:
        if not self.queue:
            return
        method, path, body, tag = self.queue.pop()
        payload = json.dumps(body).encode() if body is not None else b""
        headers = {"Authorization": f"Bearer {self.ms.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.tags[id(conn)] = tag
        self.sent[tag] = time.time()
        conn.send(request_bytes(method, path, self.host, headers, payload))

    def _answered(self, conn: Conn, response: Response) -> None:
        self.done[self.tags.pop(id(conn))] = response
        self._next(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def long_poll_request(host: str, etag: str) -> bytes:
    path = f"{PATH}?wait_for_change=true&last_etag={etag}&timeout_sec={LONG_POLL_TIMEOUT_S}"
    return request_bytes("GET", path, host)


def held_long_polls(ms: MetadataServerProcess) -> float:
    text = ms.admin("GET", "/metrics").text
    m = re.search(r"^metadata_server_held_long_polls\s+([\d.e+]+)", text, re.MULTILINE)
    return float(m.group(1)) if m else -1.0


def short_poll_probe(port: int, n: int = 200) -> tuple[float, float]:
    """p50/p99 of n sequential keep-alive GETs from 127.0.0.1 (the hot droplet), while long-polls are held."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", PATH)
            r = conn.getresponse()
            body = r.read()
            times.append(time.perf_counter() - t)
            if r.status != 200 or body != BODY:
                raise RuntimeError(f"short poll while held: {r.status} {body!r}")
    finally:
        conn.close()
    return to_ms(percentile(times, 50)), to_ms(percentile(times, 99))


def hold_all(loop: Loop, ms: MetadataServerProcess, waiters: list[Waiter], round_: int) -> None:
    """Every waiter sends its long-poll (after a plain GET for its ETag); wait until all are held."""
    host = f"127.0.0.1:{ms.guest_port}"

    def answered(conn: Conn, r: Response, w: Waiter) -> None:
        if conn.state == "probe":
            if r.status != 200 or r.body != b"":
                raise RuntimeError(f"{w.address}: first GET answered {r.status} {r.body!r}")
            w.etag = r.headers["etag"].strip('"')
            conn.state = "held"
            conn.send(long_poll_request(host, w.etag))
        elif conn.state == "held":
            w.answers.append(r)
            conn.state = "answered"
        else:
            raise RuntimeError(f"{w.address}: unexpected answer {r.status} in state {conn.state!r}")

    for w in waiters:
        if w.conn is None:
            w.conn = Conn(
                loop, ("127.0.0.1", ms.guest_port), lambda c, r, w=w: answered(c, r, w), source=w.address
            )
            w.conn.state = "probe"
            w.conn.send(request_bytes("GET", PATH, host))
        else:  # re-arm on the same connection with the ETag of the last answer
            w.etag = w.answers[-1].headers["etag"].strip('"')
            w.conn.state = "held"
            w.conn.send(long_poll_request(host, w.etag))
    loop.run_until(lambda: all(w.conn and w.conn.state == "held" for w in waiters), 60, "sending long-polls")
    deadline = time.monotonic() + 60
    while (held := held_long_polls(ms)) < len(waiters):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {held:.0f} of {len(waiters)} long-polls held after 60 s")
        loop.run_for(0.1)
    early = [w.address for w in waiters if len(w.answers) > round_]
    if early:
        raise RuntimeError(f"{len(early)} long-polls answered before any change, e.g. {early[:3]}")


def _latency_stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": to_ms(percentile(values, 50)),
        "p99_ms": to_ms(percentile(values, 99)),
        "max_ms": to_ms(max(values)),
        "min_ms": to_ms(min(values)),
    }


def fan_out(args: argparse.Namespace, tmp: Path, workers: int) -> dict[str, Any]:
    n = args.droplets
    waiters = [Waiter(i, f"fan-{i:05d}", droplet_address(i)) for i in range(n)]
    result: dict[str, Any] = {"workers": workers, "droplets": n}
    with MetadataServerProcess.running(
        tmp / f"fanout-w{workers}", "--workers", str(workers), program=SERVER_PROGRAM
    ) as ms:
        ms.register(HOT_DROPLET, ["127.0.0.1"])
        ms.set_event(HOT_DROPLET, "ev-hot")
        loop = Loop()
        admin = Admin(loop, ms)
        try:
            admin.run([("PUT", f"/admin/v1/droplets/{w.droplet_id}", {"addresses": [w.address]}, w.droplet_id)
                       for w in waiters])  # fmt: skip
            wait_for_body(ms.guest_url + PATH)
            time.sleep(1.0)  # every worker's watcher has reloaded the registrations
            workers_pids = guest_workers(ms)
            assert ms.proc is not None
            admin_pids = [p for p in _procs.tree(ms.proc.pid) if p not in workers_pids]
            rss_idle = {p: _procs.rss_kib(p) for p in workers_pids}

            # -- hold N long-polls ---------------------------------------------------------------------
            hold_all(loop, ms, waiters, 0)
            time.sleep(0.5)
            rss_held = {p: _procs.rss_kib(p) for p in workers_pids}
            result["held"] = held_long_polls(ms)
            result["rss_idle_kib"] = sum(rss_idle.values())
            result["rss_held_kib"] = sum(rss_held.values())
            result["kib_per_held_long_poll"] = round((result["rss_held_kib"] - result["rss_idle_kib"]) / n, 1)
            result["short_poll_while_held_p50_ms"], result["short_poll_while_held_p99_ms"] = short_poll_probe(
                ms.guest_port
            )

            # -- a) one admin PUT per droplet ----------------------------------------------------------
            cpu_w, cpu_a, cpu_c = (
                _procs.cpu_seconds(workers_pids),
                _procs.cpu_seconds(admin_pids),
                time.process_time(),
            )
            busy = Busy()
            puts = [
                ("PUT", f"/admin/v1/droplets/{w.droplet_id}/maintenance",
                 {"id": f"ev-{w.index}", "event": "live_migrate", "state": "scheduled"}, w.droplet_id)
                for w in waiters
            ]  # fmt: skip
            t0 = time.time()
            admin.run(puts, then=lambda: all(len(w.answers) == 1 for w in waiters))
            check_answers(waiters, 1)
            from_ack = [w.answers[0].at - admin.done[w.droplet_id].at for w in waiters]
            from_sent = [w.answers[0].at - admin.sent[w.droplet_id] for w in waiters]
            last_ack = max(r.at for r in admin.done.values())
            result["admin"] = {
                "puts_per_s": round(n / (last_ack - t0)),
                "first_put_to_last_ack_ms": to_ms(last_ack - t0),
                "first_put_to_last_answer_ms": to_ms(max(w.answers[0].at for w in waiters) - t0),
                "from_own_put_ack": _latency_stats(from_ack),
                "from_own_put_sent": _latency_stats(from_sent),
                "woken_before_own_put_sent": sum(1 for v in from_sent if v < 0),
                "guest_workers_cpu_s": round(_procs.cpu_seconds(workers_pids) - cpu_w, 2),
                "admin_cpu_s": round(_procs.cpu_seconds(admin_pids) - cpu_a, 2),
                "client_cpu_s": round(time.process_time() - cpu_c, 2),
            }
            result["admin"]["other_load_vcpus"] = busy.others(
                result["admin"]["guest_workers_cpu_s"] + result["admin"]["admin_cpu_s"],
                result["admin"]["client_cpu_s"],
            )

            admin.close()  # idle through (b): the admin listener closes them after its keep-alive timeout

            # -- b) one commit for all -----------------------------------------------------------------
            hold_all(loop, ms, waiters, 1)
            time.sleep(0.5)
            cpu_w, cpu_c = _procs.cpu_seconds(workers_pids), time.process_time()
            busy = Busy()
            committed = commit_for_all(ms.db_path, [w.droplet_id for w in waiters])
            try:
                loop.run_until(lambda: all(len(w.answers) == 2 for w in waiters), PHASE_TIMEOUT_S, "fan-out")
            except LoopTimeout as e:
                answered = sum(len(w.answers) == 2 for w in waiters)
                raise RuntimeError(
                    f"{answered} of {n} waiters saw the change written straight into the state file; if the "
                    "server now learns of changes other than by re-reading the tables, update commit_for_all"
                ) from e
            check_answers(waiters, 2)
            result["commit"] = _latency_stats([w.answers[1].at - committed for w in waiters]) | {
                "guest_workers_cpu_s": round(_procs.cpu_seconds(workers_pids) - cpu_w, 2),
                "client_cpu_s": round(time.process_time() - cpu_c, 2),
            }
            result["commit"]["other_load_vcpus"] = busy.others(
                result["commit"]["guest_workers_cpu_s"], result["commit"]["client_cpu_s"]
            )
        finally:
            admin.close()
            loop.close()
    return result


class Busy:
    """How much CPU the rest of the machine (other people's work) used during a phase, in vCPUs."""

    def __init__(self) -> None:
        self.busy0, self.t0 = _procs.machine_busy_seconds(), time.monotonic()

    def others(self, *ours: float) -> float:
        other = _procs.machine_busy_seconds() - self.busy0 - sum(ours)
        return round(max(0.0, other) / max(time.monotonic() - self.t0, 1e-3), 2)


def check_answers(waiters: list[Waiter], count: int) -> None:
    bad = [
        (w.address, r.status, r.body)
        for w in waiters
        if len(w.answers) != count or (r := w.answers[-1]).status != 200 or r.body != BODY
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} waiters got a wrong answer, e.g. {bad[:3]}")


def commit_for_all(db_path: Path, droplet_ids: list[str]) -> float:
    """scheduled -> in_progress for every droplet in one durable SQLite transaction.

    Returns ``time.time()`` right after the COMMIT.
    """
    conn = sqlite3.connect(str(db_path), isolation_level=None, timeout=10)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE events SET state = 'in_progress' WHERE droplet_id = ?", [(d,) for d in droplet_ids]
        )
        # The guest workers apply only droplets whose change sequence moved (metadata_server/store.py).
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'changes'").fetchone():
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
            conn.executemany(
                "INSERT INTO changes (droplet_id, seq) VALUES (?, ?) "
                "ON CONFLICT(droplet_id) DO UPDATE SET seq = excluded.seq",
                [(d, seq + n + 1) for n, d in enumerate(droplet_ids)],
            )
        conn.execute("COMMIT")
        return time.time()
    finally:
        conn.close()


# ---- report ----------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = cpu_model()

    def tool(argv: list[str], pattern: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(1) if m else "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gunicorn": version("gunicorn"),
        "gevent": version("gevent"),
        "flask": version("flask"),
        "nginx": tool(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": tool(["wrk", "--version"], r"wrk (\S+)"),
    }


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    a = results["args"]
    out = [
        f"Machine: {m['nproc']} vCPUs, {m['cpu']}, Linux {m['kernel']}; Python {m['python']}, gunicorn "
        f"{m['gunicorn']}, gevent {m['gevent']}, Flask {m['flask']}, nginx {m['nginx']}, wrk {m['wrk']}.",
        "",
    ]
    hot = results.get("hot")
    if hot:
        base = next(s for s in hot["summary"] if s["target"].startswith("bare Flask"))
        out += [
            f"Hot endpoint: `wrk -t{a['wrk_threads']} -c{a['connections']} -d{a['duration']}s --latency` on "
            f"`GET {PATH}` from 127.0.0.1, median of {a['rounds']} interleaved rounds (by req/s):",
            "",
            "| server | req/s (range over rounds) | vs bare Flask | p50 ms | p99 ms "
            "| server CPU µs/request | others' load, vCPUs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in hot["summary"]:
            out.append(
                f"| {s['target']} | {s['rps']:,.0f} ({s['rps_min']:,.0f} - {s['rps_max']:,.0f}) | "
                f"{s['rps'] / base['rps']:.2f}x | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                f"{s['cpu_us_per_request']:.0f} | {s['other_load_vcpus']:.2f} |"
            )
        out.append("")
    fan = results.get("fanout")
    if fan:
        n = fan[0]["droplets"]
        out += [
            f"Long-poll fan-out: {n:,} droplets, each holding one long-poll from its own source address; "
            "latency = time until the waiter has its answer:",
            "",
            "| guest workers | a) admin PUT per droplet: from own PUT's 200, p50 / p99 / max ms | "
            "from own PUT sent, p50 / p99 / max ms | first PUT → last answer ms (PUTs/s) | "
            "b) one commit for all: p50 / p99 / max ms | RSS per held long-poll | "
            "short poll while held p50 / p99 ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in fan:
            ad, sent, cm = f["admin"]["from_own_put_ack"], f["admin"]["from_own_put_sent"], f["commit"]
            out.append(
                f"| {f['workers']} | {ad['p50_ms']} / {ad['p99_ms']} / {ad['max_ms']} | "
                f"{sent['p50_ms']} / {sent['p99_ms']} / {sent['max_ms']} | "
                f"{f['admin']['first_put_to_last_answer_ms']:,.0f} ({f['admin']['puts_per_s']:,}) | "
                f"{cm['p50_ms']} / {cm['p99_ms']} / {cm['max_ms']} | {f['kib_per_held_long_poll']} KiB | "
                f"{f['short_poll_while_held_p50_ms']} / {f['short_poll_while_held_p99_ms']} |"
            )
        out += [
            "",
            "| guest workers | a) CPU s: guest workers / admin / bench client (others' load, vCPUs) | "
            "b) CPU s: guest workers / bench client (others' load, vCPUs) | "
            "RSS guest workers idle → held MiB |",
            "| --- | --- | --- | --- |",
        ]
        for f in fan:
            ad, cm = f["admin"], f["commit"]
            out.append(
                f"| {f['workers']} | {ad['guest_workers_cpu_s']} / {ad['admin_cpu_s']} / "
                f"{ad['client_cpu_s']} ({ad['other_load_vcpus']}) | "
                f"{cm['guest_workers_cpu_s']} / {cm['client_cpu_s']} ({cm['other_load_vcpus']}) | "
                f"{f['rss_idle_kib'] / 1024:.1f} → {f['rss_held_kib'] / 1024:.1f} |"
            )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run (0: none)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the hot-endpoint runs")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--hot-workers", type=_int_list, default=[1, 2, 4], help="guest workers for the hot runs")
    p.add_argument("--workers", type=_int_list, default=[1, 2, 4], help="guest workers for the fan-out runs")
    p.add_argument("--droplets", type=int, default=1000, help="held long-polls in the fan-out (max 65,000)")
    p.add_argument(
        "--server-bin",
        type=Path,
        help="the metadata-server executable to measure (default: this venv's), e.g. a patched copy",
    )
    p.add_argument("--skip-hot", action="store_true")
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument(
        "--json", type=Path, help="also write the results here (e.g. bench/results/metadata_server.json)"
    )
    args = p.parse_args()
    if not 1 <= args.droplets <= 65_000:
        p.error("--droplets must be 1-65000")
    if args.server_bin is not None:
        global SERVER_PROGRAM  # noqa: PLW0603 - the one setting every server of this run is started with
        SERVER_PROGRAM = str(args.server_bin.resolve())

    results: dict[str, Any] = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    results["args"]["command"] = " ".join(["bench/metadata_server.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="bench-metadata-server-") as d:
        tmp = Path(d)
        if not args.skip_hot:
            print("hot endpoint:", flush=True)
            results["hot"] = hot_endpoint(args, tmp)
        if not args.skip_fanout:
            results["fanout"] = []
            for w in args.workers:
                print(f"fan-out, {args.droplets} long-polls, --workers {w}:", flush=True)
                f = fan_out(args, tmp, w)
                print(f"  {json.dumps(f)}", flush=True)
                results["fanout"].append(f)
    print()
    print(render(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
