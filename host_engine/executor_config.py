"""What an executor is built with: its settings (``ExecutorConfig``), the hooks it calls around a migration's
life (``ExecutorHooks``: the metadata servers), and how it picks another target after a target's fault."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from host_engine.attempt import DEFAULT_TICK_S
from host_engine.config import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_RENEW_EVERY_S,
    PlacementConfig,
)
from host_engine.controller import ControllerConfig
from host_engine.models import Migration
from host_engine.planner import plan_placement
from host_engine.retry import RetryConfig
from host_engine.store import ClaimLimits, Store

if TYPE_CHECKING:
    from host_engine.config import EngineConfig

# Lease and renewal defaults: host_engine.config ([engine] lease, renew_every, max_concurrent).
# Write progress (stats) to the store every 5 s, and a log line whenever phase, round, throttle or disk limit
# changes: `status --watch` refreshes about that fast, and the store sees well under one write per second.
DEFAULT_PROGRESS_EVERY_S = 5.0
# An offline copy that failed this often needs an operator: the migration stays ``failed``.
DEFAULT_MAX_OFFLINE_ATTEMPTS = 3
# SIGTERM must end the process within 10 s: attempts get this long to abort (source untouched) before their
# claims are released for another worker (or this name's next process) to recover at once.
DEFAULT_SHUTDOWN_GRACE_S = 6.0


@dataclass(frozen=True)
class ExecutorConfig:
    """One worker's executor settings. ``for_engine`` builds it from the engine's config."""

    worker: str
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    tick_s: float = DEFAULT_TICK_S
    renew_every_s: float = DEFAULT_RENEW_EVERY_S
    lease_s: float = DEFAULT_LEASE_S
    progress_every_s: float = DEFAULT_PROGRESS_EVERY_S
    max_offline_attempts: int = DEFAULT_MAX_OFFLINE_ATTEMPTS
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Claim only these migrations (``host-engine migrate --now`` runs its own, not whatever else is due;
    # ``for_engine`` then retries them seconds apart: ``RetryConfig.right_away``).
    only: frozenset[str] | None = None
    # The fleet's limits, checked in the store at claim time across every worker ([concurrency]).
    limits: ClaimLimits = field(default_factory=ClaimLimits)
    # Each attempt on its own thread; None: when the clock is real (time passes without the caller).
    threads: bool | None = None
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S

    @classmethod
    def for_engine(
        cls, config: EngineConfig, *, only: frozenset[str] | None = None, tick_s: float | None = None
    ) -> ExecutorConfig:
        """The executor of ``host-engine run`` / ``migrate --now``: worker name, lease, renewal and
        per-worker concurrency from ``[engine]``, the fleet's limits from ``[concurrency]``, the downtime
        budget from ``[controller]``; the controller ticks once per engine poll."""
        e, sched = config.engine, config.schedule
        # ``migrate --now`` runs beside any ``host-engine run`` of the same name: it must not pass for that
        # worker (whose recovery would take its attempt for an orphan), so it works under a name of its own.
        worker = config.worker_id if only is None else f"{config.worker_id}/migrate-{os.getpid()}"
        return cls(
            # ``migrate --now``: the operator waits at the terminal, so a retry comes seconds later.
            retry=RetryConfig(
                backoff_s=sched.retry_backoff.total_seconds(),
                backoff_max_s=sched.retry_backoff_max.total_seconds(),
            )
            if only is None
            else RetryConfig.right_away(),
            worker=worker,
            max_concurrent=e.max_concurrent,
            tick_s=e.poll_interval_s if tick_s is None else tick_s,
            renew_every_s=e.renew_every_s,
            lease_s=e.lease_s,
            controller=config.controller,
            only=only,
            limits=ClaimLimits(sched.max_parallel, sched.max_per_source, sched.max_per_target),
        )


class ExecutorHooks(Protocol):
    """What the engine does around a migration's life (metadata servers, metrics). Called after the store
    committed; an exception is logged, never undoes the store."""

    def completed(self, migration: Migration) -> None:
        """Register on the target's metadata server, remove from the source's, clear the flag."""

    def retry_scheduled(self, migration: Migration) -> None:
        """The guest keeps reading live_migrate (same event id), with the new not_before."""

    def offline_required(self, migration: Migration) -> None:
        """The guest now reads offline_migrate under a new event id."""

    def cancelled(self, migration: Migration) -> None:
        """An operator aborted it: clear the flag."""


class NoHooks:
    def completed(self, migration: Migration) -> None:
        pass

    def retry_scheduled(self, migration: Migration) -> None:
        pass

    def offline_required(self, migration: Migration) -> None:
        pass

    def cancelled(self, migration: Migration) -> None:
        pass


#: Picks another target for a migration, avoiding the given hosts; None when there is none.
TargetChooser = Callable[[Migration, frozenset[str]], str | None]


def placement_chooser(store: Store, config: PlacementConfig) -> TargetChooser:
    """A ``TargetChooser`` from the placement filters and weighers: the best host for the
    droplet that is not to be avoided, among the chosen one and its runners-up; None when none fits."""

    def choose(m: Migration, avoid: frozenset[str]) -> str | None:
        with store.begin(readonly=True) as tx:
            droplet = tx.get_droplet(m.droplet_id)
            plan = plan_placement(tx, tx.get_host(m.source_host), [droplet], config)
        c = plan.choice(droplet.id)
        ranked = ([c.target] if c.target else []) + [host for host, _score in c.runners_up]
        return next((h for h in ranked if h not in avoid), None)

    return choose
