"""Engine-loop steps that run the executor inside ``host-engine run`` (and ``migrate --now``).

The driver follows from the host (``host_engine.inventory.driver_kind``): a host registered with a libvirt
URI is only ever driven by libvirt, a host declared ``sim://NAME`` only by the simulator, and a host with no
URI (tests, first steps) by the simulator. ``plan_drivers`` checks a requested driver against that and
refuses, in one line, a run that would have to drive a host of the other kind; ``executor_step`` builds the
step: the executor on the simulated hypervisor (``SimTickStep``, its world rows in the store), on libvirt,
or on both at once (``RoutingHypervisor``, each migration to its hosts' driver).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from host_engine.attempt import RealClock
from host_engine.config import EngineConfig
from host_engine.drivers.base import (
    DomainState,
    DriverError,
    HypervisorDriver,
    MigrationDriver,
    MigrationSpec,
    Progress,
    Recovered,
)
from host_engine.drivers.sim import SimClock, SimHypervisor, StoredWorld
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
from host_engine.inventory import DriverKind, driver_kind
from host_engine.models import Host
from host_engine.store import Store

log = logging.getLogger(__name__)

# A simulated tick stops simulating after this much wall time (its store work apart), and the world falls
# behind ``--sim-speed`` (logged) rather than the next tick growing without bound: with the sim slower than
# asked, each tick had more to catch up than the last (ticks of 96 s in bench/fleet.py).
MAX_SIM_TICK_S = 1.0

#: ``--driver`` / ``[engine] driver``: "auto" drives each host by its URI; "sim"/"libvirt" insist on one.
AUTO = "auto"


# --- Which driver drives which host ------------------------------------------------------------------------


@dataclass(frozen=True)
class DriverPlan:
    """The hosts each driver drives in this process."""

    sim: tuple[str, ...] = ()
    libvirt: tuple[str, ...] = ()
    undeclared: tuple[str, ...] = ()  # among ``sim``/``libvirt``: hosts registered without a URI

    def kind_of(self, host: str) -> DriverKind | None:
        if host in self.sim:
            return DriverKind.SIM
        if host in self.libvirt:
            return DriverKind.LIBVIRT
        return None

    def describe(self) -> str:
        """``driver libvirt drives hv1, hv2; sim drives lab1`` (what ``run`` logs at start)."""
        parts = []
        for kind, hosts in ((DriverKind.LIBVIRT, self.libvirt), (DriverKind.SIM, self.sim)):
            if hosts:
                names = ", ".join(f"{h} (no URI)" if h in self.undeclared else h for h in hosts)
                parts.append(f"{kind.value} drives {names}")
        return "driver " + ("; ".join(parts) if parts else "sim drives no host yet")


def plan_drivers(hosts: Sequence[Host], requested: str = AUTO) -> DriverPlan:
    """Each host's driver, from its URI. ``requested`` ("sim"/"libvirt") must agree with every host that
    declares one (else ``InvalidInput``, one line); hosts without a URI take it ("auto": the simulator)."""
    if requested not in (AUTO, DriverKind.SIM.value, DriverKind.LIBVIRT.value):
        raise InvalidInput(f"unknown hypervisor driver {requested!r} (auto, sim, libvirt)", field="driver")
    sim: list[str] = []
    libvirt: list[str] = []
    undeclared: list[str] = []
    wrong: list[Host] = []
    for h in sorted(hosts, key=lambda h: h.name):
        kind = driver_kind(h.hypervisor_uri)
        if kind is None:
            undeclared.append(h.name)
            kind = DriverKind.SIM if requested == AUTO else DriverKind(requested)
        elif requested not in (AUTO, kind.value):
            wrong.append(h)
            continue
        (sim if kind is DriverKind.SIM else libvirt).append(h.name)
    if wrong:
        other = DriverKind.LIBVIRT if requested == DriverKind.SIM.value else DriverKind.SIM
        names = ", ".join(f"{h.name} ({h.hypervisor_uri})" for h in wrong[:3])
        raise InvalidInput(
            f"--driver {requested} cannot drive {names}{', ...' if len(wrong) > 3 else ''}: a host with a "
            f"{other.value} URI is driven only by {other.value}; leave --driver out (or set [engine] driver "
            '= "auto") to drive each host by its URI',
            field="driver",
        )
    return DriverPlan(tuple(sim), tuple(libvirt), tuple(undeclared))


class _Refused:
    """A migration no driver here may make (between a simulated and a libvirt host): it fails to prepare,
    blaming the target, so the retry path looks for another."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def prepare_target(self) -> None:
        raise DriverError(self.reason, target_at_fault=True)

    def start(self) -> None:
        raise DriverError(self.reason)

    def progress(self) -> Progress:
        raise DriverError(self.reason)

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        pass

    def set_memory_throttle(self, percent: int) -> None:
        pass

    def set_max_downtime(self, ms: int) -> None:
        pass

    def switchover(self) -> None:
        raise DriverError(self.reason)

    def abort(self) -> None:
        pass

    def finalize(self, success: bool) -> None:
        pass


