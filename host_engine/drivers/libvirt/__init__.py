"""The libvirt driver: inventory from, and live migration between, real hypervisors (docs/libvirt.md).

The only package of the engine that imports ``libvirt`` / ``libvirt_qemu`` (in :mod:`.connection`, and only
when a function is called), so the rest of the engine (and its tests) runs without libvirt-python installed.

One module per concern:

- ``connection``: the lazy imports, opening a connection, liveness, libvirt errors as ``DriverError``;
- ``disks``: a domain's disks (paths, sizes, aliases, ``<iotune>``) from its XML;
- ``inventory`` / ``network``: what ``host-engine inventory sync`` reads (domains; interfaces, filters,
  addresses);
- ``events``: libvirt's event loop and the domain events a migration listens to;
- ``qmp``: QEMU's disk write limit, CPU throttle and downtime limit;
- ``storage``: target volumes and pools, deleting volumes, removing a leftover domain;
- ``rates``: rate averaging and the memory-left bound (pure);
- ``job`` → ``reporting`` → ``migration``: one attempt's state and migration thread, its ``progress()``,
  and :class:`LibvirtMigration` (the ``MigrationDriver``);
- ``recovery``: ``recover`` after a worker died; ``leftovers``: cleaning unreachable targets later;
- ``hypervisor``: :class:`LibvirtHypervisor` (the ``HypervisorDriver``).

How a migration runs (one :class:`LibvirtMigration` per attempt, driven through ``MigrationDriver``):

``prepare_target``
    reads the source domain's disks, refuses if the target already uses those paths for another domain,
    removes what an earlier failed attempt left on the target (a domain that never became the live copy,
    its disks), then creates each disk on the target **through libvirt's storage API** (a ``dir`` pool over
    the disk's directory, a volume of the source's format and capacity; why: :mod:`.storage`).
``start``
    calls ``migrateToURI3`` in a thread, peer-to-peer (the source libvirtd talks to the target itself, so
    the engine's connection is not in the data path), with ``LIVE | PEER2PEER | NON_SHARED_DISK |
    PERSIST_DEST | UNDEFINE_SOURCE | AUTO_CONVERGE``: QEMU mirrors each disk to an NBD export on the target
    (with a dirty bitmap), then pre-copies memory while the mirror keeps the disks in sync. The bandwidth
    cap (``options["bandwidth_mibps"]``) is a migration parameter, so it holds from the first byte.
``progress``
    is built from ``jobStats()`` (plus the guest's disk write rate, from ``blockStats`` deltas) and the
    domain events (switchover, job completed with its downtime).
``set_disk_write_limit``
    QEMU's ``block_set_io_throttle`` sent as a QMP command through ``libvirt_qemu.qemuMonitorCommand`` to the
    *running source*. libvirt's own ``setBlockIoTune`` cannot be used: on libvirt 9.0 it waits for the
    domain's job lock, which the migration job holds, and fails after 30 s. The QMP limit lives only in the
    source QEMU: libvirt does not know it (the domain gets tainted "custom-monitor"), so it is not in the XML
    sent to the target and the target starts with only the disk's own ``<iotune>`` limits. The driver lifts
    it (back to the disk's own limits) on abort and failure, so the source is left as it was.
``set_memory_throttle``
    QEMU's auto-converge CPU throttle, steered: the capability is enabled at start but disarmed
    (``max-cpu-throttle`` 1 %, trigger threshold 100 %); a request for N % sets QMP
    ``migrate-set-parameters`` ``cpu-throttle-initial`` / ``max-cpu-throttle`` to N and the trigger threshold
    to 1 %, so QEMU throttles at exactly N % from its next dirty-sync on. QEMU has no other way to throttle
    vCPUs during a migration, and the capability cannot be switched on once a migration runs; the
    controller, not QEMU, picks the level. ``options["auto_converge"]="qemu"`` leaves QEMU's own policy
    instead (for comparisons), ``"off"`` disables it.
``switchover``
    pauses the source (``suspend``, what ``virsh migrate --timeout-suspend`` does): QEMU then moves the
    remainder and libvirt resumes the guest on the target. QEMU also switches over by itself when the
    remainder fits ``migrateSetMaxDowntime``.
``abort`` / ``finalize(False)``
    ``abortJob``, wait for the migration thread, lift the throttle, check the source runs (resume it if the
    migration left it paused), then remove the target's domain and the volumes this attempt created. When
    the target cannot be reached the source is still checked and :class:`DriverError` says the target is at
    fault; the next attempt's ``prepare_target`` (or :meth:`LibvirtHypervisor.recover`) removes the leftovers.
``finalize(True)``
    checks the target holds the domain (defined; running unless asked otherwise), that the source holds
    none, and deletes the source's copies of the migrated disks (``options["keep_source_disks"]="1"`` keeps
    them).

Offline migration (``spec.offline``, the domain is shut off). libvirt refuses ``VIR_MIGRATE_OFFLINE`` with
``NON_SHARED_DISK``. Two ways stay inside libvirt; this driver starts the domain paused
(``VIR_DOMAIN_START_PAUSED``: the guest never executes an instruction), live-migrates it with ``PAUSED``
and then, on the target, resumes it (a fresh boot) when ``spec.power_on_after`` or destroys it (it stays
defined, shut off). Why not storage-volume streams (``virStorageVol.download`` → ``upload``): the
streams carry every byte through the engine's own connection (source → engine → target, two hops over
whatever link the engine has), and the domain must then be defined by hand; the paused migration copies
host to host over the migration network with the same code path, progress, bandwidth cap and abort as a
live one. Measured on the build machine (docs/libvirt.md), where the engine sits on the hosts' own
machine so its two hops cost nothing: streams 0.19 s / 2.6 s for 32 / 256 MiB of data, the paused
migration 9.1 s / 11.0 s, almost all of it the fixed cost of starting QEMU on both hosts (2.3-5.4 s once the
hosts are warm). The fixed cost is paid once per droplet; the engine's link would be paid per byte, for
every offline migration of the fleet at once.
"""

from host_engine.drivers.libvirt.events import EventLoop
from host_engine.drivers.libvirt.hypervisor import LibvirtHypervisor
from host_engine.drivers.libvirt.inventory import DiskInfo, DomainInfo, list_domains
from host_engine.drivers.libvirt.migration import LibvirtMigration
from host_engine.drivers.libvirt.rates import RATE_WINDOW_S
from host_engine.states import PowerState

# The name tests and benchmarks use to start libvirt's event loop before their first connection.
_EventLoop = EventLoop

__all__ = [
    "RATE_WINDOW_S",
    "DiskInfo",
    "DomainInfo",
    "EventLoop",
    "LibvirtHypervisor",
    "LibvirtMigration",
    "PowerState",
    "list_domains",
]
