#!/usr/bin/env python3
"""Guest SDK benchmark: notice latency (admin change -> ``wait()`` returning) and the cost of one call.

    .venv/bin/python bench/guest_sdk.py [--events 200] [--droplets 50] [--calls 2000] [--json FILE]

Against the real metadata server started through its CLI on loopback (host_engine/lab/launch.py), every
simulated droplet on its own source address 127.0.0.N:

1. Long-poll, one droplet at a time: one waiter thread alternates ``wait()`` and ``wait_until_clear()``;
   the benchmark sets an event through the admin API (``PUT .../maintenance``), takes the time the waiter's
   call returns, then clears it the same way: ``--events`` of each. Latency is from just before the admin
   PUT is sent to the SDK call returning (so it includes the admin request, its commit, the guest workers'
   store watch, the wake-up and the answer).
2. Long-poll and polling side by side, ``--droplets`` droplets at once, ``--events`` in all: each droplet
   has a waiter (alternating ``wait()`` / ``wait_until_clear()``) and its own engine thread that sets, then
   clears, its event after a random pause, so changes land at random points of the polling phase. Polling
   is the same SDK with ``long_poll=False`` at the default ``poll_interval_s`` (5 s): what a client of a
   server without long-polls gets.
3. The cost of one call, sequentially on one keep-alive connection: ``event()`` (text), ``details()`` (JSON),
   a bare ``requests.Session.get`` of the text endpoint as the floor, and ``event()`` on a new client (new
   connection) each time. Wall time per call and the client's own CPU time per call.

Every loop is bounded in count and in time (``--max-seconds``); everything talks only to 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Run as a script, bench/ is sys.path[0], and this file would shadow the guest_sdk package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench import _procs  # noqa: E402
from bench._stats import machine, percentile  # noqa: E402
from guest_sdk import EventKind, MaintenanceClient  # noqa: E402
from guest_sdk.client import DEFAULT_POLL_INTERVAL_S  # noqa: E402
from guest_sdk.transport import SourceAddressAdapter  # noqa: E402
from host_engine.lab.launch import MetadataServerProcess  # noqa: E402

SETTLE_S = 0.05  # after an answer, time for the waiter to be back in its long-poll before the next change
ANSWER_TIMEOUT_S = 20.0


@dataclass
class Stats:
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def stats(samples_s: list[float]) -> Stats:
    ordered = sorted(samples_s)
    n = len(ordered)

    def pct(p: float) -> float:
        return percentile(ordered, p) * 1000

    return Stats(
        n=n,
        p50_ms=round(pct(50), 2),
        p90_ms=round(pct(90), 2),
        p99_ms=round(pct(99), 2),
        max_ms=round(ordered[-1] * 1000, 2),
        mean_ms=round(statistics.fmean(ordered) * 1000, 2),
    )


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def check(self, what: str) -> None:
        if time.monotonic() > self.at:
            raise SystemExit(f"guest_sdk bench: --max-seconds passed during {what}")


def _register(ms: MetadataServerProcess, count: int, first: int) -> list[tuple[str, str]]:
    droplets = []
    for i in range(count):
        droplet_id, address = f"b{first + i}", f"127.0.0.{first + i}"
        ms.register(droplet_id, [address])
        droplets.append((droplet_id, address))
    # The guest workers see a registration a few ms after the admin API acknowledges it.
    for _, address in droplets:
        with MaintenanceClient(ms.guest_url, source_address=address) as client:
            for _ in range(500):
                try:
                    client.event()
                    break
                except Exception:
                    time.sleep(0.01)
    return droplets


# -- 1. long-poll, one droplet, sequential -----------------------------------------------------------


def sequential_long_poll(ms: MetadataServerProcess, events: int, deadline: Deadline) -> dict[str, Stats]:
    ((droplet_id, address),) = _register(ms, 1, 2)
    answers: queue.Queue[tuple[str, float]] = queue.Queue()
    stop = threading.Event()

    def waiter() -> None:
        with MaintenanceClient(ms.guest_url, source_address=address) as client:
            while not stop.is_set():
                ev = client.wait(timeout_s=ANSWER_TIMEOUT_S)
                answers.put((ev.id or "", time.monotonic()))
                if stop.is_set():
                    return
                client.wait_until_clear(timeout_s=ANSWER_TIMEOUT_S)
                answers.put(("", time.monotonic()))

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    set_s: list[float] = []
    after_ack_s: list[float] = []  # from the admin PUT's 200 (negative: the guest knew first)
    clear_s: list[float] = []
    with requests.Session() as admin:
        admin.headers["Authorization"] = f"Bearer {ms.token}"
        base = f"{ms.admin_url}/admin/v1/droplets/{droplet_id}/maintenance"
        for i in range(events):
            deadline.check("the sequential long-poll run")
            time.sleep(SETTLE_S)
            if i == events - 1:
                stop.set()
            sent = time.monotonic()
            admin.put(base, json={"id": f"ev-{i}", "event": "live_migrate", "state": "scheduled"}, timeout=10)
            acked = time.monotonic()
            event_id, at = answers.get(timeout=ANSWER_TIMEOUT_S)
            assert event_id == f"ev-{i}", event_id
            set_s.append(at - sent)
            after_ack_s.append(at - acked)
            if i == events - 1:
                break
            time.sleep(SETTLE_S)
            sent = time.monotonic()
            admin.delete(base, timeout=10)
            event_id, at = answers.get(timeout=ANSWER_TIMEOUT_S)
            assert event_id == ""
            clear_s.append(at - sent)
        admin.delete(base, timeout=10)
    thread.join(timeout=ANSWER_TIMEOUT_S)
    return {
        "wait": stats(set_s),
        "wait_after_admin_200": stats(after_ack_s),
        "wait_until_clear": stats(clear_s),
    }


# -- 2. many droplets at once: long-poll vs polling ----------------------------------------------------


def parallel(
    ms: MetadataServerProcess,
    droplets: list[tuple[str, str]],
    events: int,
    long_poll: bool,
    deadline: Deadline,
) -> dict[str, Stats]:
    """Every droplet has a waiter (alternating wait / wait_until_clear) and an engine thread of its own that
    sets and clears its event after a random pause, so each change lands at a random point of the waiter's
    polling phase (a change right after a poll waits a whole interval, one right before it hardly at all)."""
    rounds = -(-events // len(droplets))
    # Long-poll: pauses long enough that the droplets' admin PUTs (each a synchronous SQLite commit) do not
    # queue behind one another, which would measure the admin API's write throughput instead.
    pause_s = (0.5, 0.5 + DEFAULT_POLL_INTERVAL_S) if not long_poll else (0.5, 1.5)
    latencies: list[float] = []
    after_200: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def droplet_run(droplet_id: str, address: str) -> None:
        seen: queue.Queue[float] = queue.Queue()
        stop = threading.Event()
        rng = random.Random(address)

        def waiter() -> None:
            with MaintenanceClient(ms.guest_url, source_address=address, long_poll=long_poll) as client:
                for _ in range(rounds):
                    client.wait(timeout_s=ANSWER_TIMEOUT_S)
                    seen.put(time.monotonic())
                    client.wait_until_clear(timeout_s=ANSWER_TIMEOUT_S)
                    seen.put(time.monotonic())
                    if stop.is_set():
                        return

        thread = threading.Thread(target=waiter, daemon=True)
        url = f"{ms.admin_url}/admin/v1/droplets/{droplet_id}/maintenance"
        try:
            with requests.Session() as admin:
                admin.headers["Authorization"] = f"Bearer {ms.token}"
                thread.start()
                for r in range(rounds):
                    deadline.check("the parallel run")
                    time.sleep(rng.uniform(*pause_s))
                    sent = time.monotonic()
                    admin.put(
                        url,
                        json={"id": f"{droplet_id}-r{r}", "event": "live_migrate", "state": "scheduled"},
                        timeout=10,
                    )
                    acked = time.monotonic()
                    got = seen.get(timeout=ANSWER_TIMEOUT_S)
                    with lock:
                        latencies.append(got - sent)
                        after_200.append(got - acked)
                    time.sleep(rng.uniform(*pause_s))
                    admin.delete(url, timeout=10)
                    seen.get(timeout=ANSWER_TIMEOUT_S)
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            stop.set()
            thread.join(timeout=ANSWER_TIMEOUT_S)

    threads = [threading.Thread(target=droplet_run, args=d, daemon=True) for d in droplets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=rounds * (2 * pause_s[1] + 2 * ANSWER_TIMEOUT_S))
    if errors:
        raise errors[0]
    return {"wait": stats(latencies[:events]), "wait_after_admin_200": stats(after_200[:events])}


# -- 3. the cost of one call ------------------------------------------------------------------------------


@dataclass
class CallCost:
    calls: int
    wall: Stats
    client_cpu_us_per_call: float


def call_cost(fn: Callable[[], object], calls: int, deadline: Deadline) -> CallCost:
    for _ in range(min(50, calls)):  # warm the connection and caches
        fn()
    samples = []
    cpu0 = time.process_time()
    for _ in range(calls):
        deadline.check("the call-cost run")
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    return CallCost(calls, stats(samples), round(cpu / calls * 1e6, 1))


def costs(ms: MetadataServerProcess, calls: int, deadline: Deadline) -> dict[str, CallCost]:
    ((droplet_id, address),) = _register(ms, 1, 3)
    ms.set_event(droplet_id, "ev-cost")
    out: dict[str, CallCost] = {}
    with MaintenanceClient(ms.guest_url, source_address=address) as client:
        assert client.wait(timeout_s=10).kind is EventKind.LIVE_MIGRATE
        out["event() keep-alive"] = call_cost(client.event, calls, deadline)
        out["details() keep-alive"] = call_cost(client.details, calls, deadline)
    with requests.Session() as session:
        session.mount("http://", SourceAddressAdapter(address))
        url = ms.guest_url + "/v1/maintenance_event"
        out["bare requests.Session.get"] = call_cost(
            lambda: session.get(url, timeout=5).content, calls, deadline
        )

    def fresh() -> object:
        with MaintenanceClient(ms.guest_url, source_address=address) as c:
            return c.event()

    out["event() on a new client"] = call_cost(fresh, max(1, calls // 4), deadline)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200, help="events per latency measurement (>= 200)")
    parser.add_argument("--droplets", type=int, default=50, help="droplets at once in the parallel runs")
    parser.add_argument("--calls", type=int, default=2000, help="calls per cost measurement")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="abort past this wall time")
    parser.add_argument("--skip-polling", action="store_true", help="skip the (slow) polling run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if not 1 <= args.droplets <= 200:
        parser.error("--droplets must be 1-200 (127.0.0.10 .. 127.0.0.209)")
    deadline = Deadline(args.max_seconds)
    busy0, started = _procs.machine_busy_seconds(), time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with TemporaryDirectory(prefix="bench-guest-sdk-") as tmp, MetadataServerProcess.running(Path(tmp)) as ms:
        print(f"# {results['machine']}", flush=True)
        seq = sequential_long_poll(ms, args.events, deadline)
        results["long_poll_sequential"] = {k: asdict(v) for k, v in seq.items()}
        for name, st in seq.items():
            print(f"long-poll, one droplet, {name}: {st}", flush=True)
        many = _register(ms, args.droplets, 10)
        lp = parallel(ms, many, args.events, True, deadline)
        results["long_poll_parallel"] = {k: asdict(v) for k, v in lp.items()}
        for name, st in lp.items():
            print(f"long-poll, {args.droplets} droplets at once, {name}: {st}", flush=True)
        if not args.skip_polling:
            pl = parallel(ms, many, args.events, False, deadline)
            results["polling_parallel"] = {k: asdict(v) for k, v in pl.items()}
            for name, st in pl.items():
                print(
                    f"polling every {DEFAULT_POLL_INTERVAL_S} s, {args.droplets} droplets, {name}: {st}",
                    flush=True,
                )
        cost = costs(ms, args.calls, deadline)
        results["call_cost"] = {k: asdict(v) for k, v in cost.items()}
        for name, c in cost.items():
            print(f"cost {name}: {c}", flush=True)
    wall = time.monotonic() - started
    results["wall_s"] = round(wall, 1)
    results["machine_busy_vcpus"] = round((_procs.machine_busy_seconds() - busy0) / wall, 2)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