class RoutingHypervisor:
    """``HypervisorDriver`` over several: each call goes to the driver of the hosts involved (a run whose
    fleet has both simulated and libvirt hosts). A host added after the start is looked up in the store."""

    def __init__(
        self,
        drivers: Mapping[DriverKind, HypervisorDriver],
        kind_of: Callable[[str], DriverKind | None],
    ) -> None:
        self.drivers = dict(drivers)
        self.kind_of = kind_of

    def _driver(self, host: str) -> HypervisorDriver | None:
        kind = self.kind_of(host)
        return None if kind is None else self.drivers.get(kind)

    def migration(self, spec: MigrationSpec) -> MigrationDriver:
        source, target = self.kind_of(spec.source_host), self.kind_of(spec.target_host)
        driver = self._driver(spec.source_host)
        if source is None or target is None or source is not target or driver is None:
            what = f"{source.value if source else 'unknown'} -> {target.value if target else 'unknown'}"
            return _Refused(
                f"cannot migrate {spec.droplet_id} from {spec.source_host} to {spec.target_host} ({what}): "
                "one driver must drive both hosts"
            )
        return driver.migration(spec)

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        driver = self._driver(host)
        return DomainState.ABSENT if driver is None else driver.domain_state(host, droplet_id)

    def recover(self, spec: MigrationSpec) -> str | Recovered:
        driver = self._driver(spec.source_host)
        if driver is None:
            raise DriverError(f"no driver here drives {spec.source_host}")
        return driver.recover(spec)


def _store_kind_of(store: Store, plan: DriverPlan) -> Callable[[str], DriverKind | None]:
    def kind_of(host: str) -> DriverKind | None:
        known = plan.kind_of(host)
        if known is not None:
            return known
        try:
            uri = store.get_host(host).hypervisor_uri
        except LookupError:
            return None
        return driver_kind(uri) or DriverKind.SIM

    return kind_of


# --- The simulated hypervisor inside ``host-engine run`` ----------------------------------------------------


