"""``host-engine demo``: a datacenter on one machine, in one command (``make demo``).

What it starts, all on loopback, all in a temporary directory, none of it needing root:

* one real ``metadata-server serve`` (guest and admin listeners on free 127.0.0.1 ports; the demo points every
  host at this one shared server, which DESIGN.md §2 allows for small sites);
* the engine, in this process: a SQLite store, the notice loop (:class:`~host_engine.engine.Engine`), the
  executor on the simulated hypervisor (:mod:`host_engine.drivers.sim`, advanced in simulated time, about
  twenty times faster than the wall clock), the convergence controller;
* one real ``guest-agent run`` per droplet, each on its own 127.0.0.N source address, whose hooks are small
  commands that say what a real one would do ("draining web-1 from the load balancer").

Then it evacuates ``hv-1`` with an explicitly unsafe, demo-only short notice and shows the plan with its
reasons, every notice, the live progress of every migration, each agent's hook lines, and a final table.
One droplet's owner prefers an offline migration (its power-off command only tells the simulator the droplet
is off); one migration fails once (a fault injected in the simulator) and is retried.

It exits 0 only if everything ended consistent: every droplet on exactly one host, the same in the store and
in the simulated world; no event left on the metadata server; every hook ran exactly once (the hook output
files and the agents' journals agree). Every process it started is stopped on the way out, also on Ctrl-C.

:class:`Demo` is also what ``tests/e2e`` drives (with a restart of the metadata server and a ``kill -9`` of an
agent in the middle); ``on_tick`` lets a test act between engine ticks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import click
import requests

from guest_sdk.daemon_logging import TextFormatter
from host_engine import planner, prediction
from host_engine.config import EngineConfig, EngineLoopConfig, PlacementConfig, ScheduleConfig
from host_engine.drivers.base import DomainState, Phase
from host_engine.drivers.sim import (
    Fault,
    FaultKind,
    GiB,
    MiB,
    SimClock,
    SimHypervisor,
    SimWorld,
    Workload,
    database,
    idle,
    log_writer,
    web,
)
from host_engine.drivers.sim.settings import SimHost, SimSettings
from host_engine.engine import Engine
from host_engine.errors import HostEngineError
from host_engine.executor import LAST_ATTEMPT_KEY, Executor, ExecutorConfig, attempt_id, placement_chooser
from host_engine.metadata.client import AdminClient
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Droplet, Host, LogEntry, Migration
from host_engine.placement import Choice, Plan
from host_engine.prediction import Prediction
from host_engine.retry import RetryConfig
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from host_engine.timeparse import utc_now

# ---- the scenario ----------------------------------------------------------------------------------------

DATACENTER = "demo1"
COMPAT_GROUP = "epyc-7003"
EVACUATE = "hv-1"
# 25 GbE: the source NIC is what an evacuation queues on; at 10 GbE the demo would take twice as long.
NIC_BPS = 3_125_000_000
# The notice each guest gets: far below the 10 minutes owners are promised, hence --unsafe-short-notice.
# Long enough for every agent's drain hooks and for batch-1 to shut itself down before its window.
NOTICE_S = 6.0
FIRST_NOTICE_AFTER_S = 1.0
# Simulated seconds per executor tick (the controller's cadence), and executor ticks per engine tick: with
# the engine ticking every 50 ms the simulated datacenter runs about 20x faster than the wall clock.
SIM_TICK_S = 0.5
SIM_TICKS_PER_ENGINE_TICK = 2
ENGINE_POLL_S = 0.05
SIM_SPEEDUP = SIM_TICK_S * SIM_TICKS_PER_ENGINE_TICK / ENGINE_POLL_S
# The planner spaces migrations by (disk + memory) / bandwidth in wall time: the share of the NIC one of three
# concurrent migrations gets, times the speed-up.
PLANNER_BANDWIDTH_BPS = int(NIC_BPS / 3 * SIM_SPEEDUP)
MAX_PER_SOURCE = 3
RETRY_BACKOFF_S = 2.0
# The engine re-sends its view to the metadata server this often (a minute in production): a server that was
# down when a migration completed gets its flag cleared within a demo-sized moment.
RECONCILE_EVERY = timedelta(seconds=2)
DEFAULT_TIMEOUT_S = 55.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Progress lines: one per phase or controller change, else at most this often per migration.
PROGRESS_EVERY_S = 1.5
FIRST_ADDRESS = 11  # 127.0.0.11, .12, ...


@dataclass(frozen=True)
class HostSpec:
    name: str
    vcpus: int
    memory_gib: int
    disk_gib: int


@dataclass(frozen=True)
class HookSay:
    """One command hook: it prints ``says`` (and records that it ran)."""

    phase: str  # on_notice | before_offline | after_migration
    name: str
    says: str


@dataclass(frozen=True)
class DropletSpec:
    id: str
    host: str
    vcpus: int
    memory_gib: int
    disk_gib: int
    workload: Workload
    owner: str = ""
    hooks: tuple[HookSay, ...] = ()
    prefer_offline: bool = False
    fail_once: bool = False  # the first attempt fails (a fault injected in the simulator), the retry succeeds

    @property
    def kind(self) -> str:
        return self.workload.name


HOSTS = (
    HostSpec("hv-1", 64, 256, 2048),
    HostSpec("hv-2", 64, 256, 2048),
    HostSpec("hv-3", 64, 256, 2048),
    HostSpec("hv-4", 32, 48, 1024),
)


def _lb(droplet: str) -> tuple[HookSay, ...]:
    return (
        HookSay("on_notice", "lb-drain", f"draining {droplet} from the load balancer"),
        HookSay("after_migration", "lb-ready", f"putting {droplet} back into the load balancer"),
    )


DROPLETS = (
    DropletSpec("web-1", EVACUATE, 2, 4, 40, web(), "shop", _lb("web-1")),
    DropletSpec("web-2", EVACUATE, 2, 4, 40, web(), "shop", _lb("web-2")),
    DropletSpec(
        "db-1",
        EVACUATE,
        8,
        16,
        80,
        database(disk_rate_bps=1500 * MiB, disk_hot_bytes=2 * GiB),
        "shop-db",
        (
            HookSay("on_notice", "checkpoint", "CHECKPOINT; pausing the nightly vacuum"),
            HookSay("after_migration", "resume-vacuum", "resuming the nightly vacuum"),
        ),
    ),
    DropletSpec(
        "cache-1",
        EVACUATE,
        4,
        16,
        20,
        replace(web(memory_rate_bps=2500 * MiB, memory_hot_bytes=8 * GiB), name="cache"),
        "cache",
        (
            HookSay("on_notice", "prefer-replica", "telling clients to read from the replica"),
            HookSay("after_migration", "take-reads", "taking reads again"),
        ),
    ),
    DropletSpec(
        "logs-1",
        EVACUATE,
        2,
        4,
        60,
        log_writer(),
        "ops",
        (
            HookSay("on_notice", "flush", "flushing log buffers to disk"),
            HookSay("after_migration", "ship", "resuming log shipping"),
        ),
        fail_once=True,
    ),
    DropletSpec(
        "ci-1",
        EVACUATE,
        4,
        8,
        40,
        web(),
        "ci",
        (
            HookSay("on_notice", "record-vms", "recording running nested VMs: build-17 build-18"),
            HookSay("after_migration", "restart-vms", "restarting nested VMs build-17 build-18"),
        ),
    ),
    DropletSpec(
        "batch-1",
        EVACUATE,
        2,
        4,
        20,
        idle(),
        "research",
        (
            HookSay("on_notice", "checkpoint", "checkpointing the batch job"),
            HookSay("before_offline", "stop-worker", "stopping batch-worker.service"),
            HookSay("after_migration", "resume", "resuming the batch job from its checkpoint"),
        ),
        prefer_offline=True,
    ),
    # Bystanders: their agents must see nothing at all.
    DropletSpec("web-3", "hv-2", 2, 4, 40, web(), "shop", _lb("web-3")),
    DropletSpec("mail-1", "hv-3", 2, 4, 40, idle(), "ops", _lb("mail-1")),
)


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path | None = None  # default: a new temporary directory, removed at the end
    keep: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    notice_s: float = NOTICE_S
    seed: int = 7
    droplets: tuple[DropletSpec, ...] = DROPLETS
    hosts: tuple[HostSpec, ...] = HOSTS


class DemoFailed(HostEngineError):
    """The demo could not run, or did not end consistent."""


# ---- child processes -------------------------------------------------------------------------------------


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoFailed(f"`{name}` not found next to {sys.executable} or on PATH (pip install -e '.[host]')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment for children: no proxies, none of the agent's or server's override variables."""
    drop = ("GUEST_AGENT_", "METADATA_SERVER_", "HOST_ENGINE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _signal(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the child's process group (each child leads one: its workers and hooks are in it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def _reap(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait for a signalled child, then SIGKILL whatever is left of its group."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout_s)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    _signal(proc, sig)
    _reap(proc)


