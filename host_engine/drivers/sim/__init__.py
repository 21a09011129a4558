"""The simulated hypervisor: hosts, NICs, droplets and their workloads, in simulated time.

It is a real driver (``HypervisorDriver`` / ``MigrationDriver``) over a model datacenter, so it powers the
tests, the demo, the benchmarks and capacity planning. One module per concern:

- ``workloads``: how droplets dirty disk and memory (``web``, ``database``, ``diabolical``, ...);
- ``faults``: link drops and flaps, target crashes, source errors, injected at any phase;
- ``entities``: what the world is made of: hosts and their ``HostModel``, droplets with per-block/per-page
  versions, images, migrations in flight;
- ``passes``: how a copy walks blocks and pages (mirror passes, memory rounds) and a workload dirties them;
- ``model``: the world (``SimWorld``): the copy and QEMU's switchover in simulated time (``advance``),
  deterministic from a seed;
- ``driver``: ``SimHypervisor`` / ``SimMigrationDriver`` / ``SimClock`` over any world;
- ``codec``: compact plain-value forms (store rows, whole-world JSON);
- ``stored``: ``StoredWorld``, the world as rows of the engine's store, shared by every process
  (``host-engine run`` workers, ``migrate --now``), written a few changed rows at a time.
"""

from host_engine.drivers.sim.codec import (
    world_from_dict,
    world_from_json,
    world_to_dict,
    world_to_json,
)
from host_engine.drivers.sim.driver import SimClock, SimHypervisor, SimMigrationDriver
from host_engine.drivers.sim.faults import FAULT_PHASES, Fault, FaultKind
from host_engine.drivers.sim.model import (
    DEFAULT_DISK_BLOCK_BYTES,
    DEFAULT_MEMORY_PAGE_BYTES,
    DEFAULT_SETUP_S,
    DEFAULT_STEP_S,
    QEMU_DEFAULT_MAX_DOWNTIME_MS,
    SWITCHOVER_OVERHEAD_MS,
    Droplet,
    Host,
    HostModel,
    Image,
    Migration,
    SimWorld,
)
from host_engine.drivers.sim.rows import WriteCounts
from host_engine.drivers.sim.stored import DEFAULT_WORKLOAD, StoredWorld, load_world
from host_engine.drivers.sim.workloads import (
    DEFAULT_NIC_BPS,
    WORKLOADS,
    GiB,
    MiB,
    Pattern,
    Workload,
    cache,
    database,
    diabolical,
    idle,
    log_writer,
    web,
)

__all__ = [
    "DEFAULT_DISK_BLOCK_BYTES",
    "DEFAULT_MEMORY_PAGE_BYTES",
    "DEFAULT_NIC_BPS",
    "DEFAULT_SETUP_S",
    "DEFAULT_STEP_S",
    "DEFAULT_WORKLOAD",
    "FAULT_PHASES",
    "QEMU_DEFAULT_MAX_DOWNTIME_MS",
    "SWITCHOVER_OVERHEAD_MS",
    "WORKLOADS",
    "Droplet",
    "Fault",
    "FaultKind",
    "GiB",
    "Host",
    "HostModel",
    "Image",
    "MiB",
    "Migration",
    "Pattern",
    "SimClock",
    "SimHypervisor",
    "SimMigrationDriver",
    "SimWorld",
    "StoredWorld",
    "Workload",
    "WriteCounts",
    "cache",
    "database",
    "diabolical",
    "idle",
    "load_world",
    "log_writer",
    "web",
    "world_from_dict",
    "world_from_json",
    "world_to_dict",
    "world_to_json",
]
