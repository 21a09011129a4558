"""The demo's datacenter and its evacuation: hosts, droplets with their workloads and hooks, the engine's
settings for a demo-sized run (seconds of notice, a simulated clock about twenty times the wall clock)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from guest_agent.config import Phase
from host_engine.config import EngineConfig, EngineLoopConfig, PlacementConfig, ScheduleConfig
from host_engine.drivers.sim import GiB, MiB, Workload, database, idle, log_writer, web
from host_engine.drivers.sim.settings import SimHost, SimSettings
from host_engine.errors import HostEngineError
from host_engine.executor import ExecutorConfig
from host_engine.retry import RetryConfig

DATACENTER = "demo1"
COMPAT_GROUP = "epyc-7003"
EVACUATE = "hv-1"
WORKER = "demo"
# 25 GbE: the source NIC is what an evacuation queues on; at 10 GbE the demo would take twice as long.
NIC_BPS = 3_125_000_000
# The notice each guest gets: far below the 10 minutes owners are promised, hence --unsafe-short-notice.
# Long enough for every agent's drain hooks and for batch-1 to shut itself down before its window.
NOTICE_S = 6.0
FIRST_NOTICE_AFTER_S = 1.0
# The engine ticks every 50 ms; the simulated hypervisors follow the wall clock 20 times faster
# (``host-engine run --sim-speed 20``), the controller ticking every half simulated second.
ENGINE_POLL_S = 0.05
SIM_SPEEDUP = 20.0
SIM_TICK_S = 0.5
# The planner spaces migrations by (disk + memory) / bandwidth in wall time: the share of the NIC one of three
# concurrent migrations gets, times the speed-up.
PLANNER_BANDWIDTH_BPS = int(NIC_BPS / 3 * SIM_SPEEDUP)
MAX_PER_SOURCE = 3
RETRY_BACKOFF_S = 2.0
# The engine re-sends its view to the metadata server this often (a minute in production): a server that was
# down when a migration completed gets its flag cleared within a demo-sized moment.
RECONCILE_EVERY = timedelta(seconds=2)
DEFAULT_TIMEOUT_S = 55.0
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

    phase: Phase
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

    @property
    def size(self) -> str:
        return f"{self.vcpus}c/{self.memory_gib}G/{self.disk_gib}G"


HOSTS = (
    HostSpec("hv-1", 64, 256, 2048),
    HostSpec("hv-2", 64, 256, 2048),
    HostSpec("hv-3", 64, 256, 2048),
    HostSpec("hv-4", 32, 48, 1024),
)


def _lb(droplet: str) -> tuple[HookSay, ...]:
    return (
        HookSay(Phase.ON_NOTICE, "lb-drain", f"draining {droplet} from the load balancer"),
        HookSay(Phase.AFTER_MIGRATION, "lb-ready", f"putting {droplet} back into the load balancer"),
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
            HookSay(Phase.ON_NOTICE, "checkpoint", "CHECKPOINT; pausing the nightly vacuum"),
            HookSay(Phase.AFTER_MIGRATION, "resume-vacuum", "resuming the nightly vacuum"),
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
            HookSay(Phase.ON_NOTICE, "prefer-replica", "telling clients to read from the replica"),
            HookSay(Phase.AFTER_MIGRATION, "take-reads", "taking reads again"),
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
            HookSay(Phase.ON_NOTICE, "flush", "flushing log buffers to disk"),
            HookSay(Phase.AFTER_MIGRATION, "ship", "resuming log shipping"),
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
            HookSay(Phase.ON_NOTICE, "record-vms", "recording running nested VMs: build-17 build-18"),
            HookSay(Phase.AFTER_MIGRATION, "restart-vms", "restarting nested VMs build-17 build-18"),
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
            HookSay(Phase.ON_NOTICE, "checkpoint", "checkpointing the batch job"),
            HookSay(Phase.BEFORE_OFFLINE, "stop-worker", "stopping batch-worker.service"),
            HookSay(Phase.AFTER_MIGRATION, "resume", "resuming the batch job from its checkpoint"),
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

    def spec(self, droplet_id: str) -> DropletSpec:
        return next(d for d in self.droplets if d.id == droplet_id)


class DemoFailed(HostEngineError):
    """The demo could not run, or did not end consistent."""


def sim_settings(options: DemoOptions) -> SimSettings:
    """``[sim]`` for the demo: every host on a 25 GbE link, each droplet with its own workload."""
    return SimSettings(default_host=SimHost(NIC_BPS), droplets={d.id: d.workload for d in options.droplets})


def engine_config(options: DemoOptions, db: str) -> EngineConfig:
    """The configuration ``host-engine run`` would be given for this datacenter."""
    return EngineConfig(
        db=db,
        placement=PlacementConfig(anti_affinity=True, runners_up=2),
        schedule=ScheduleConfig(
            notice=timedelta(seconds=options.notice_s),
            max_parallel=3,
            max_per_target=2,
            max_per_source=MAX_PER_SOURCE,
            bandwidth_bps=PLANNER_BANDWIDTH_BPS,
            slot_overhead=timedelta(seconds=1),
        ),
        engine=EngineLoopConfig(
            poll_interval_s=ENGINE_POLL_S,
            worker=WORKER,
            notifier_timeout_s=2.0,
            notifier_attempts=3,
            # As many copies at once as the planner lets leave one host: a slow machine stretches the
            # simulated clock, and more than three copies sharing hv-1's NIC would stall the database.
            max_concurrent=MAX_PER_SOURCE,
        ),
        sim=sim_settings(options),
        source="demo",
    )


def executor_config(config: EngineConfig) -> ExecutorConfig:
    """``run``'s executor with the controller ticking every half simulated second and retries seconds (not
    minutes) apart, so the injected fault's retry happens within the demo."""
    return replace(
        ExecutorConfig.for_engine(config, tick_s=SIM_TICK_S),
        retry=RetryConfig(backoff_s=RETRY_BACKOFF_S, jitter=0.0),
    )
