"""A fleet of engine workers on one store, for the tests/integration/test_fleet_*.py tests.

``FileHypervisor`` is a fake ``HypervisorDriver`` (a boundary we own) whose state lives in a directory, so
every worker process sees the same hypervisors, as real workers see the same libvirt daemons: where each
droplet runs, and one job per attempt that completes ``duration_s`` of wall time after it started (unless
aborted). Every switchover is recorded, so a test can say that a droplet ran its switchover exactly once.

``worker_main`` is one worker process as ``host-engine run`` builds it (engine loop on threads, the worker
name held, the executor with an attempt per thread, the fleet's limits from ``[concurrency]``) on that fake
hypervisor, since the simulated datacenter is per process here. ``max_overlap`` counts, from the store's
``migration_log``, how many attempts ran at once.

What every fleet test starts from is here too (its PostgreSQL server is the fixture ``tests.pg.pg_server``):
``add_hosts``, ``notified_migration`` (a backlog row, due now, its guest told), ``start_run`` (``host-engine
run`` as shipped, for the tests that run the real CLI instead of ``worker_main``) and ``engine_run`` (the same
for the length of a ``with`` block, for any test that runs the engine as a process).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from host_engine.attempt import RealClock
from host_engine.config import config_from_dict
from host_engine.drivers.base import (
    DomainState,
    DriverError,
    MigrationSpec,
    Phase,
    Progress,
    Recovered,
)
from host_engine.engine import Engine
from host_engine.executor import Executor, ExecutorConfig
from host_engine.metadata.reconcile import MetadataSync
from host_engine.models import Droplet, Host, LogEntry, Migration, NewMigration
from host_engine.states import MigrationState
from host_engine.store import Store, Tx
from host_engine.workers import WorkerName
from tests.fake_drivers import NoOpMigration

GIB = 1024**3
# A hung hypervisor call returns after this at the latest (tests never wait that long).
HANG_LIMIT_S = 600.0
RUNNING = (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING)
HOST_ENGINE_BIN = Path(sys.executable).parent / "host-engine"
# How long engine_run waits for a SIGTERMed engine before it kills it.
STOP_WAIT_S = 15.0
# How long a backlog row's maintenance window stays open (nothing in these tests waits for its end).
WINDOW = timedelta(hours=1)


# ---- what a fleet test starts from ---------------------------------------------------------------------


def add_hosts(store: Store, names: Iterable[str], *, scheme: str = "fake", metadata: Any = None) -> None:
    """Add hosts ``names`` to ``store``, in one datacenter, each with ``hypervisor_uri`` ``SCHEME://NAME``
    (``fake``: a ``FileHypervisor``; ``sim``: the simulated datacenter) and, given ``metadata`` (a
    ``tests.servers.MetadataServer``), that server for their droplets. Roomy (256 vCPUs, 1 TiB of memory,
    100,000 GiB of disk): capacity never limits these tests."""
    for name in names:
        store.add_host(
            Host(
                name,
                "nyc1",
                vcpus=256,
                memory_bytes=1024 * GIB,
                disk_bytes=100_000 * GIB,
                hypervisor_uri=f"{scheme}://{name}",
                metadata_url=metadata.admin_url if metadata is not None else "",
                metadata_token_file=str(metadata.token_file) if metadata is not None else "",
            )
        )


def notified_migration(tx: Tx, droplet: Droplet, target: str, now: datetime) -> Migration:
    """Add ``droplet`` (on its ``host``) and a migration of it to ``target``, due at ``now``, its guest told at
    ``now``: a row any worker may claim at once."""
    tx.add_droplet(droplet)
    m = tx.create_migration(NewMigration(droplet.id, droplet.host, target, now, now, now + WINDOW))
    return tx.transition(m.id, MigrationState.NOTIFIED, notified_at=now)


def _host_engine_run(
    db: str | os.PathLike[str], log: Path, settings: Iterable[str], run_options: Iterable[str]
) -> subprocess.Popen[bytes]:
    argv = [str(HOST_ENGINE_BIN), "--db", str(db), *settings, "run", *run_options]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out)


def start_run(
    url: str, worker: str, log: Path, *run_options: str, settings: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """``host-engine --db URL SETTINGS run --worker WORKER RUN_OPTIONS``, the CLI as shipped, its output
    appended to ``log``. ``settings`` are the global options before ``run`` (``--set key=value`` pairs)."""
    return _host_engine_run(url, log, settings, ("--worker", worker, *run_options))


@contextlib.contextmanager
def engine_run(
    db: str | os.PathLike[str], log: Path, *run_options: str, settings: Iterable[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """``host-engine --db DB SETTINGS run RUN_OPTIONS`` for the block, its output in ``log`` (emptied first).
    Still running when the block ends (the test failed before it stopped it), it gets SIGTERM as from an
    operator, and SIGKILL if it has not stopped ``STOP_WAIT_S`` later."""
    log.write_bytes(b"")
    proc = _host_engine_run(db, log, settings, run_options)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class FileHypervisor:
    """Hypervisors shared by processes through files in ``root`` (every change under one ``flock``)."""

    def __init__(self, root: Path, *, duration_s: float = 3.0) -> None:
        self.root = Path(root)
        self.duration_s = duration_s
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- state -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        with (self.root / "lock").open("a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            path = self.root / "state.json"
            state = json.loads(path.read_text()) if path.exists() else {"droplets": {}, "jobs": {}}
            yield state
            tmp = self.root / "state.json.tmp"
            tmp.write_text(json.dumps(state))
            tmp.replace(path)

    def read(self) -> dict[str, Any]:
        with self._state() as state:
            return json.loads(json.dumps(state))  # type: ignore[no-any-return]

    def hang(self, droplet_id: str, hung: bool = True) -> None:
        """Make every progress call about ``droplet_id`` block (or answer again)."""
        path = self.root / f"hang-{droplet_id}"
        if hung:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def finish_now(self, attempt_id: str) -> None:
        """Let a running job end at its next progress call (its copy is done)."""
        with self._state() as state:
            state["jobs"][attempt_id]["duration_s"] = 0.0

    def add_droplet(self, droplet_id: str, host: str) -> None:
        self.add_droplets([droplet_id], host)

    def add_droplets(self, droplet_ids: list[str], host: str) -> None:
        with self._state() as state:
            for droplet_id in droplet_ids:
                state["droplets"][droplet_id] = {"host": host, "switchovers": []}

    # ---- HypervisorDriver --------------------------------------------------------------------------------

    def migration(self, spec: MigrationSpec) -> FileMigration:
        return FileMigration(self, spec)

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        with self._state() as state:
            d = state["droplets"].get(droplet_id)
        return DomainState.RUNNING if d is not None and d["host"] == host else DomainState.ABSENT

    def recover(self, spec: MigrationSpec) -> str | Recovered:
        with self._state() as state:
            job = state["jobs"].get(spec.migration_id)
            if job is not None and job["status"] == "running":
                if time.time() - job["started"] >= job["duration_s"]:
                    _switch(state, spec, job)  # it finished while nobody watched: adopted
                else:
                    job["status"] = "aborted"
                    job["aborted_by"] = "recover"
            return str(state["droplets"][spec.droplet_id]["host"])


def _switch(state: dict[str, Any], spec: MigrationSpec, job: dict[str, Any]) -> None:
    droplet = state["droplets"][spec.droplet_id]
    if droplet["host"] != spec.source_host:
        raise DriverError(f"{spec.droplet_id} is on {droplet['host']}, not {spec.source_host}")
    droplet["host"] = spec.target_host
    droplet["switchovers"].append(spec.migration_id)
    job["status"] = "done"


class FileMigration(NoOpMigration):
    """One attempt: a job that completes after ``duration_s`` of wall time (the copy shrinks steadily) and
    switches over by itself then (``switchover`` is a no-op, as are the throttles and ``finalize``)."""

    def __init__(self, hv: FileHypervisor, spec: MigrationSpec) -> None:
        self.hv = hv
        self.spec = spec
        self.total = spec.memory_bytes + spec.disk_bytes

    def start(self) -> None:
        with self.hv._state() as state:
            if state["droplets"][self.spec.droplet_id]["host"] != self.spec.source_host:
                raise DriverError(f"{self.spec.droplet_id} is not on {self.spec.source_host}")
            state["jobs"][self.spec.migration_id] = {
                "started": time.time(),
                "duration_s": self.hv.duration_s,
                "status": "running",
                "pid": os.getpid(),
            }

    def progress(self) -> Progress:
        # A hypervisor that stops answering: while ``hang-<droplet>`` exists, the call blocks (bounded).
        hang = self.hv.root / f"hang-{self.spec.droplet_id}"
        deadline = time.monotonic() + HANG_LIMIT_S
        while hang.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with self.hv._state() as state:
            job = state["jobs"][self.spec.migration_id]
            elapsed = time.time() - job["started"]
            if job["status"] == "running" and elapsed >= job["duration_s"]:
                _switch(state, self.spec, job)
            status = job["status"]
        if status == "aborted":
            return self._progress(Phase.FAILED, elapsed, self.total, error="job aborted")
        if status == "done":
            return self._progress(Phase.DONE, elapsed, 0, downtime_ms=12.0)
        left = int(self.total * max(0.0, 1 - elapsed / self.hv.duration_s))
        return self._progress(Phase.DISK, elapsed, left)

    def _progress(
        self,
        phase: Phase,
        elapsed: float,
        remaining: int,
        *,
        downtime_ms: float | None = None,
        error: str | None = None,
    ) -> Progress:
        return Progress(
            phase=phase,
            elapsed_s=elapsed,
            round=1,
            disk_total_bytes=self.spec.disk_bytes,
            disk_processed_bytes=self.total - remaining,
            disk_remaining_bytes=remaining,
            memory_total_bytes=self.spec.memory_bytes,
            memory_processed_bytes=0,
            memory_remaining_bytes=0,
            disk_dirty_rate_bps=0.0,
            memory_dirty_rate_bps=0.0,
            transfer_rate_bps=self.total / self.hv.duration_s,
            downtime_ms=downtime_ms,
            bytes_transferred=self.total - remaining,
            error=error,
        )

    def abort(self) -> None:
        with self.hv._state() as state:
            job = state["jobs"].get(self.spec.migration_id)
            if job is not None and job["status"] == "running":
                job["status"] = "aborted"
                job["aborted_by"] = os.getpid()


# ---- a worker process ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process is told (plain values: it crosses a process boundary as JSON)."""

    db: str
    hv_dir: str
    name: str
    duration_s: float = 3.0
    lease: str = "6s"
    renew_every: str = "1s"
    max_concurrent: int = 4
    max_parallel: int = 4
    max_per_source: int = 2
    max_per_target: int = 2
    poll_interval: str = "200ms"