class SimTickStep:
    """The executor on the simulated hypervisor, as a step of the engine loop (``Engine(steps=[...])``).

    Each ``tick`` re-reads the simulated hosts, advances the world by the wall time since the last one (times
    ``speed``) in controller ticks, and writes back the rows that changed (``StoredWorld.persist``), where
    other processes, restarts and ``host-engine`` commands find them. Build it with ``open``.

    Every controller tick is a whole ``tick_s`` of simulated time, as a real executor's are: what is left
    of the due time (less than a tick) waits for the next ``tick``. Simulating the remainder as a short
    tick of its own gave the controller one more look (and one more throttle step) per engine tick whenever
    the wall clock jittered, so a demo's throttled guest converged up to a fifth sooner than the same
    migration predicted (``prediction.forecast_shared``) or run on libvirt.

    The store sees a real worker's pace whatever the speed: the executor's store work (claims, renewals,
    recovery) runs at the first controller tick of each ``tick``, again once ``tick_s`` x ``speed`` of
    simulated time has passed or an attempt has ended, and the controller ticks in between only step the
    attempts (``Executor.advance``); ``open`` makes progress records every ``progress_every_s`` of wall
    time. A tick simulates for at most :data:`MAX_SIM_TICK_S` of wall time (beyond that the world falls
    behind ``speed``), and ``shutdown`` (another thread) waits for the tick in progress, which stops at its
    next controller tick: the two never drive the same attempts at once.
    """

    def __init__(
        self,
        store: Store,
        world: StoredWorld,
        executor: Executor,
        *,
        speed: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.world = world
        self.executor = executor
        self.speed = speed
        self.monotonic = monotonic
        self._last = monotonic()
        self._busy = threading.Lock()  # held by a tick, and by shutdown
        self._stopping = threading.Event()
        self.behind_s = 0.0  # simulated time dropped because the simulation could not keep up
        self._carry_s = 0.0  # simulated time due but less than a controller tick: simulated next tick
        self._behind_logged = False

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
        seed: int = 0,
        route: Callable[[SimHypervisor], HypervisorDriver] | None = None,
    ) -> SimTickStep:
        """``route`` wraps the sim hypervisor (``RoutingHypervisor`` when libvirt hosts are driven too).

        Progress is recorded every ``config.progress_every_s`` of wall time (``speed`` times as much
        simulated time): at ``--sim-speed 100`` every 5 simulated seconds was 20 writes a second per
        attempt, most of what a worker spent its time on."""
        if speed > 1.0:
            config = replace(config, progress_every_s=config.progress_every_s * speed)
        world = StoredWorld.open(store, seed=seed)
        sim = SimHypervisor(world)
        executor = Executor(
            store,
            route(sim) if route is not None else sim,
            config,
            SimClock(world),
            hooks=hooks,
            choose_target=choose_target,
            metrics=metrics,
            monotonic=monotonic,
        )
        return cls(store, world, executor, speed=speed, monotonic=monotonic)

    def tick(self) -> list[Finished]:
        with self._busy:
            if self._stopping.is_set():
                return []
            return self._tick()

    def _tick(self) -> list[Finished]:
        now = self.monotonic()
        due_s = self._carry_s + (now - self._last) * self.speed
        self._last = now
        # Anything a store outage kept from the last tick goes out before the executor records an outcome.
        self.world.persist()
        self.world.refresh()
        done = self.executor.tick()
        tick_s = self.executor.config.tick_s
        # The executor's store work runs again once ``tick_s`` of wall time has been simulated (every
        # controller tick at speed 1), or at once after an attempt ended (its slot is claimed again).
        store_every_s = tick_s * max(1.0, self.speed) - 1e-9
        since_store_s = 0.0
        ended = False
        simulating = self.monotonic()
        while due_s >= tick_s - 1e-9 and not self._stopping.is_set():
            if self.monotonic() - simulating >= MAX_SIM_TICK_S:
                self._fell_behind(due_s)
                due_s = 0.0
                break
            step = tick_s
            self.world.advance(step)
            due_s -= step
            since_store_s += step
            if ended or since_store_s >= store_every_s:
                finished = self.executor.tick()
                since_store_s = 0.0
            else:
                finished = self.executor.advance()
            ended = bool(finished)
            done += finished
        self._carry_s = max(0.0, due_s)
        self.world.persist()
        return done

    def _fell_behind(self, due_s: float) -> None:
        self.behind_s += due_s
        if not self._behind_logged:
            log.warning(
                "sim: simulating is slower than --sim-speed %g here; the simulated world falls behind "
                "(ticks are cut at %.0f s of wall time)",
                self.speed,
                MAX_SIM_TICK_S,
            )
            self._behind_logged = True

    def wait(self, timeout_s: float, sleep: Callable[[float], None] | None = None) -> None:
        """Pause between ticks (``Executor.wait``): the simulated attempts advance only in ``tick``, so
        nothing ends meanwhile and this is ``sleep`` (default: the wall clock)."""
        (sleep or time.sleep)(timeout_s)

    def shutdown(self) -> list[Finished]:
        """Stop driving: abort this worker's attempts (sources untouched, each handed to the retry path) and
        write the world back, so nothing waits for the claim lease to expire. A tick in progress on another
        thread stops at its next controller tick first; no tick runs after this."""
        self._stopping.set()
        with self._busy:
            done = self.executor.shutdown()
            self.world.persist()
        return done


