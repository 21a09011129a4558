"""The composition root: the one place that builds an engine from its parts.

``host-engine run``, ``migrate --now``, ``host-engine demo`` and the benchmarks all get their engine from
:func:`build_engine`, so what the demo and the benchmarks exercise is what ``run`` does:

* a :class:`~host_engine.metadata.reconcile.MetadataSync` (the hosts' metadata servers, through ``clients``);
* the executor step for ``driver`` (:func:`host_engine.engine_steps.executor_step`: each host by its URI,
  simulated hosts in the store's world, run under ``config.sim``), with the sync as its hooks;
* the :class:`~host_engine.engine.Engine` loop (notices, acks, reconciliation) with that step.

The result is a context manager: leaving it releases this process's running attempts (sources untouched)
and closes the metadata clients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from host_engine.config import EngineConfig
from host_engine.drivers.sim.settings import apply_settings
from host_engine.engine import RECONCILE_EVERY, Engine, TickStep
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.errors import HostEngineError
from host_engine.executor import Executor, ExecutorConfig
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.metadata.client import RequestObserver
from host_engine.metadata.reconcile import ClientFactory, MetadataSync, default_client_factory
from host_engine.store import Store
from host_engine.timeparse import Clock

log = logging.getLogger(__name__)


def client_factory(config: EngineConfig, *, sleep: Callable[[float], None] | None = None) -> ClientFactory:
    """The metadata servers' admin clients as ``[engine]`` configures them (timeout, attempts, CA file)."""
    e = config.engine
    return default_client_factory(
        timeout_s=e.notifier_timeout_s, attempts=e.notifier_attempts, sleep=sleep, ca_file=e.metadata_ca_file
    )


@dataclass
class WiredEngine:
    """An engine and what it was built from; ``with`` it to release everything on the way out."""

    engine: Engine
    sync: MetadataSync
    step: SimTickStep | Executor
    _shut_down: bool = field(default=False, repr=False)

    def __enter__(self) -> WiredEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shutdown(self) -> None:
        """Release this process's running attempts now (sources untouched), not at the claims' lease expiry.
        Once: a second call does nothing."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            for f in self.step.shutdown():
                log.info("migration_id=%s: attempt %s stopped (%s)", f.migration_id, f.attempt, f.state.value)
        except HostEngineError as e:
            log.error("shutting the executor down failed (its claims expire on their own): %s", e)

    def close(self) -> None:
        try:
            self.shutdown()
        finally:
            self.sync.close()


def build_engine(
    store: Store,
    config: EngineConfig,
    driver: str,
    clock: Clock | None = None,
    *,
    clients: ClientFactory | None = None,
    observer: RequestObserver | None = None,
    metrics: ExecutorMetrics | None = None,
    executor: ExecutorConfig | None = None,
    sim_speed: float = 1.0,
    monotonic: Callable[[], float] = time.monotonic,
    only: Sequence[str] | None = None,
    sleep: Callable[[float], None] | None = None,
    threads: bool = False,
    before: Sequence[TickStep] = (),
    after: Sequence[TickStep] = (),
    reconcile_every: timedelta = RECONCILE_EVERY,
) -> WiredEngine:
    """The engine of one process over ``store``, ``config`` and the hypervisor ``driver`` ("auto", "sim",
    "libvirt": see ``engine_steps.plan_drivers``); ``clock`` is the engine's (None: the store's).

    ``clients`` builds the admin clients (default: :func:`client_factory`, waiting between retries in real
    time whatever the loop's ``sleep``), ``observer`` hears each of their requests; ``metrics`` counts the
    executor's outcomes; ``executor`` replaces the executor settings
    ``ExecutorConfig.for_engine`` derives from ``config`` (the demo's quicker retries); ``sim_speed`` and
    ``monotonic`` set how the simulated hosts follow the wall clock; ``only`` restricts the executor to those
    migrations (``migrate --now``). ``sleep``, ``threads`` and ``reconcile_every`` go to the loop, whose steps
    are ``before``, the executor, then ``after``. Refused (``InvalidInput``, one line) when ``driver`` cannot
    drive the store's hosts.
    """
    sync = MetadataSync(store, clients or client_factory(config), observer=observer)
    try:
        step = executor_step(
            store,
            config,
            driver=driver,
            hooks=sync,
            metrics=metrics,
            sim_speed=sim_speed,
            only=only,
            monotonic=monotonic,
            exec_config=executor,
        )
    except BaseException:
        sync.close()
        raise
    if isinstance(step, SimTickStep):  # the simulated hosts and droplets as [sim] describes them
        apply_settings(step.world, config.sim)
    engine = Engine(
        store,
        config,
        sync,
        clock=clock,
        sleep=sleep,
        steps=[*before, step, *after],
        reconcile_every=reconcile_every,
        threads=threads,
    )
    return WiredEngine(engine, sync, step)
