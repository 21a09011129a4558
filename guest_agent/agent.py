"""The agent's policy: one explicit state machine per event (``states.py``), driven by notices.

:meth:`Agent.handle` takes the latest reading of the event (a :class:`Notice`, or ``None`` when it is not
known right now) and advances the active event's state as far as it goes: begin tracking a new event, run a
phase, wait. Everything it does is journaled before and after, so a new process picks up where a killed
one stopped.

Policy (DESIGN.md §8):

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

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tenacity import RetryCallState

from guest_agent import journal_schema, procgroups
from guest_agent.config import DEFAULT_HOOK_TIMEOUT_S, AgentConfig, HookSpec, Phase, WebhookHookSpec
from guest_agent.errors import AckRejected, MetadataUnreachable
from guest_agent.hooks import Hook, build_hook
from guest_agent.hooks.base import EventInfo, HookContext, HookResult
from guest_agent.hooks.process import run_program
from guest_agent.journal import EventRecord, HookRecord, Journal
from guest_agent.metrics import Metrics
from guest_agent.source import EventSource, Notice, NoticeKind
from guest_agent.states import EventStatus, HookOutcome, MigrationKind
from guest_sdk.retry import RetryPolicy

log = logging.getLogger(__name__)

# Steps of the shutdown path, journaled like hooks ("@" cannot start a user hook's name).
ACK_READY_STEP = "@ack-ready"
ACK_OFFLINE_STEP = "@ack-offline"
POWER_OFF_STEP = "@power-off"
# The ack ``offline`` while the metadata server is unreachable: 5 attempts, full-jitter exponential
# backoff from 1 s (capped at 8 s; under 15 s of waits in all, as the fixed 1+2+4+8 s before), then give up
# on it and go on: the engine also treats a droplet found shut off as offline (DESIGN §3). Jittered, so the
# droplets of one host do not all retry in the same second.
ACK_RETRY = RetryPolicy(attempts=5, initial_backoff_s=1.0, max_backoff_s=8.0, budget_s=15.0)
SHUTDOWN_ABANDONED = journal_schema.SHUTDOWN_ABANDONED


class _Ack(enum.Enum):
    DONE = "done"  # sent, or not needed, or given up on (power off anyway)
    REFUSED = "refused"  # the event is no longer the current one: do not power off
    STOPPED = "stopped"  # a stop was requested while retrying


@dataclass
class PhaseReport:
    phase: Phase
    finished: bool = True  # False: stopped by a signal before every hook was handled
    stopped_on_failure: bool = False
    results: list[tuple[str, HookOutcome, str]] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, HookOutcome, str]]:
        return [r for r in self.results if not r[1].success]


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
        self._hook_factory = hook_factory
        self._power_off = power_off or self._run_power_off_command
        self.metrics = metrics or Metrics()
        self._wall = wall
        self._monotonic = monotonic
        self._sleep = sleep
        self._simulated = simulated
        self._stop = threading.Event()
        self.reports: list[PhaseReport] = []
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
            return self._settle_leftovers(rec)
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
            report = self._run_phase(rec, Phase.ON_NOTICE)
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
                self._maybe_ack_ready(rec)
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
            report = self._run_phase(rec, Phase.AFTER_MIGRATION)
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
        report = self._run_phase(rec, Phase.BEFORE_OFFLINE)
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
        ack = self._ack_offline(rec)
        if ack is _Ack.REFUSED:
            log.warning("event_id=%s is no longer the current event: not powering off", rec.event_id)
            self._set(rec, EventStatus.RESTORING)
            return True
        if ack is _Ack.STOPPED or self._stop.is_set():
            return False
        self._power_off_step(rec)
        self._set(rec, EventStatus.POWERED_OFF)
        return True

    def _ack_offline(self, rec: EventRecord) -> _Ack:  # noqa: PLR0911  each way out is a different outcome
        """Send the ack ``offline`` (retried a few times; a stop request leaves it for the next start)."""
        step = self.journal.event(rec.event_id)
        done = step.hook(Phase.BEFORE_OFFLINE, ACK_OFFLINE_STEP) if step else None
        if done is not None and done.finished:
            return (
                _Ack.REFUSED if done.outcome is HookOutcome.FAILED and "refused" in done.detail else _Ack.DONE
            )
        if self._simulated or self._source is None:
            self._record_step(rec, ACK_OFFLINE_STEP, HookResult(HookOutcome.SKIPPED, "simulated: not sent"))
            return _Ack.DONE
        if rec.server_id is None:
            self._record_step(
                rec, ACK_OFFLINE_STEP, HookResult(HookOutcome.SKIPPED, "text-only server: cannot acknowledge")
            )
            return _Ack.DONE
        power_on_after = self.config.agent.power_on_after
        self.journal.hook_started(rec.event_id, Phase.BEFORE_OFFLINE, ACK_OFFLINE_STEP)
        source = self._source

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            log.warning(
                "event_id=%s: ack offline attempt %d failed: %s", rec.event_id, state.attempt_number, error
            )

        retrying = ACK_RETRY.retrying(
            retry=lambda e: isinstance(e, MetadataUnreachable) and not self._stop.is_set(),
            sleep=self._sleep,
            clock=self._monotonic,
            before_sleep=log_retry,
        )
        try:
            retrying(source.acknowledge, rec.server_id, "offline", power_on_after=power_on_after)
        except AckRejected as e:
            self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.failed(f"refused: {e}"))
            return _Ack.REFUSED
        except MetadataUnreachable as e:
            if self._stop.is_set():
                return _Ack.STOPPED  # started, never finished: the next start sends it again
            self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.failed(f"not delivered: {e}"))
            return _Ack.DONE
        self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.ok(f"offline, power_on_after={power_on_after}"))
        return _Ack.DONE

    def _power_off_step(self, rec: EventRecord) -> None:
        current = self.journal.event(rec.event_id)
        done = current.hook(Phase.BEFORE_OFFLINE, POWER_OFF_STEP) if current else None
        if done is not None and done.started_at is not None:
            # Started in an earlier life: the machine may already have been powered off once. Never twice.
            if done.interrupted:
                self._finish_step(rec, POWER_OFF_STEP, HookResult(HookOutcome.INTERRUPTED, "not repeated"))
            return
        cmd = " ".join(self.config.agent.power_off_command)
        if self._simulated:
            log.warning("simulate: would power off now with: %s (not run)", cmd)
            self._record_step(
                rec, POWER_OFF_STEP, HookResult(HookOutcome.SKIPPED, f"simulated: would run {cmd}")
            )
            return
        log.warning("event_id=%s: powering off: %s", rec.event_id, cmd)
        self.journal.hook_started(rec.event_id, Phase.BEFORE_OFFLINE, POWER_OFF_STEP)
        result = self._power_off(self.config.agent.power_off_timeout_s)
        self._finish_step(rec, POWER_OFF_STEP, result)

    def _run_power_off_command(self, timeout_s: float) -> HookResult:
        result = run_program(self.config.agent.power_off_command, label="power-off", timeout_s=timeout_s)
        return HookResult.ok(result.describe()) if result.ok else HookResult.failed(result.describe())

    def _maybe_ack_ready(self, rec: EventRecord) -> None:
        if not self.config.agent.acknowledge_ready or rec.server_id is None or self._source is None:
            return
        current = self.journal.event(rec.event_id)
        if current is None or current.hook(Phase.ON_NOTICE, ACK_READY_STEP) is not None:
            return
        # "ready" lets the platform start early: only for a droplet whose drain fully succeeded. A hook that
        # failed, was cut, skipped or interrupted means it may not be drained: say nothing and let the
        # migration start at not_before, as if acknowledge_ready were off.
        unsuccessful = [
            f"{h.phase.value}/{h.name} {h.outcome.value if h.outcome else 'unfinished'}"
            for h in current.hooks
            if h.phase in (Phase.ON_NOTICE, Phase.BEFORE_OFFLINE)
            and not h.name.startswith("@")
            and (h.outcome is None or not h.outcome.success)
        ]
        if unsuccessful:
            why = f"not all drain hooks succeeded ({', '.join(unsuccessful)})"
            log.warning("event_id=%s: not acknowledging ready: %s", rec.event_id, why)
            self.journal.hook_started(rec.event_id, Phase.ON_NOTICE, ACK_READY_STEP)
            self._finish_step(rec, ACK_READY_STEP, HookResult(HookOutcome.SKIPPED, why))
            return
        self.journal.hook_started(rec.event_id, Phase.ON_NOTICE, ACK_READY_STEP)
        try:
            self._source.acknowledge(rec.server_id, "ready", power_on_after=self.config.agent.power_on_after)
        except (AckRejected, MetadataUnreachable) as e:
            self._finish_step(rec, ACK_READY_STEP, HookResult.failed(str(e)))
        else:
            self._finish_step(rec, ACK_READY_STEP, HookResult.ok("ready"))

    def _record_step(self, rec: EventRecord, name: str, result: HookResult) -> None:
        self.journal.hook_started(rec.event_id, Phase.BEFORE_OFFLINE, name)
        self._finish_step(rec, name, result)

    def _finish_step(self, rec: EventRecord, name: str, result: HookResult) -> None:
        phase = Phase.ON_NOTICE if name == ACK_READY_STEP else Phase.BEFORE_OFFLINE
        self.journal.hook_finished(rec.event_id, phase, name, result.outcome, result.detail)
        level = (
            logging.INFO if result.outcome.success or result.outcome is HookOutcome.SKIPPED else logging.ERROR
        )
        log.log(level, "event_id=%s step=%s: %s %s", rec.event_id, name, result.outcome.value, result.detail)

    # ---- hooks a previous life left running

    def _settle_leftovers(self, rec: EventRecord) -> bool:
        """Wait for (up to its timeout) or end each hook program a killed agent left running, before deciding
        anything about that hook: never run it again beside its first copy. False: asked to stop meanwhile."""
        for hook in rec.hooks:
            if not hook.interrupted or hook.process is None:
                continue
            ident = hook.process
            where = f"event_id={rec.event_id} phase={hook.phase.value} hook={hook.name}"
            if procgroups.alive(ident):
                left_s = self._leftover_time_left(hook)
                log.warning(
                    "%s: still running from before the restart (process group %d): waiting %.0f s at most",
                    where,
                    ident.pgid,
                    left_s,
                )
                gone = procgroups.wait_gone(
                    ident, left_s, sleep=self._sleep, monotonic=self._monotonic, stop=self._stop.is_set
                )
                if not gone and self._stop.is_set():
                    return False  # the next start waits again
                if not gone:
                    procgroups.end(ident)
                    detail = "left running by the previous agent; ended at its timeout"
                    log.error("%s: %s (process group %d)", where, detail, ident.pgid)
                    self.journal.hook_finished(rec.event_id, hook.phase, hook.name, HookOutcome.CUT, detail)
                    self.metrics.hook_done(hook.phase.value, hook.name, 0.0, HookOutcome.CUT.value)
                    continue
                log.warning(
                    "%s: the copy left from before the restart has ended; its result is unknown", where
                )
            self.journal.hook_process(
                rec.event_id, hook.phase, hook.name, None
            )  # interrupted: decided as usual
        return True

    def _leftover_time_left(self, hook: HookRecord) -> float:
        """What is left of a leftover hook's timeout (the one it was started with), from the wall clock."""
        timeout_s = hook.timeout_s
        if timeout_s is None:
            spec = next((s for s in self.config.phase_hooks(hook.phase) if s.name == hook.name), None)
            timeout_s = spec.timeout_s if spec is not None else DEFAULT_HOOK_TIMEOUT_S
        started = hook.started_at if hook.started_at is not None else self._wall()
        return max(0.0, min(timeout_s, started + timeout_s - self._wall()))

    # ---- running a phase

    def _run_phase(self, rec: EventRecord, phase: Phase) -> PhaseReport:
        """Run the phase's hooks (webhooks first), skipping what a previous life finished."""
        specs = sorted(
            self.config.phase_hooks(phase), key=lambda s: 0 if isinstance(s, WebhookHookSpec) else 1
        )
        report = PhaseReport(phase)
        stop_rest = False
        for spec in specs:
            current = self.journal.event(rec.event_id)
            assert current is not None  # noqa: S101  the active event is never pruned
            done = current.hook(phase, spec.name)
            if done is not None and done.finished:
                log.debug(
                    "event_id=%s phase=%s hook=%s already %s",
                    rec.event_id,
                    phase.value,
                    spec.name,
                    done.outcome,
                )
                if done.outcome is not None:
                    report.results.append((spec.name, done.outcome, done.detail))
                continue
            if stop_rest:
                self._skip(rec, phase, spec, "an earlier hook failed and has stop_on_failure", report)
                continue
            if done is not None and done.interrupted:
                if not spec.idempotent:
                    detail = "interrupted by a crash; not idempotent, so not run again"
                    log.error("event_id=%s phase=%s hook=%s %s", rec.event_id, phase.value, spec.name, detail)
                    self.journal.hook_finished(
                        rec.event_id, phase, spec.name, HookOutcome.INTERRUPTED, detail
                    )
                    self.metrics.hook_done(phase.value, spec.name, 0.0, HookOutcome.INTERRUPTED.value)
                    report.results.append((spec.name, HookOutcome.INTERRUPTED, detail))
                    stop_rest = spec.stop_on_failure
                    continue
                log.warning(
                    "event_id=%s phase=%s hook=%s was interrupted by a crash; running it again (idempotent)",
                    rec.event_id,
                    phase.value,
                    spec.name,
                )
            if self._stop.is_set():
                report.finished = False
                return self._done(report)
            outcome = self._run_hook(current, phase, spec, report)
            if not outcome.success and spec.stop_on_failure:
                stop_rest = True
                report.stopped_on_failure = True
        return self._done(report)

    def _done(self, report: PhaseReport) -> PhaseReport:
        self.reports.append(report)
        return report

    def _skip(self, rec: EventRecord, phase: Phase, spec: HookSpec, why: str, report: PhaseReport) -> None:
        log.error("event_id=%s phase=%s hook=%s skipped: %s", rec.event_id, phase.value, spec.name, why)
        self.journal.hook_finished(rec.event_id, phase, spec.name, HookOutcome.SKIPPED, why)
        self.metrics.hook_done(phase.value, spec.name, 0.0, HookOutcome.SKIPPED.value)
        report.results.append((spec.name, HookOutcome.SKIPPED, why))

    def _run_hook(self, rec: EventRecord, phase: Phase, spec: HookSpec, report: PhaseReport) -> HookOutcome:
        timeout_s = spec.timeout_s
        if phase is not Phase.AFTER_MIGRATION and rec.deadline is not None:
            # The margin (room for the ack and power-off) never takes more than a quarter of the notice, so a
            # short notice (demos, tests) still leaves the hooks most of it.
            margin_s = min(self.config.agent.deadline_margin_s, max(0.0, rec.deadline - rec.first_seen) / 4)
            remaining_s = rec.deadline - margin_s - self._wall()
            if remaining_s <= 0:
                self._skip(rec, phase, spec, "the event's deadline has passed", report)
                return HookOutcome.SKIPPED
            if remaining_s < timeout_s:
                log.warning(
                    "event_id=%s phase=%s hook=%s: only %.1f s left before the deadline: it will be cut then",
                    rec.event_id,
                    phase.value,
                    spec.name,
                    remaining_s,
                )
                timeout_s = remaining_s

        def journal_process(pid: int) -> None:
            self.journal.hook_process(rec.event_id, phase, spec.name, procgroups.identify(pid))

        ctx = HookContext(
            event=self._event_info(rec),
            phase=phase,
            data=rec.data,
            monotonic=self._monotonic,
            sleep=self._sleep,
            on_process_start=journal_process,
        )
        log.info(
            "event_id=%s phase=%s hook=%s: starting (%s)", rec.event_id, phase.value, spec.name, spec.kind
        )
        self.journal.hook_started(rec.event_id, phase, spec.name, timeout_s=timeout_s)
        started = self._monotonic()
        try:
            result = self._hook_factory(spec).run(ctx, timeout_s)
        except Exception as e:  # a hook bug is that hook's failure, not the agent's death
            log.exception("event_id=%s phase=%s hook=%s crashed", rec.event_id, phase.value, spec.name)
            result = HookResult.failed(f"crashed: {type(e).__name__}: {e}")
        duration_s = self._monotonic() - started
        if result.outcome is HookOutcome.CUT and timeout_s < spec.timeout_s:
            result = HookResult(result.outcome, f"{result.detail}; cut at the event's deadline", result.data)
        if result.data:
            for key, value in result.data.items():
                self.journal.put_data(rec.event_id, key, value)
        self.journal.hook_finished(rec.event_id, phase, spec.name, result.outcome, result.detail)
        self.metrics.hook_done(phase.value, spec.name, duration_s, result.outcome.value)
        level = logging.INFO if result.outcome.success else logging.ERROR
        log.log(
            level,
            "event_id=%s phase=%s hook=%s: %s in %.1f s: %s",
            rec.event_id,
            phase.value,
            spec.name,
            result.outcome.value,
            duration_s,
            result.detail,
        )
        report.results.append((spec.name, result.outcome, result.detail))
        return result.outcome

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