def worker_main(spec_json: str) -> None:
    """One worker: ``host-engine run``'s pieces on a ``FileHypervisor``, until SIGTERM."""
    spec = WorkerSpec(**json.loads(spec_json))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {spec.name} %(threadName)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = config_from_dict(
        {
            "engine": {
                **({"worker": spec.name} if spec.name else {}),  # "": the default name
                "lease": spec.lease,
                "renew_every": spec.renew_every,
                "max_concurrent": spec.max_concurrent,
                "poll_interval": spec.poll_interval,
            },
            "concurrency": {
                "max_parallel": spec.max_parallel,
                "max_per_source": spec.max_per_source,
                "max_per_target": spec.max_per_target,
            },
        }
    )
    store = Store.open(spec.db)
    try:
        with WorkerName(store, config.worker_id, check_every_s=1.0) as name, MetadataSync(store) as sync:
            executor = Executor(
                store,
                FileHypervisor(Path(spec.hv_dir), duration_s=spec.duration_s),
                ExecutorConfig.for_engine(config),
                RealClock(),
            )
            engine = Engine(store, config, sync, steps=[name, executor], threads=True)
            name.on_lost = engine.request_stop
            engine.install_signal_handlers()
            print("worker ready", flush=True)  # the test may wait for this line
            try:
                engine.run()
            finally:
                executor.shutdown()
    finally:
        store.close()