@dataclass
class MetadataServerProcess:
    """``metadata-server serve`` on two free loopback ports, its state in ``workdir``."""

    workdir: Path
    guest_port: int = 0
    admin_port: int = 0
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def token_file(self) -> Path:
        return self.workdir / "admin-token"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def guest_url(self) -> str:
        return f"http://127.0.0.1:{self.guest_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.token:
            self.token = secrets.token_hex(16)
            self.token_file.write_text(self.token)
            self.token_file.chmod(0o600)
        if not self.guest_port:
            self.guest_port, self.admin_port = free_port(), free_port()
        self.launch()

    def launch(self) -> None:
        argv = [
            _bin("metadata-server"), "serve",
            "--guest-listen", f"127.0.0.1:{self.guest_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--db", str(self.workdir / "state.sqlite3"),
            "--admin-token-file", str(self.token_file),
            "--log-level", "warning",
        ]  # fmt: skip
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                argv, stdout=log_file, stderr=log_file, start_new_session=True, env=_clean_env()
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.up():
            if self.proc.poll() is not None:
                raise DemoFailed(f"metadata-server exited {self.proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DemoFailed(f"metadata-server did not come up: {self._log_tail()}")
            time.sleep(0.05)

    def up(self) -> bool:
        try:
            admin = requests.get(
                self.admin_url + "/healthz", headers={"Authorization": f"Bearer {self.token}"}, timeout=1
            )
            guest = requests.get(self.guest_url + "/v1/maintenance_event", timeout=1)
        except requests.RequestException:
            return False
        return admin.status_code == 200 and guest.status_code in (200, 404)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.launch()

    def client(self) -> AdminClient:
        return AdminClient(self.admin_url, self.token, timeout_s=5.0, attempts=3)

    def _log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-2000:]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# One line per hook run: "<unix time> <phase> <hook> <event id> <what it says>". Appending one short line is
