"""Engine-loop steps that run the executor inside ``host-engine run``: on the simulated hypervisor (its
world kept in the store) or on libvirt (``executor_step`` picks by the configured driver)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from host_engine.attempt import RealClock
from host_engine.config import EngineConfig
from host_engine.drivers.base import (
    DomainState,
)
from host_engine.drivers.sim import (
    WORKLOADS,
    WORLD_KEY,
    SimClock,
    SimHypervisor,
    SimWorld,
    WorldConflict,
    load_world,
    save_world,
)
from host_engine.errors import InvalidInput
from host_engine.executor import (
    Executor,
    ExecutorConfig,
    ExecutorHooks,
    Finished,
    TargetChooser,
    placement_chooser,
)
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.store import Store

log = logging.getLogger(__name__)


# --- The simulated hypervisor inside ``host-engine run`` ----------------------------------------------------

# The sim for a fleet read from the store: 16 MiB blocks keep an 80 GiB droplet at 5,120 versions.
SIM_DEFAULT_WORKLOAD = "web"


def sim_world_from_store(store: Store, *, seed: int = 0, workload: str = SIM_DEFAULT_WORKLOAD) -> SimWorld:
    """A simulated datacenter matching the store's inventory: every host, every droplet on its host, each
    droplet running the ``workload`` model (``shut_off`` droplets powered off)."""
    world = SimWorld(seed)
    for h in store.list_hosts():
        world.add_host(h.name)
    factory = WORKLOADS[workload]
    for d in store.list_droplets():
        world.add_droplet(
            d.id,
            d.host,
            memory_bytes=d.memory_bytes,
            disk_bytes=d.disk_bytes,
            vcpus=d.vcpus,
            workload=factory(),
            state=DomainState.SHUT_OFF
            if d.power_state == DomainState.SHUT_OFF.value
            else DomainState.RUNNING,
        )
    return world


class SimTickStep:
    """The executor on the simulated hypervisor, as a step of the engine loop (``Engine(steps=[...])``).

    Each ``tick`` advances the world by the wall time since the last one (times ``speed``), in controller
    ticks, then saves it to the store, where restarts, other processes and ``host-engine`` commands find it
    (DESIGN.md §9). Build it with ``open``, which loads the world (or creates one from the inventory).
    """

    def __init__(
        self,
        store: Store,
        world: SimWorld,
        executor: Executor,
        *,
        speed: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        key: str = WORLD_KEY,
    ) -> None:
        self.store = store
        self.world = world
        self.executor = executor
        self.speed = speed
        self.monotonic = monotonic
        self.key = key
        self._last = monotonic()

    @classmethod
    def open(
        cls,
        store: Store,
        config: ExecutorConfig,
        *,
        speed: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        hooks: ExecutorHooks | None = None,
        choose_target: TargetChooser | None = None,
        metrics: ExecutorMetrics | None = None,
        key: str = WORLD_KEY,
        seed: int = 0,
    ) -> SimTickStep:
        world = load_world(store, key)
        if world is None:
            world = sim_world_from_store(store, seed=seed)
            save_world(store, world, key)
            log.info(
                "created the simulated datacenter %r from the inventory (%s droplets)",
                key,
                len(world.droplets),
            )
        clock = SimClock(world)
        executor = Executor(
            store,
            SimHypervisor(world),
            config,
            clock,
            hooks=hooks,
            choose_target=choose_target,
            metrics=metrics,
        )
        return cls(store, world, executor, speed=speed, monotonic=monotonic, key=key)

    def tick(self) -> list[Finished]:
        now = self.monotonic()
        due_s = (now - self._last) * self.speed
        self._last = now
        done = self.executor.tick()
        tick_s = self.executor.config.tick_s
        while due_s > 1e-9:
            step = min(tick_s, due_s)
            self.world.advance(step)
            due_s -= step
            done += self.executor.tick()
        try:
            save_world(self.store, self.world, self.key)
        except WorldConflict:
            # Another process runs this world too: ours would overwrite its work. Stop driving it here.
            log.error("simulated datacenter %r changed under this process; stopping its executor", self.key)
            raise
        return done

    def shutdown(self) -> list[Finished]:
        """Stop driving: abort this worker's attempts (sources untouched, each handed to the retry path) and
        save the world, so nothing waits for the claim lease to expire."""
        done = self.executor.shutdown()
        save_world(self.store, self.world, self.key)
        return done


def executor_step(
    store: Store,
    config: EngineConfig,
    *,
    driver: str,
    hooks: ExecutorHooks | None = None,
    metrics: ExecutorMetrics | None = None,
    sim_speed: float = 1.0,
    only: Sequence[str] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> SimTickStep | Executor:
    """What ``host-engine run`` adds to the engine loop (``Engine(..., steps=[executor_step(...)])``).

    ``driver`` is ``"sim"`` (the simulated datacenter kept in the store, following wall time x ``sim_speed``)
    or ``"libvirt"`` (each host's ``hypervisor_uri``; ``config.libvirt``'s bandwidth cap, TLS and peer URIs).
    Both run under ``config.controller`` (the downtime budget). Either way retries pick another target
    through the placement filters and weighers, and the controller ticks once per engine poll. ``only``
    restricts the executor to those migration ids; ``monotonic`` is the wall clock the sim follows (tests
    inject one).
    """
    exec_config = ExecutorConfig(
        worker=config.worker_id,
        tick_s=config.engine.poll_interval_s,
        controller=config.controller,  # [controller]: the downtime budget, for either driver
        only=None if only is None else frozenset(only),
    )
    chooser = placement_chooser(store, config.placement)
    if driver == "sim":
        return SimTickStep.open(
            store,
            exec_config,
            speed=sim_speed,
            monotonic=monotonic,
            hooks=hooks,
            choose_target=chooser,
            metrics=metrics,
        )
    if driver == "libvirt":
        from host_engine.drivers.libvirt import LibvirtHypervisor

        uris = {h.name: h.hypervisor_uri for h in store.list_hosts()}
        lv = config.libvirt
        for name in sorted(set(lv.peer_uris) - set(uris)):
            log.warning("[libvirt] peer_uris.%s: no such host in the store; ignored", name)
        return Executor(
            store,
            LibvirtHypervisor(uris, peer_uris=lv.peer_uris, options=lv.options()),
            exec_config,
            RealClock(),
            hooks=hooks,
            choose_target=chooser,
            metrics=metrics,
        )
    raise InvalidInput(f"unknown hypervisor driver {driver!r} (sim, libvirt)", field="driver")