def start_worker(spec: WorkerSpec, log: Path) -> subprocess.Popen[bytes]:
    """A worker process (``worker_main``) writing its log to ``log``; returns once it holds its name."""
    repo = Path(__file__).resolve().parents[1]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet", json.dumps(asdict(spec))],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=out,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "worker ready", or EOF if it was refused
    if line != b"worker ready\n":
        proc.wait(30)
        raise AssertionError(f"worker {spec.name} did not start: {log.read_text()[-3000:]}")
    return proc


def stop(proc: Any, timeout_s: float = 15.0) -> None:
    """SIGTERM a worker process and wait for it (kill it if it does not stop)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except Exception:
            proc.kill()
            proc.wait(10)


# ---- reading the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    migration_id: str
    source: str
    target: str
    start: datetime
    end: datetime | None


def attempt_intervals(store: Store) -> list[Interval]:
    """Every attempt recorded in ``migration_log``: from its move into running to its move out."""
    out: list[Interval] = []
    for m in store.list_migrations():
        log: list[LogEntry] = store.migration_log(m.id)
        start: datetime | None = None
        for e in log:
            if e.to_state in RUNNING and e.from_state not in RUNNING:
                start = e.at
            elif e.from_state in RUNNING and e.to_state not in RUNNING and start is not None:
                out.append(Interval(m.id, m.source_host, m.target_host, start, e.at))
                start = None
        if start is not None:
            out.append(Interval(m.id, m.source_host, m.target_host, start, None))
    return out


@dataclass(frozen=True)
class Overlap:
    fleet: int
    per_source: dict[str, int]
    per_target: dict[str, int]


def max_overlap(intervals: list[Interval]) -> Overlap:
    """The most attempts running at once, fleet-wide, out of each source and into each target (an attempt
    ending at the instant another starts does not overlap it)."""
    events: list[tuple[datetime, int, Interval]] = []
    far = max((i.start for i in intervals), default=None)
    for i in intervals:
        events.append((i.start, 1, i))
        end = i.end if i.end is not None else far
        assert end is not None
        events.append((end, -1, i))
    events.sort(key=lambda ev: (ev[0], ev[1]))  # ends before starts at the same instant
    fleet = 0
    best_fleet = 0
    by_source: Counter[str] = Counter()
    by_target: Counter[str] = Counter()
    best_source: dict[str, int] = {}
    best_target: dict[str, int] = {}
    for _at, delta, i in events:
        fleet += delta
        by_source[i.source] += delta
        by_target[i.target] += delta
        best_fleet = max(best_fleet, fleet)
        best_source[i.source] = max(best_source.get(i.source, 0), by_source[i.source])
        best_target[i.target] = max(best_target.get(i.target, 0), by_target[i.target])
    return Overlap(best_fleet, best_source, best_target)


if __name__ == "__main__":
    worker_main(sys.argv[1])
