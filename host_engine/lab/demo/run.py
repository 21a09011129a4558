"""The demo step by step (:class:`Demo`): start the metadata server, the store and one agent per droplet;
plan the evacuation; tick the engine ``host-engine run`` would run until every migration ended and every
agent is done; then the final table and the checks."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from host_engine import planner
from host_engine.config import EngineConfig
from host_engine.drivers.base import DomainState, Phase
from host_engine.drivers.sim import Fault, FaultKind, GiB, StoredWorld
from host_engine.engine import Engine
from host_engine.engine_steps import SimTickStep
from host_engine.executor import attempt_id
from host_engine.lab.demo import printing, results, verification
from host_engine.lab.demo.agents import ScenarioAgent
from host_engine.lab.demo.scenario import (
    COMPAT_GROUP,
    DATACENTER,
    EVACUATE,
    FIRST_ADDRESS,
    FIRST_NOTICE_AFTER_S,
    RECONCILE_EVERY,
    SIM_SPEEDUP,
    WORKER,
    DemoFailed,
    DemoOptions,
    engine_config,
    executor_config,
)
from host_engine.lab.launch import START_TIMEOUT_S, MetadataServerProcess, reap, signal_group
from host_engine.models import Droplet, Host, Migration
from host_engine.prediction import Prediction
from host_engine.states import MigrationState
from host_engine.store import Store
from host_engine.timeparse import utc_now
from host_engine.wiring import WiredEngine, build_engine

POLL_S = 0.05
# The metadata server logs warnings only: its request lines would bury the demo's in server.log.
QUIET_SERVER = ["--log-level", "warning"]


class Demo:
    """The demo step by step: ``setup``, ``evacuate``, ``run``, ``verify``, ``rows``; ``close`` always.

    The engine is built by :func:`host_engine.wiring.build_engine`, as ``host-engine run --driver sim
    --sim-speed 20`` builds it: the simulated datacenter lives in the store, the executor is a step of the
    engine loop.
    """

    def __init__(self, options: DemoOptions | None = None, echo: Callable[[str], None] = print) -> None:
        self.options = options or DemoOptions()
        self.echo = echo
        self.t0 = time.monotonic()
        self.workdir: Path | None = None
        self._own_workdir = False
        self.server: MetadataServerProcess | None = None
        self.agents: dict[str, ScenarioAgent] = {}
        self.store: Store | None = None
        self.wired: WiredEngine | None = None
        self.migrations: dict[str, str] = {}  # droplet id -> migration id
        self.powered_off: dict[str, float] = {}  # droplet -> wall time it went off (its power-off command)
        self.booted: dict[str, float] = {}  # droplet -> wall time it was powered on again
        self.predictions: dict[str, Prediction] = {}  # droplet id -> what the sim predicted at planning
        self._news: printing.News | None = None
        self._run_started: float | None = None

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    def _need_store(self) -> Store:
        if self.store is None:
            raise DemoFailed("setup() first")
        return self.store

    def _need_wired(self) -> WiredEngine:
        if self.wired is None:
            raise DemoFailed("setup() first")
        return self.wired

    def _need_news(self) -> printing.News:
        if self._news is None:
            raise DemoFailed("setup() first")
        return self._news

    @property
    def engine(self) -> Engine:
        return self._need_wired().engine

    @property
    def world(self) -> StoredWorld:
        """The simulated datacenter (kept in the store, as ``host-engine run`` keeps it)."""
        step = self._need_wired().step
        if not isinstance(step, SimTickStep):
            raise DemoFailed("the demo runs on the simulated hypervisor only")
        return step.world

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this demo started; remove its files unless asked to keep them."""
        running = [a.proc for a in self.agents.values() if a.proc is not None]
        for proc in running:  # all at once: each agent takes up to a second to finish its step
            signal_group(proc)
        for proc in running:
            with contextlib.suppress(Exception):
                reap(proc)
        for agent in self.agents.values():
            agent.proc = None
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        if self.wired is not None:
            self.wired.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.workdir is not None and self._own_workdir and not self.options.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def setup(self) -> None:
        """Start the metadata server, fill the store with the datacenter, build the engine as ``run`` does,
        register every droplet on the server and start one agent each."""
        opts = self.options
        if opts.workdir is not None:
            self.workdir = opts.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="host-engine-demo-"))
            self._own_workdir = True
        self.say(f"working directory {self.workdir}")
        server = self.server = MetadataServerProcess(
            self.workdir / "metadata-server", extra_args=QUIET_SERVER
        )
        server.launch()
        self.say(
            f"metadata server up: guests -> {server.guest_url}, admin API -> {server.admin_url} "
            "(one server shared by every host)"
        )
        store = self.store = Store.open(self.workdir / "engine.db")
        self._news = printing.News(self.say, store)
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
                    metadata_url=server.admin_url,
                    metadata_token_file=str(server.token_file),
                )
            )
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
            self.agents[d.id] = ScenarioAgent.for_droplet(d, address, self.workdir / "agents" / d.id)
        self._build_engine()
        reports = self.engine.reconcile()
        errors = [r.error for r in reports if r.error]
        if errors:
            raise DemoFailed(f"could not register the droplets on the metadata server: {errors[0]}")
        self.say(f"{len(opts.hosts)} hosts, {len(opts.droplets)} droplets registered on the metadata server")
        printing.print_inventory(self.echo, store, opts)
        for agent in self.agents.values():
            agent.write_scenario_config(server.guest_url)
            agent.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(a.started() for a in self.agents.values()):
            for a in self.agents.values():
                if not a.running:
                    raise DemoFailed(f"guest-agent of {a.spec.id} exited: {a.log()[-1500:]}")
            if time.monotonic() > deadline:
                raise DemoFailed("the guest agents did not start in time")
            time.sleep(POLL_S)
        self.say(f"{len(self.agents)} guest agents running, each polling from its own address")

    def _build_engine(self) -> None:
        """``host-engine run --driver sim --sim-speed 20`` with the demo's config, in this process; the loop
        is ticked by ``run`` (no threads), so the demo prints between ticks."""
        store = self._need_store()
        config = self.engine_config()
        StoredWorld.open(store, seed=self.options.seed)  # the first to open the stored world fixes its seed
        self.wired = build_engine(
            store,
            config,
            "sim",
            executor=executor_config(config),
            sim_speed=SIM_SPEEDUP,
            sleep=lambda _s: None,
            reconcile_every=RECONCILE_EVERY,
        )

    def engine_config(self) -> EngineConfig:
        return engine_config(self.options, str(self.workdir / "engine.db") if self.workdir else "")

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
            requested_by=WORKER,
            unsafe_short_notice=True,
        )
        self.say(
            f"evacuating {EVACUATE} with a {self.options.notice_s:.0f} s notice: UNSAFE, demo only "
            "(owners are promised 10 minutes; --unsafe-short-notice)"
        )
        leaving = [d.id for d in store.list_droplets(host=EVACUATE)]
        preview = planner.preview_evacuation(store, EVACUATE, config, explain=leaving)
        schedule, written = planner.evacuate(store, EVACUATE, request, config)
        printing.print_plan(self.echo, schedule, now)
        self.predictions = printing.print_forecast(self.echo, schedule, config, self.options, written)
        printing.print_explain(self.echo, preview)
        for m in written:
            self.migrations[m.droplet_id] = m.id
            if self.options.spec(m.droplet_id).fail_once:
                self.world.inject_fault(attempt_id(m.id, 1), Fault(FaultKind.SOURCE_ERROR, Phase.DISK, 3.0))
                self.echo(f"    (fault injected: {m.droplet_id}'s first attempt will fail mid-copy)")
        return written

    # ---- running -----------------------------------------------------------------------------------------

    def done(self) -> bool:
        """Every migration ended, and every moved droplet's agent is up, idle, and ran all its hooks."""
        store = self._need_store()
        if any(not store.get_migration(mid).state.is_terminal for mid in self.migrations.values()):
            return False
        for did in self.migrations:
            agent = self.agents[did]
            if not agent.running or agent.journal().get("active") is not None:
                return False
            wanted = {(h.phase, h.name) for h in agent.spec.hooks}
            if not wanted <= {(r.phase, r.hook) for r in agent.hook_runs()}:
                return False
        return True

    def run(self, on_tick: Callable[[Demo], None] | None = None) -> None:
        """Tick the engine (notices, acks, reconciliation, the executor on the simulator) until every
        migration ended and every agent is done, or the timeout passes; ``on_tick`` acts between ticks."""
        engine = self.engine
        news = self._need_news()
        self._run_started = time.monotonic()
        deadline = time.monotonic() + self.options.timeout_s
        while not self.done():
            if time.monotonic() > deadline:
                raise DemoFailed(f"not finished after {self.options.timeout_s:.0f} s")
            started = time.monotonic()
            result = engine.tick()
            for m in result.notified:
                news.print_log(m.id)
            self._power_events()
            news.print(self.migrations, self.agents)
            if on_tick is not None:
                on_tick(self)
            time.sleep(max(0.0, engine.config.engine.poll_interval_s - (time.monotonic() - started)))
        news.print(self.migrations, self.agents)

    def _power_events(self) -> None:
        """The prefer-offline droplet: its power-off command left a file, so the simulated VM is now off (its
        agent goes down with it); once migrated it is powered on on the target and its agent boots again."""
        store = self._need_store()
        world = self.world
        for did, agent in self.agents.items():
            if did not in self.powered_off and agent.poweroff_path.exists():
                self.powered_off[did] = agent.powered_off_at() or time.time()
                world.droplets[did].state = DomainState.SHUT_OFF  # written back at the next tick
                agent.stop()
                self.say(f"{did}: powered itself off (acknowledged offline); its guest agent is down with it")
            if did in self.powered_off and did not in self.booted:
                mid = self.migrations.get(did)
                sim = world.droplets[did]
                if (
                    mid is not None
                    and store.get_migration(mid).state is MigrationState.COMPLETED
                    and sim.state is DomainState.RUNNING
                ):
                    self.booted[did] = time.time()
                    self.say(f"{did}: powered on on {sim.host}; the guest agent starts again")
                    agent.start()

    # ---- checks and results ------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Everything that must hold at the end; an empty list means consistent."""
        store = self._need_store()
        return [
            *verification.check_placement(store, self.world, self.migrations),
            *verification.check_metadata_server(store, self.server),
            *verification.check_hooks(store, self.agents, self.migrations),
        ]

    def rows(self) -> list[results.Row]:
        power = results.PowerTimes(self.powered_off, self.booted)
        return results.rows(self._need_store(), self.options, self.migrations, power, self.predictions)

    def print_table(self) -> None:
        wall_s = time.monotonic() - (self._run_started or time.monotonic())
        results.print_table(self.echo, self.rows(), sim_s=self.world.time_s, wall_s=wall_s)
