"""The agent's policy: one explicit state machine per event (``states.py``), driven by notices.

:meth:`Agent.handle` takes the latest reading of the event (a :class:`Notice`, or ``None`` when it is not
known right now) and advances the active event's state as far as it goes: begin tracking a new event, run a
phase, wait. Everything it does is journaled before and after, so a new process picks up where a killed
one stopped. Running a phase's hooks is :mod:`guest_agent.phases`; the ack and power-off steps around
``before_offline`` are :mod:`guest_agent.shutdown`.

Policy:

* ``live_migrate`` → ``on_notice`` (drain) → wait until the flag clears → ``after_migration`` (restore).
* ``offline_migrate``, or ``live_migrate`` with ``prefer_offline = true`` → ``on_notice`` →
  ``before_offline`` → ack ``offline`` (with ``power_on_after``) → the power-off command → wait until the
  flag clears (normally: the next boot) → ``after_migration``.
* A live event replaced by an ``offline_migrate`` one (the live migration failed for good) is SUPERSEDED:
  the drain already ran, the new event goes straight on to the shutdown path.
* The flag cleared while the agent was down → ``after_migration`` runs on start (DRAINED/POWERED_OFF in the
  journal and no event on the server).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from guest_agent import journal_schema
from guest_agent.config import AgentConfig, HookSpec, Phase
from guest_agent.hooks import Hook, build_hook
from guest_agent.hooks.base import EventInfo, HookResult
from guest_agent.journal import EventRecord, Journal
from guest_agent.metrics import Metrics
from guest_agent.phases import PhaseReport, PhaseRunner
from guest_agent.shutdown import AckOutcome, ShutdownSteps
from guest_agent.source import EventSource, Notice, NoticeKind
from guest_agent.states import EventStatus, MigrationKind

log = logging.getLogger(__name__)

SHUTDOWN_ABANDONED = journal_schema.SHUTDOWN_ABANDONED


class Agent:
    """Handles events for one droplet. Only one thread (the main one) calls :meth:`handle`."""

    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        *,
        source: EventSource | None,
        hook_factory: Callable[[HookSpec], Hook] = build_hook,
        power_off: Callable[[float], HookResult] | None = None,
        metrics: Metrics | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        simulated: bool = False,
    ) -> None:
        self.config = config
        self.journal = journal
        self._source = source
        self.metrics = metrics or Metrics()
        self._wall = wall
        self._simulated = simulated
        self._stop = threading.Event()
        self.reports: list[PhaseReport] = []
        self._phases = PhaseRunner(
            lambda: self.config,
            journal,
            hook_factory=hook_factory,
            metrics=self.metrics,
            wall=wall,
            monotonic=monotonic,
            sleep=sleep,
            stop=self._stop,
            reports=self.reports,
        )
        self._steps = ShutdownSteps(
            lambda: self.config,
            journal,
            source=lambda: self._source,
            power_off=power_off,
            monotonic=monotonic,
            sleep=sleep,
            stop=self._stop,
            simulated=simulated,
        )
        self._warned_other: str | None = None
        self._warned_done: str | None = None
        self._last_event_notice: Notice | None = None  # for the event's current state in hooks' input

    # ---- control

    def request_stop(self) -> None:
        """Finish the running hook step (up to its timeout), start nothing new, return from ``handle``."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, waking early (True) when a stop is requested."""
        return self._stop.wait(timeout_s)

    def replace_config(self, config: AgentConfig, source: EventSource | None = None) -> None:
        """Use a reloaded config (and, if the metadata settings changed, source) from the next step on."""
        self.config = config
        if source is not None:
            self._source = source

    def report_interrupted(self) -> None:
        """On start: say what a previous life left unfinished (once, before acting on it)."""
        rec = self.journal.active()
        if rec is None:
            return
        log.info("resuming event_id=%s (%s) in state %s", rec.event_id, rec.kind.value, rec.status.value)
        for hook in rec.hooks:
            if hook.interrupted:
                log.warning(
                    "event_id=%s phase=%s hook=%s was interrupted by a crash or power loss",
                    rec.event_id,
                    hook.phase.value,
                    hook.name,
                )

    # ---- the state machine

    def handle(self, notice: Notice | None) -> None:
        """Advance the active event as far as ``notice`` (None: unknown right now) allows."""
        if notice is not None and notice.is_event:
            self._last_event_notice = notice
        while not self._stop.is_set() and self._step(notice):
            pass

    def _step(self, notice: Notice | None) -> bool:  # noqa: PLR0911, PLR0912  one branch per state reads best
        rec = self.journal.active()
        if rec is None:
            return self._maybe_begin(notice)
        if any(h.interrupted and h.process is not None for h in rec.hooks):
            return self._phases.settle_leftovers(rec)
        if notice is not None and self._same_event(rec, notice):
            self.journal.update_times(
                rec.event_id,
                deadline=self._deadline_for(notice, rec.first_seen),
                not_before=_ts(notice.not_before),
            )
        status = rec.status
        if status is EventStatus.NOTICED:
            if notice is not None and not self._same_event(rec, notice) and notice.kind is NoticeKind.NONE:
                log.info("event_id=%s cleared before any hook ran", rec.event_id)
                self._set(rec, EventStatus.DONE)
                return True
            self._set(rec, EventStatus.DRAINING)
            return True
        if status is EventStatus.DRAINING:
            report = self._phases.run(rec, Phase.ON_NOTICE, self._event_info)
            if not report.finished:
                return False
            self._set(rec, EventStatus.DRAINED)
            return True
        if status is EventStatus.DRAINED:
            if notice is None or notice.kind is NoticeKind.OTHER:
                return False  # unknown (or a value we do not know): not a reason to call the event over
            if self._same_event(rec, notice):
                if self._wants_shutdown(rec, notice):
                    self._set(rec, EventStatus.SHUTTING_DOWN)
                    return True
                self._steps.maybe_ack_ready(rec)
                return False
            if notice.kind is NoticeKind.OFFLINE_MIGRATE and rec.kind is MigrationKind.LIVE_MIGRATE:
                log.info("event_id=%s superseded by offline event %s", rec.event_id, notice.id)
                self._set(rec, EventStatus.SUPERSEDED)
                self._begin(notice, MigrationKind.OFFLINE_MIGRATE, carry=rec)
                return True
            log.info("event_id=%s is over (the flag now reads %r): restoring", rec.event_id, notice.raw)
            self._set(rec, EventStatus.RESTORING)
            return True
        if status is EventStatus.SHUTTING_DOWN:
            return self._shutdown(rec, notice)
        if status is EventStatus.POWERED_OFF:
            if notice is None or notice.kind is NoticeKind.OTHER or self._same_event(rec, notice):
                return False
            log.info("event_id=%s is over after the power-off: restoring", rec.event_id)
            self._set(rec, EventStatus.RESTORING)
            return True
        if status is EventStatus.RESTORING:
            report = self._phases.run(rec, Phase.AFTER_MIGRATION, self._event_info)
            if not report.finished:
                return False
            self._set(rec, EventStatus.DONE)
            log.info("event_id=%s done", rec.event_id)
            return True
        return False

    def _maybe_begin(self, notice: Notice | None) -> bool:
        kind = notice.kind.migration if notice is not None else None
        if notice is None or kind is None:
            if notice is not None and notice.kind is NoticeKind.OTHER and notice.raw != self._warned_other:
                log.warning(
                    "the metadata service announces %r, which this agent does not know: ignored", notice.raw
                )
                self._warned_other = notice.raw
            return False
        if notice.id is not None and any(e.server_id == notice.id for e in self.journal.events()):
            # Already handled to the end (or refused by the server as stale): a notice still showing it is
            # old news, never a reason to drain — or power off — a second time.
            if notice.id != self._warned_done:
                log.info("event_id=%s was already handled; waiting for the next change", notice.id)
                self._warned_done = notice.id
            return False
        self._begin(notice, kind)
        return True

    def _begin(self, notice: Notice, kind: MigrationKind, carry: EventRecord | None = None) -> EventRecord:
        now = self._wall()
        base = notice.id if notice.id is not None else f"text-{notice.kind.value}-{int(now)}"
        event_id, n = base, 1
        while self.journal.event(event_id) is not None:  # the same id seen again after it was done
            n += 1
            event_id = f"{base}#{n}"
        deadline = self._deadline_for(notice, now)
        data = {k: v for k, v in (carry.data if carry else {}).items() if k != SHUTDOWN_ABANDONED}
        rec = self.journal.begin_event(
            event_id=event_id,
            server_id=notice.id,
            kind=kind,
            deadline=deadline,
            not_before=_ts(notice.not_before),
            simulated=self._simulated,
            data=data,
            inherit_from=carry.event_id if carry else None,
            inherit_phases=(Phase.ON_NOTICE,),
        )
        problem = _deadline_problem(notice, now)
        if problem is not None:
            log.warning(
                "event_id=%s: the server's deadline %s %s: the hooks get the default notice (%g s) instead",
                event_id,
                _fmt(notice.deadline or notice.not_before),
                problem,
                self.config.agent.default_notice_s,
            )
        lead_s = None if deadline is None else deadline - now
        self.metrics.event_seen(notice.kind.value, lead_s)
        log.warning(
            "maintenance event seen: event_id=%s kind=%s state=%s not_before=%s deadline=%s",
            event_id,
            notice.kind.value,
            notice.state,
            _fmt(notice.not_before),
            _fmt_ts(deadline),
        )
        return rec

    def _same_event(self, rec: EventRecord, notice: Notice) -> bool:
        if not notice.is_event:
            return False
        if rec.server_id is not None:
            return notice.id == rec.server_id
        return notice.id is None and notice.kind.migration is rec.kind

    def _deadline_for(self, notice: Notice, first_seen: float) -> float:
        """The event's deadline (wall clock) for the hooks: the server's, when it makes sense.

        A text-only server gives no times, and a deadline that was already past when the event was first
        seen, or that comes before ``not_before``, is nonsense (a bad clock, a bad request to the server): in
        every such case the hooks get the configured ``default_notice_s`` from first sight, rather than being
        skipped as late while the migration may be an hour away.
        """
        fallback = first_seen + self.config.agent.default_notice_s
        if _deadline_problem(notice, first_seen) is not None:
            return fallback
        given = notice.deadline or notice.not_before
        return given.timestamp() if given is not None else fallback

    def _wants_shutdown(self, rec: EventRecord, notice: Notice) -> bool:
        if notice.kind is NoticeKind.OFFLINE_MIGRATE:
            return True
        return self.config.agent.prefer_offline and not rec.data.get(SHUTDOWN_ABANDONED, False)

    def _set(self, rec: EventRecord, status: EventStatus) -> None:
        self.journal.set_status(rec.event_id, status)
        log.info("event_id=%s: %s -> %s", rec.event_id, rec.status.value, status.value)

    # ---- the shutdown path

    def _shutdown(self, rec: EventRecord, notice: Notice | None) -> bool:
        report = self._phases.run(rec, Phase.BEFORE_OFFLINE, self._event_info)
        if not report.finished or self._stop.is_set():
            return False  # asked to stop (SIGTERM): the next start resumes here
        required = rec.kind is MigrationKind.OFFLINE_MIGRATE or (
            notice is not None and notice.kind is NoticeKind.OFFLINE_MIGRATE and self._same_event(rec, notice)
        )
        if report.stopped_on_failure and not required:
            log.error(
                "event_id=%s: a before_offline hook failed with stop_on_failure: not shutting down; "
                "the live migration will go ahead",
                rec.event_id,
            )
            self.journal.put_data(rec.event_id, SHUTDOWN_ABANDONED, True)
            self._set(rec, EventStatus.DRAINED)
            return True
        ack = self._steps.ack_offline(rec)
        if ack is AckOutcome.REFUSED:
            log.warning("event_id=%s is no longer the current event: not powering off", rec.event_id)
            self._set(rec, EventStatus.RESTORING)
            return True
        if ack is AckOutcome.STOPPED or self._stop.is_set():
            return False
        self._steps.power_off(rec)
        self._set(rec, EventStatus.POWERED_OFF)
        return True

    # ---- what hooks see

    def _event_info(self, rec: EventRecord) -> EventInfo:
        last = self._last_event_notice
        current = last if last is not None and self._same_event(rec, last) else None
        return EventInfo(
            event_id=rec.event_id,
            kind=rec.kind,
            state=current.state if current is not None else None,
            not_before=_dt(rec.not_before),
            deadline=_dt(rec.deadline),
            simulated=rec.simulated,
            expected_downtime_ms=current.expected_downtime_ms if current is not None else None,
            expected_duration_s=current.expected_duration_s if current is not None else None,
        )


def _deadline_problem(notice: Notice, first_seen: float) -> str | None:
    """Why the server's deadline (or not_before standing in for it) cannot be used, or None if it can."""
    given = notice.deadline or notice.not_before
    if given is None:
        return None
    if given.timestamp() <= first_seen:
        return "had already passed when the event was first seen"
    if notice.deadline is not None and notice.not_before is not None and notice.deadline < notice.not_before:
        return f"is before not_before {_fmt(notice.not_before)}"
    return None


def _ts(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def _fmt(when: datetime | None) -> str:
    return when.isoformat().replace("+00:00", "Z") if when is not None else "-"


def _fmt_ts(ts: float | None) -> str:
    return _fmt(_dt(ts))
