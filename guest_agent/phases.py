"""Running a phase's hooks for one event, journaled before and after each, so a new process skips what a
killed one finished and knows what it interrupted; and settling hook programs a killed agent left running.

The agent (``agent.py``) decides *which* phase runs; :class:`PhaseRunner` runs it: webhooks first, each hook
with its own timeout cut short by the event's deadline, ``stop_on_failure`` skipping the rest, a crash-
interrupted hook re-run only when it is idempotent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from guest_agent import procgroups
from guest_agent.config import DEFAULT_HOOK_TIMEOUT_S, AgentConfig, HookSpec, Phase, WebhookHookSpec
from guest_agent.hooks import Hook
from guest_agent.hooks.base import EventInfo, HookContext, HookResult
from guest_agent.journal import EventRecord, HookRecord, Journal
from guest_agent.metrics import Metrics
from guest_agent.states import HookOutcome

log = logging.getLogger(__name__)


@dataclass
class PhaseReport:
    phase: Phase
    finished: bool = True  # False: stopped by a signal before every hook was handled
    stopped_on_failure: bool = False
    results: list[tuple[str, HookOutcome, str]] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, HookOutcome, str]]:
        return [r for r in self.results if not r[1].success]


class PhaseRunner:
    """Runs phases for the agent, with its journal, clocks and stop flag. ``config`` is read at every use
    (the agent reloads it); every finished :class:`PhaseReport` is appended to ``reports``."""

    def __init__(
        self,
        config: Callable[[], AgentConfig],
        journal: Journal,
        *,
        hook_factory: Callable[[HookSpec], Hook],
        metrics: Metrics,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Callable[[float], None],
        stop: threading.Event,
        reports: list[PhaseReport],
    ) -> None:
        self._config = config
        self.journal = journal
        self._hook_factory = hook_factory
        self.metrics = metrics
        self._wall = wall
        self._monotonic = monotonic
        self._sleep = sleep
        self._stop = stop
        self.reports = reports

    # ---- hooks a previous life left running

    def settle_leftovers(self, rec: EventRecord) -> bool:
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
                    self.metrics.hook_done(hook.phase.value, hook.name, 0.0, HookOutcome.CUT)
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
            spec = next((s for s in self._config().phase_hooks(hook.phase) if s.name == hook.name), None)
            timeout_s = spec.timeout_s if spec is not None else DEFAULT_HOOK_TIMEOUT_S
        started = hook.started_at if hook.started_at is not None else self._wall()
        return max(0.0, min(timeout_s, started + timeout_s - self._wall()))

    def run(
        self, rec: EventRecord, phase: Phase, event_info: Callable[[EventRecord], EventInfo]
    ) -> PhaseReport:
        """Run the phase's hooks (webhooks first), skipping what a previous life finished. ``event_info``:
        the event as hooks see it, from its journal record."""
        specs = sorted(
            self._config().phase_hooks(phase), key=lambda s: 0 if isinstance(s, WebhookHookSpec) else 1
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
                    self.metrics.hook_done(phase.value, spec.name, 0.0, HookOutcome.INTERRUPTED)
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
            outcome = self._run_hook(current, phase, spec, report, event_info(current))
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
        self.metrics.hook_done(phase.value, spec.name, 0.0, HookOutcome.SKIPPED)
        report.results.append((spec.name, HookOutcome.SKIPPED, why))

    def _run_hook(
        self, rec: EventRecord, phase: Phase, spec: HookSpec, report: PhaseReport, event: EventInfo
    ) -> HookOutcome:
        timeout_s = spec.timeout_s
        if phase is not Phase.AFTER_MIGRATION and rec.deadline is not None:
            # The margin (room for the ack and power-off) never takes more than a quarter of the notice, so a
            # short notice (demos, tests) still leaves the hooks most of it.
            margin_s = min(
                self._config().agent.deadline_margin_s, max(0.0, rec.deadline - rec.first_seen) / 4
            )
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
            event=event,
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
        self.metrics.hook_done(phase.value, spec.name, duration_s, result.outcome)
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