def executor_step(
    store: Store,
    config: EngineConfig,
    *,
    driver: str = AUTO,
    hooks: ExecutorHooks | None = None,
    metrics: ExecutorMetrics | None = None,
    sim_speed: float = 1.0,
    only: Sequence[str] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    exec_config: ExecutorConfig | None = None,
) -> SimTickStep | Executor:
    """What ``host-engine run`` adds to the engine loop (``Engine(..., steps=[executor_step(...)])``).

    Each host is driven by its own driver (``plan_drivers``; ``driver`` "sim"/"libvirt" only insists, and
    refuses hosts of the other kind): simulated hosts by the world kept in the store, following wall time x
    ``sim_speed``; libvirt hosts through their ``hypervisor_uri`` with ``config.libvirt``'s bandwidth cap,
    TLS and peer URIs; both at once through a ``RoutingHypervisor`` (then in simulated time at wall speed, so
    ``sim_speed`` must stay 1). All run under ``config.controller``; retries pick another target through the
    placement filters and weighers; ``only`` restricts the executor to those migration ids; ``monotonic``
    is the wall clock the sim follows (tests inject one); ``exec_config`` replaces the executor settings
    derived from ``config``. Logs which driver drives which hosts.
    """
    plan = plan_drivers(store.list_hosts(), driver)
    log.info("%s", plan.describe())
    # [engine] worker/lease/renew_every/max_concurrent, [concurrency] limits, [controller] downtime budget.
    if exec_config is None:
        exec_config = ExecutorConfig.for_engine(config, only=None if only is None else frozenset(only))
    chooser = placement_chooser(store, config.placement)
    libvirt = _libvirt_hypervisor(store, config, plan) if plan.libvirt else None
    if libvirt is not None and not plan.sim:
        return Executor(
            store,
            libvirt,
            exec_config,
            RealClock(),
            hooks=hooks,
            choose_target=chooser,
            metrics=metrics,
        )
    route = None
    if libvirt is not None:
        if sim_speed != 1.0:
            raise InvalidInput(
                "--sim-speed must stay 1 when libvirt hosts are driven too (they run in real time)",
                field="sim_speed",
            )
        kind_of = _store_kind_of(store, plan)
        lv = libvirt

        def route(sim: SimHypervisor) -> HypervisorDriver:
            return RoutingHypervisor({DriverKind.SIM: sim, DriverKind.LIBVIRT: lv}, kind_of)

    return SimTickStep.open(
        store,
        exec_config,
        speed=sim_speed,
        monotonic=monotonic,
        hooks=hooks,
        choose_target=chooser,
        metrics=metrics,
        route=route,
    )


def _libvirt_hypervisor(store: Store, config: EngineConfig, plan: DriverPlan) -> HypervisorDriver:
    from host_engine.drivers.libvirt import LibvirtHypervisor

    uris = {h.name: h.hypervisor_uri for h in store.list_hosts() if h.name in plan.libvirt}
    lv = config.libvirt
    for name in sorted(set(lv.peer_uris) - set(uris)):
        log.warning("[libvirt] peer_uris.%s: no such libvirt host in the store; ignored", name)
    return LibvirtHypervisor(uris, peer_uris=lv.peer_uris, options=lv.options())