# atomic, so the file is both the demo's output and the proof that each hook ran exactly once.
HOOK_SCRIPT = 'echo "$(date +%s.%N) $MAINTENANCE_PHASE $MAINTENANCE_HOOK $MAINTENANCE_EVENT_ID $1" >> "$0"'


@dataclass
class GuestAgentProcess:
    """``guest-agent run`` for one droplet, from its own source address, hooks that say what they do."""

    spec: DropletSpec
    address: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def journal_path(self) -> Path:
        return self.workdir / "journal.json"

    @property
    def hooks_path(self) -> Path:
        return self.workdir / "hooks.log"

    @property
    def poweroff_path(self) -> Path:
        return self.workdir / "powered-off"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def write_config(self, metadata_url: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        poweroff = f'echo "$(date +%s.%N) poweroff" >> {self.poweroff_path}'
        lines = [
            "[metadata]",
            f"url = {_toml(metadata_url)}",
            f"source_address = {_toml(self.address)}",
            "timeout_s = 5",
            "max_backoff_s = 1",
            "",
            "[agent]",
            f"journal_path = {_toml(str(self.journal_path))}",
            f"prefer_offline = {_toml(self.spec.prefer_offline)}",
            "power_on_after = true",
            # Harmless: it only leaves a file the demo turns into "the droplet is off" in the simulator.
            f"power_off_command = {_toml(['/bin/sh', '-c', poweroff])}",
            "power_off_timeout_s = 10",
            "deadline_margin_s = 1",
            'log_level = "info"',
        ]
        for hook in self.spec.hooks:
            lines += [
                "",
                f"[[{hook.phase}]]",
                f"name = {_toml(hook.name)}",
                f"command = {_toml(['/bin/sh', '-c', HOOK_SCRIPT, str(self.hooks_path), hook.says])}",
                "timeout_s = 10",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [_bin("guest-agent"), "run", "--config", str(self.config_path)],
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                env=_clean_env(),
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def started(self) -> bool:
        return self.log_path.exists() and "guest-agent started" in self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def kill9(self) -> None:
        """``kill -9`` the agent only (a hook it runs, if any, is left to finish as after a real crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None

    def journal(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.journal_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"events": {}, "active": None}
        return doc

    def hook_runs(self) -> list[tuple[float, str, str, str, str]]:
        """(time, phase, hook, event id, says) for every hook run so far."""
        out = []
        if self.hooks_path.exists():
            for line in self.hooks_path.read_text(errors="replace").splitlines():
                parts = line.split(" ", 4)
                if len(parts) == 5:
                    with contextlib.suppress(ValueError):
                        out.append((float(parts[0]), parts[1], parts[2], parts[3], parts[4]))
        return out


# ---- the demo --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """The final table, one per droplet."""

    droplet: str
    workload: str
    size: str
    lead_s: float | None
    downtime_ms: float | None
    offline: bool
    throttle: str
    bytes_moved: int
    result: str
    new_host: str
    duration_s: float | None = None
    predicted: Prediction | None = None


@dataclass
class _Seen:
    log_ids: set[int] = field(default_factory=set)
    hook_lines: dict[str, int] = field(default_factory=dict)
    progress_at: dict[str, float] = field(default_factory=dict)
    progress_key: dict[str, tuple[object, ...]] = field(default_factory=dict)


class Demo:
    """The demo step by step: ``setup``, ``evacuate``, ``run``, ``verify``, ``rows``; ``close`` always."""

    def __init__(self, options: DemoOptions | None = None, echo: Callable[[str], None] = print) -> None:
        self.options = options or DemoOptions()
        self.echo = echo
        self.t0 = time.monotonic()
        self.workdir: Path | None = None
        self._own_workdir = False
        self.server: MetadataServerProcess | None = None
        self.agents: dict[str, GuestAgentProcess] = {}
        self.store: Store | None = None
        self.world = SimWorld(self.options.seed)
        self.sync: MetadataSync | None = None
        self.engine: Engine | None = None
        self.executor: Executor | None = None
        self.migrations: dict[str, str] = {}  # droplet id -> migration id
        self.powered_off: dict[str, float] = {}  # droplet -> wall time it went off (its power-off command)
        self.booted: dict[str, float] = {}  # droplet -> wall time it was powered on again
        self._seen = _Seen()
        self._run_started: float | None = None
        self.predictions: dict[str, Prediction] = {}  # droplet id -> what the sim predicted at planning

    # ---- output ------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    def _need_store(self) -> Store:
        if self.store is None:
            raise DemoFailed("setup() first")
        return self.store

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this demo started; remove its files unless asked to keep them."""
        running = [a.proc for a in self.agents.values() if a.proc is not None]
        for proc in running:  # all at once: each agent takes up to a second to finish its step
            _signal(proc)
        for proc in running:
            with contextlib.suppress(Exception):
                _reap(proc)
        for agent in self.agents.values():
            agent.proc = None
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        if self.sync is not None:
            self.sync.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.workdir is not None and self._own_workdir and not self.options.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def setup(self) -> None:
        """Start the metadata server, build the store and the simulated datacenter, start one agent each."""
        opts = self.options
        if opts.workdir is not None:
            self.workdir = opts.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="host-engine-demo-"))
            self._own_workdir = True
        self.say(f"working directory {self.workdir}")
        self.server = MetadataServerProcess(self.workdir / "metadata-server")
        self.server.start()
        self.say(
            f"metadata server up: guests -> {self.server.guest_url}, admin API -> {self.server.admin_url} "
            "(one server shared by every host)"
        )
        store = self.store = Store.open(self.workdir / "engine.db")
        for h in opts.hosts:
            store.add_host(
                Host(
                    name=h.name,
                    datacenter=DATACENTER,
                    vcpus=h.vcpus,
                    memory_bytes=h.memory_gib * GiB,
                    disk_bytes=h.disk_gib * GiB,
                    compat_group=COMPAT_GROUP,
                    hypervisor_uri=f"sim://{h.name}",
                    metadata_url=self.server.admin_url,
                    metadata_token_file=str(self.server.token_file),
                )
            )
            self.world.add_host(h.name, nic_bps=NIC_BPS)
        for n, d in enumerate(opts.droplets):
            address = f"127.0.0.{FIRST_ADDRESS + n}"
            store.add_droplet(
                Droplet(
                    id=d.id,
                    host=d.host,
                    vcpus=d.vcpus,
                    memory_bytes=d.memory_gib * GiB,
                    disk_bytes=d.disk_gib * GiB,
                    owner_tag=d.owner,
                    addresses=(address,),
                    hostname=d.id,
                )
            )
            self.world.add_droplet(
                d.id,
                d.host,
                memory_bytes=d.memory_gib * GiB,
                disk_bytes=d.disk_gib * GiB,
                vcpus=d.vcpus,
                workload=d.workload,
            )
            self.agents[d.id] = GuestAgentProcess(d, address, self.workdir / "agents" / d.id)
        self._build_engine()
        engine = self._need_engine()
        reports = engine.reconcile()
        errors = [r.error for r in reports if r.error]
        if errors:
            raise DemoFailed(f"could not register the droplets on the metadata server: {errors[0]}")
        self.say(f"{len(opts.hosts)} hosts, {len(opts.droplets)} droplets registered on the metadata server")
        self._print_inventory()
        for agent in self.agents.values():
            agent.write_config(self.server.guest_url)
            agent.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(a.started() for a in self.agents.values()):
            for a in self.agents.values():
                if not a.running:
                    raise DemoFailed(f"guest-agent of {a.spec.id} exited: {a.log_path.read_text()[-1500:]}")
            if time.monotonic() > deadline:
                raise DemoFailed("the guest agents did not start in time")
            time.sleep(0.05)
        self.say(f"{len(self.agents)} guest agents running, each polling from its own address")

    def _build_engine(self) -> None:
        store = self._need_store()
        config = self.engine_config()
        self.sync = MetadataSync(
            store,
            default_client_factory(timeout_s=config.engine.notifier_timeout_s, attempts=3),
        )
        self.executor = Executor(
            store,
            SimHypervisor(self.world),
            ExecutorConfig(
                worker="demo",
                # As many copies at once as the planner lets leave one host: a slow machine stretches the
                # simulated clock, and more than three copies sharing hv-1's NIC would stall the database.
                max_concurrent=MAX_PER_SOURCE,
                tick_s=SIM_TICK_S,
                retry=RetryConfig(backoff_s=RETRY_BACKOFF_S, jitter=0.0),
            ),
            SimClock(self.world),
            hooks=self.sync,
            choose_target=placement_chooser(store, config.placement),
            rand=lambda: 0.5,
        )
        self.engine = Engine(store, config, self.sync, sleep=lambda _s: None, reconcile_every=RECONCILE_EVERY)

    def _need_engine(self) -> Engine:
        if self.engine is None:
            raise DemoFailed("setup() first")
        return self.engine

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            db=str(self.workdir / "engine.db") if self.workdir else "",
            placement=PlacementConfig(anti_affinity=True, runners_up=2),
            schedule=ScheduleConfig(
                notice=timedelta(seconds=self.options.notice_s),
                max_parallel=3,
                max_per_target=2,
                max_per_source=MAX_PER_SOURCE,
                bandwidth_bps=PLANNER_BANDWIDTH_BPS,
                slot_overhead=timedelta(seconds=1),
            ),
            engine=EngineLoopConfig(
                poll_interval_s=ENGINE_POLL_S,
                worker="demo",
                notifier_timeout_s=2.0,
                notifier_attempts=3,
            ),
            source="demo",
        )

    def _print_inventory(self) -> None:
        store = self._need_store()
        for h in store.list_hosts():
            here = store.list_droplets(host=h.name)
            names = ", ".join(f"{d.id} ({self._spec(d.id).kind})" for d in here) or "-"
            self.echo(f"    {h.name}: {h.vcpus} vCPUs, {h.memory_bytes // GiB} GiB: {names}")

    def _spec(self, droplet_id: str) -> DropletSpec:
        return next(d for d in self.options.droplets if d.id == droplet_id)

    # ---- the evacuation ----------------------------------------------------------------------------------

    def evacuate(self) -> list[Migration]:
        """Plan the evacuation of hv-1 (unsafe short notice), show why, arm the one injected fault."""
        store = self._need_store()
        config = self.engine_config()
        now = utc_now()
        notice = timedelta(seconds=self.options.notice_s)
        request = planner.Request(
            start=now + notice + timedelta(seconds=FIRST_NOTICE_AFTER_S),
            notice=notice,
            limits=planner.Limits(
                config.schedule.max_parallel, config.schedule.max_per_target, config.schedule.max_per_source
            ),
            reason="demo: firmware update on hv-1",
            requested_by="demo",
            unsafe_short_notice=True,
        )
        self.say(
            f"evacuating {EVACUATE} with a {self.options.notice_s:.0f} s notice: UNSAFE, demo only "
            "(owners are promised 10 minutes; --unsafe-short-notice)"
        )
        leaving = [d.id for d in store.list_droplets(host=EVACUATE)]
        preview = planner.preview_evacuation(store, EVACUATE, config, explain=leaving)
        schedule, written = planner.evacuate(store, EVACUATE, request, config)
        self._print_plan(schedule, now)
        self._print_forecast(schedule)
        self._print_explain(preview)
        for m in written:
            self.migrations[m.droplet_id] = m.id
            if self._spec(m.droplet_id).fail_once:
                self.world.inject_fault(attempt_id(m.id, 1), Fault(FaultKind.SOURCE_ERROR, Phase.DISK, 3.0))
                self.echo(f"    (fault injected: {m.droplet_id}'s first attempt will fail mid-copy)")
        return written

    def _print_plan(self, schedule: planner.Schedule, now: datetime) -> None:
        self.echo("")
        self.echo("  PLAN  (placement: filters, then weighers; the planner spaces the windows)")
        self.echo(f"    {'DROPLET':9} {'TARGET':7} {'SCORE':>6}  {'NOTICE':>7} {'WINDOW':>7}  WHY")
        for mv in schedule.moves:
            c = mv.choice
            notice_in = (mv.notice_at - now).total_seconds()
            window_in = (mv.not_before - now).total_seconds()
            runners = ", ".join(f"{h} {s:.3f}" for h, s in c.runners_up) or "none"
            self.echo(
                f"    {mv.droplet.id:9} {mv.target:7} {c.score or 0:6.3f}  "
                f"+{notice_in:5.1f}s +{window_in:5.1f}s  "
                f"runners-up {runners}; rejected: {_rejections(c)}"
            )
        self.echo("")

    def _print_forecast(self, schedule: planner.Schedule) -> None:
        """What the simulator predicts for each move (each droplet's own workload, the hosts' NICs)."""
        config = self.engine_config()
        moves = [
            (mv.droplet.id, EVACUATE, mv.target, mv.droplet.memory_bytes, mv.droplet.disk_bytes)
            for mv in schedule.moves
        ]
        settings = SimSettings(
            default_host=SimHost(NIC_BPS, self.world.default_host_model),
            droplets={mv.droplet.id: self._spec(mv.droplet.id).workload for mv in schedule.moves},
        )
        fc = prediction.forecast_shared(
            moves,
            settings,
            config=config.controller,
            max_parallel=config.schedule.max_parallel,
            max_per_host=config.schedule.max_per_target,
        )
        self.echo("  PREDICTED  (the simulator, before anything moves: the same limits, the NICs shared)")
        self.echo(f"    {'DROPLET':9} {'DURATION':>9} {'DOWNTIME':>9} {'MOVED':>9}  THROTTLE, RISK")
        for did, _src, _dst, p in fc.predictions:
            self.predictions[did] = p
            down = "-" if p.downtime_ms is None else f"{p.downtime_ms:.0f} ms"
            throttle = f"{p.throttle_pct_s:,.0f} %·s" if p.throttle_pct_s else "none"
            self.echo(
                f"    {did:9} {p.duration_s:8.1f}s {down:>9} {p.bytes_transferred / GiB:7.1f}G  "
                f"{throttle}, risk {p.risk.value}"
            )
        self.echo(f"    window: {fc.window_s:.0f} s of migration time under the limits")
        self.echo("")

    def _print_explain(self, preview: Plan) -> None:
        """Every host's verdict for the droplet with the most rejections: why it goes where it goes."""
        if not preview.choices:
            return
        choice = max(preview.choices, key=lambda c: sum(c.rejected.values()))
        self.echo(f"  WHY {choice.droplet_id} goes to {choice.target}: every host's verdict")
        for v in choice.verdicts or ():
            if v.accepted:
                detail = ", ".join(f"{k} {val:.3f}" for k, val in v.components.items())
                self.echo(f"    {v.host:6} #{v.rank} score {v.score or 0:.3f} ({detail})")
            else:
                self.echo(f"    {v.host:6} rejected by {v.filter}: {v.reason}")
        self.echo("")

    # ---- running -----------------------------------------------------------------------------------------

    def done(self) -> bool:
        store = self._need_store()
        if any(not store.get_migration(mid).state.is_terminal for mid in self.migrations.values()):
            return False
        for did in self.migrations:
            agent = self.agents[did]
            if not agent.running:
                return False
            journal = agent.journal()
            if journal.get("active") is not None:
                return False
            wanted = {(h.phase, h.name) for h in agent.spec.hooks}
            ran = {(phase, hook) for _, phase, hook, _, _ in agent.hook_runs()}
            if not wanted <= ran:
                return False
        return True

    def run(self, on_tick: Callable[[Demo], None] | None = None) -> None:
        """Tick the engine (notices, executor, simulator) until every migration ended and every agent is
        done, or the timeout passes."""
        engine = self._need_engine()
        self._run_started = time.monotonic()
        deadline = time.monotonic() + self.options.timeout_s
        while not self.done():
            if time.monotonic() > deadline:
                raise DemoFailed(f"not finished after {self.options.timeout_s:.0f} s")
            started = time.monotonic()
            result = engine.tick()
            for m in result.notified:
                self._print_log(m.id)
            self._advance_sim()
            self._power_events()
            self._print_news()
            if on_tick is not None:
                on_tick(self)
            time.sleep(max(0.0, ENGINE_POLL_S - (time.monotonic() - started)))
        self._print_news()

    def _advance_sim(self) -> None:
        if self.executor is None:
            raise DemoFailed("setup() first")
        clock = SimClock(self.world)
        for _ in range(SIM_TICKS_PER_ENGINE_TICK):
            self.executor.tick()
            clock.sleep(SIM_TICK_S)

    def _power_events(self) -> None:
        """The prefer-offline droplet: its power-off command left a file, so the simulated VM is now off (its
        agent goes down with it); once migrated it is powered on on the target and its agent boots again."""
        store = self._need_store()
        for did, agent in self.agents.items():
            if did not in self.powered_off and agent.poweroff_path.exists():
                stamp = agent.poweroff_path.read_text().split(" ", 1)[0]
                try:
                    self.powered_off[did] = float(stamp)
                except ValueError:
                    self.powered_off[did] = time.time()
                self.world.droplets[did].state = DomainState.SHUT_OFF
                agent.stop()
                self.say(f"{did}: powered itself off (acknowledged offline); its guest agent is down with it")
            if did in self.powered_off and did not in self.booted:
                mid = self.migrations.get(did)
                sim = self.world.droplets[did]
                if (
                    mid is not None
                    and store.get_migration(mid).state is MigrationState.COMPLETED
                    and sim.state is DomainState.RUNNING
                ):
                    self.booted[did] = time.time()
                    self.say(f"{did}: powered on on {sim.host}; the guest agent starts again")
                    agent.start()

    def _print_news(self) -> None:
        for mid in self.migrations.values():
            self._print_log(mid)
        for did, agent in self.agents.items():
            runs = agent.hook_runs()
            seen = self._seen.hook_lines.get(did, 0)
            for _, phase, hook, _, says in runs[seen:]:
                self.say(f"  {did:8} | {phase}/{hook}: {says}")
            self._seen.hook_lines[did] = len(runs)

    def _print_log(self, migration_id: str) -> None:
        store = self._need_store()
        for e in store.migration_log(migration_id):
            if e.id in self._seen.log_ids:
                continue
            self._seen.log_ids.add(e.id)
            line = self._log_line(e)
            if line is not None:
                self.say(f"{e.droplet_id:8} {line}")

    def _log_line(self, e: LogEntry) -> str | None:
        if e.kind == LogKind.TRANSITION and e.to_state is not None:
            if e.to_state is MigrationState.PLANNED:
                return None  # the plan table said it
            return f"{e.to_state.value:>16}: {e.message}"
        if e.kind == LogKind.PROGRESS:
            key = (
                e.data.get("phase"),
                e.data.get("memory_throttle_pct"),
                e.data.get("disk_write_limit_bps"),
            )
            now = time.monotonic()
            last_key = self._seen.progress_key.get(e.migration_id)
            last_at = self._seen.progress_at.get(e.migration_id, 0.0)
            if key == last_key and now - last_at < PROGRESS_EVERY_S:
                return None
            self._seen.progress_key[e.migration_id] = key
            self._seen.progress_at[e.migration_id] = now
            return f"{'':>16}  {e.message}"
        if e.kind in ("wait", "alert"):
            return f"{e.kind:>16}: {e.message}"
        return None

    # ---- checks and results ------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Everything that must hold at the end; an empty list means consistent."""
        store = self._need_store()
        problems: list[str] = []
        problems += self._check_placement(store)
        problems += self._check_metadata_server(store)
        problems += self._check_hooks()
        return problems

    def _check_placement(self, store: Store) -> list[str]:
        problems = []
        for d in store.list_droplets():
            sim = self.world.droplets[d.id]
            holding = self.world.hosts_holding(d.id)
            if sim.host != d.host or holding != [d.host]:
                problems.append(
                    f"{d.id}: store says {d.host}, simulator runs it on {sim.host}, images on {holding}"
                )
            if sim.state is not DomainState.RUNNING:
                problems.append(f"{d.id}: {sim.state.value} in the simulator, expected running")
            if sim.throttle_pct or sim.disk_limit_bps is not None:
                problems.append(f"{d.id}: a throttle or disk limit was left on")
            if d.host == EVACUATE:
                problems.append(f"{d.id}: still on {EVACUATE}")
        for did, mid in self.migrations.items():
            m = store.get_migration(mid)
            if m.state is not MigrationState.COMPLETED:
                problems.append(f"{did}: migration {mid} ended {m.state.value}")
            elif store.get_droplet(did).host != m.target_host:
                problems.append(f"{did}: completed to {m.target_host} but the store has it elsewhere")
        return problems

    def _check_metadata_server(self, store: Store) -> list[str]:
        if self.server is None:
            return ["no metadata server"]
        problems = []
        try:
            with self.server.client() as client:
                listed = {str(doc.get("id")): doc for doc in client.list_droplets()}
        except HostEngineError as e:
            return [f"metadata server: {e}"]
        for d in store.list_droplets():
            doc = listed.get(d.id)
            if doc is None:
                problems.append(f"{d.id}: not registered on the metadata server")
                continue
            if sorted(doc.get("addresses") or []) != sorted(d.addresses):
                problems.append(f"{d.id}: the metadata server has addresses {doc.get('addresses')}")
            if doc.get("event"):
                problems.append(f"{d.id}: an event is left on the metadata server: {doc.get('event')}")
        return problems

    def _check_hooks(self) -> list[str]:
        """Each hook of a moved droplet ran exactly once, for the engine's event, and its agent's journal says
        so; a bystander's agent saw nothing at all."""
        store = self._need_store()
        problems = []
        for did, agent in self.agents.items():
            mid = self.migrations.get(did)
            if mid is None:
                problems += check_bystander(did, agent)
            else:
                problems += check_moved(did, agent, store.get_migration(mid))
        return problems

    def rows(self) -> list[Row]:
        store = self._need_store()
        out = []
        for did, mid in self.migrations.items():
            m = store.get_migration(mid)
            log_entries = store.migration_log(mid)
            starts = [
                e.at
                for e in log_entries
                if e.kind == LogKind.TRANSITION
                and e.to_state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING)
            ]
            lead = (starts[0] - m.notified_at).total_seconds() if starts and m.notified_at else None
            last = m.stats.get(LAST_ATTEMPT_KEY) or {}
            max_throttle = max(
                (
                    int(e.data.get("memory_throttle_pct") or 0)
                    for e in log_entries
                    if e.kind == LogKind.PROGRESS
                ),
                default=0,
            )
            limit_s = float(last.get("disk_limit_s") or 0.0)
            parts = []
            if max_throttle:
                parts.append(f"cpu up to {max_throttle} %")
            if limit_s:
                parts.append(f"disk limit {limit_s:.1f} s")
            attempts = f"{m.attempt} attempts" if m.attempt > 1 else "1 attempt"
            how = "offline" if last.get("offline") else "live"
            spec = self._spec(did)
            downtime_ms = last.get("downtime_ms")
            if how == "offline" and did in self.powered_off and did in self.booted:
                downtime_ms = (self.booted[did] - self.powered_off[did]) * 1000  # off, copied, on again
            out.append(
                Row(
                    droplet=did,
                    workload=spec.kind,
                    size=f"{spec.vcpus}c/{spec.memory_gib}G/{spec.disk_gib}G",
                    lead_s=lead,
                    downtime_ms=downtime_ms,
                    offline=how == "offline",
                    throttle=", ".join(parts) or "-",
                    bytes_moved=int(last.get("bytes_transferred") or 0),
                    result=f"{m.state.value} ({how}, {attempts})",
                    new_host=store.get_droplet(did).host,
                    duration_s=None if last.get("duration_s") is None else float(last["duration_s"]),
                    predicted=self.predictions.get(did),
                )
            )
        return out

    def print_table(self) -> None:
        rows = self.rows()
        headers = ["DROPLET", "WORKLOAD", "SIZE", "NOTICE LEAD", "DOWNTIME", "THROTTLE", "MOVED", "RESULT",
                   "NEW HOST", "PREDICTED vs ACTUAL"]  # fmt: skip
        cells = [
            [
                r.droplet,
                r.workload,
                r.size,
                "-" if r.lead_s is None else f"{r.lead_s:.1f} s",
                _downtime(r),
                r.throttle,
                f"{r.bytes_moved / GiB:.1f} GiB",
                r.result,
                r.new_host,
                _versus(r),
            ]
            for r in rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        self.echo("")
        self.echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for c in cells:
            self.echo("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        self.echo("")
        wall_s = time.monotonic() - (self._run_started or time.monotonic())
        self.echo(
            "  notice lead: from the notice to the start of the copy; downtime: the pause at switchover "
            "(offline: power-off to power-on)"
        )
        self.echo(
            f"  the simulated hypervisors ran {self.world.time_s:.0f} s of migration time in {wall_s:.0f} s"
        )


def _versus(r: Row) -> str:
    """The sim's prediction at planning against what happened: duration, downtime."""
    p = r.predicted
    if p is None:
        return "-"
    down = "-" if p.downtime_ms is None else f"{p.downtime_ms:.0f}"
    actual_down = "-" if r.downtime_ms is None else f"{r.downtime_ms:.0f}"
    actual_s = "-" if r.duration_s is None else f"{r.duration_s:.1f}"
    return f"{p.duration_s:.1f} vs {actual_s} s, {down} vs {actual_down} ms"


def check_bystander(did: str, agent: GuestAgentProcess) -> list[str]:
    problems = []
    runs = agent.hook_runs()
    if runs:
        problems.append(f"{did}: hooks ran though it did not move: {[r[1:3] for r in runs]}")
    seen = sorted(agent.journal().get("events", {}))
    if seen:
        problems.append(f"{did}: its agent saw events {seen} though it did not move")
    return problems


def check_moved(did: str, agent: GuestAgentProcess, m: Migration) -> list[str]:
    problems = []
    runs = agent.hook_runs()
    wanted = [(h.phase, h.name) for h in agent.spec.hooks]
    for phase, name in wanted:
        n = sum(1 for r in runs if (r[1], r[2]) == (phase, name))
        if n != 1:
            problems.append(f"{did}: {phase}/{name} ran {n} times, expected exactly once")
    unexpected = [r[1:3] for r in runs if (r[1], r[2]) not in wanted]
    if unexpected:
        problems.append(f"{did}: unexpected hook runs {unexpected}")
    live_ids = {r[3] for r in runs if r[1] != "after_migration"}
    if live_ids and live_ids != {m.event_id}:
        problems.append(f"{did}: hooks ran for events {sorted(live_ids)}, the engine sent {m.event_id}")
    journal = agent.journal()
    if journal.get("active") is not None:
        problems.append(f"{did}: the agent still has an active event {journal.get('active')}")
    ev = journal.get("events", {}).get(m.event_id)
    if ev is None:
        return [*problems, f"{did}: the agent's journal has no event {m.event_id}"]
    if ev.get("status") != "done":
        problems.append(f"{did}: the agent's journal says {ev.get('status')}, expected done")
    for phase, name in wanted:
        rec = ev.get("hooks", {}).get(f"{phase}/{name}") or {}
        if rec.get("outcome") != "ok":
            problems.append(f"{did}: journal has {phase}/{name} {rec.get('outcome')}, expected ok")
    return problems


def _downtime(r: Row) -> str:
    if r.downtime_ms is None:
        return "-"
    if r.offline:
        return f"{r.downtime_ms / 1000:.1f} s off"
    return f"{r.downtime_ms:.0f} ms"


def _rejections(c: Choice) -> str:
    return c.summary_of_rejections()


# ---- entry point -----------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does: through ``finally``, so every child is stopped."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _engine_log(demo: Demo) -> Iterator[None]:
    """The engine's own log lines go to engine.log in the working directory, not between the demo's lines."""
    root = logging.getLogger()
    handler = _DeferredFileHandler(demo)
    handler.setFormatter(TextFormatter())  # the daemons' text format, secrets redacted
    added = not root.handlers
    if added:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        if added:
            root.removeHandler(handler)
        handler.close()


class _DeferredFileHandler(logging.Handler):
    """Writes to ``<workdir>/engine.log`` once the demo has a working directory (drops lines before)."""

    def __init__(self, demo: Demo) -> None:
        super().__init__()
        self.demo = demo
        self._file: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if self.demo.workdir is None or not self.demo.workdir.exists():
                return
            self._file = (self.demo.workdir / "engine.log").open("a")
        self._file.write(self.format(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> int:
    """The whole demo. 0 when everything ended consistent, 1 otherwise; 130 after Ctrl-C or SIGTERM."""
    started = time.monotonic()
    with _sigterm_as_exception(), Demo(options, echo) as demo, _engine_log(demo):
        try:
            demo.setup()
            demo.evacuate()
            demo.run()
            demo.print_table()
            problems = demo.verify()
        except (KeyboardInterrupt, _Terminated):
            echo("interrupted: stopping every process the demo started")
            return 130
        except HostEngineError as e:
            echo(f"host-engine demo: error: {e}")
            return 1
        elapsed = time.monotonic() - started
        if problems:
            echo(f"NOT consistent after {elapsed:.1f} s:")
            for p in problems:
                echo(f"  - {p}")
            return 1
        echo(
            f"consistent after {elapsed:.1f} s: every droplet on exactly one host (store = simulator), "
            "no event left on the metadata server, every hook ran exactly once"
        )
        echo("on real hypervisors it is configuration, not code (docs/host-engine.md):")
        echo(
            "  host-engine host add HOST ... --uri qemu+ssh://HOST/system --metadata-url https://HOST.mgmt:8775"
        )
        echo("  host-engine evacuate HOST --start +15m && host-engine run --driver libvirt")
        if options.keep and demo.workdir is not None:
            echo(f"files kept in {demo.workdir}")
        return 0


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the working directory (store, logs, journals).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--timeout", "timeout_s", type=float, default=DEFAULT_TIMEOUT_S, show_default=True)
def demo(keep: bool, workdir: Path | None, timeout_s: float) -> None:
    """A datacenter on one machine: evacuate a host with notice, agents, the sim hypervisor (about 30 s)."""
    options = DemoOptions(workdir=workdir, keep=keep or workdir is not None, timeout_s=timeout_s)
    code = run_demo(options, echo=click.echo)
    sys.exit(code)
