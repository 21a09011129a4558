"""The steps of the shutdown path around the ``before_offline`` hooks: the ack ``offline`` (retried while
the metadata server is unreachable), the power-off command (never run twice for one event), and the ack
``ready`` of a drained live event. Each is journaled like a hook (``@``-named, in its phase), so a new
process knows which were done.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

from tenacity import RetryCallState

from guest_agent.config import AgentConfig, Phase
from guest_agent.errors import AckRejected, MetadataUnreachable
from guest_agent.hooks.base import HookResult
from guest_agent.hooks.process import run_program
from guest_agent.journal import EventRecord, Journal
from guest_agent.source import EventSource
from guest_agent.states import HookOutcome
from guest_sdk import AckAction
from guest_sdk.retry import RetryPolicy

log = logging.getLogger(__name__)

# Steps of the shutdown path, journaled like hooks ("@" cannot start a user hook's name).
ACK_READY_STEP = "@ack-ready"
ACK_OFFLINE_STEP = "@ack-offline"
POWER_OFF_STEP = "@power-off"
# The ack ``offline`` while the metadata server is unreachable: 5 attempts, full-jitter exponential
# backoff from 1 s (capped at 8 s; under 15 s of waits in all, as the fixed 1+2+4+8 s before), then give up
# on it and go on: the engine also treats a droplet found shut off as offline. Jittered, so the droplets of
# one host do not all retry in the same second.
ACK_RETRY = RetryPolicy(attempts=5, initial_backoff_s=1.0, max_backoff_s=8.0, budget_s=15.0)


class AckOutcome(enum.Enum):
    """How the ack ``offline`` step ended, which decides whether the agent powers off."""

    DONE = "done"  # sent, or not needed, or given up on (power off anyway)
    REFUSED = "refused"  # the event is no longer the current one: do not power off
    STOPPED = "stopped"  # a stop was requested while retrying


class ShutdownSteps:
    """The journaled steps for the agent. ``config`` and ``source`` are read at every use (the agent reloads
    them); ``power_off`` replaces the configured command (tests); ``simulated`` sends and runs nothing."""

    def __init__(
        self,
        config: Callable[[], AgentConfig],
        journal: Journal,
        *,
        source: Callable[[], EventSource | None],
        power_off: Callable[[float], HookResult] | None,
        monotonic: Callable[[], float],
        sleep: Callable[[float], None],
        stop: threading.Event,
        simulated: bool,
    ) -> None:
        self._config = config
        self.journal = journal
        self._source = source
        self._power_off = power_off or self._run_power_off_command
        self._monotonic = monotonic
        self._sleep = sleep
        self._stop = stop
        self._simulated = simulated

    def ack_offline(self, rec: EventRecord) -> AckOutcome:  # noqa: PLR0911  each way out is a different outcome
        """Send the ack ``offline`` (retried a few times; a stop request leaves it for the next start)."""
        step = self.journal.event(rec.event_id)
        done = step.hook(Phase.BEFORE_OFFLINE, ACK_OFFLINE_STEP) if step else None
        if done is not None and done.finished:
            return (
                AckOutcome.REFUSED
                if done.outcome is HookOutcome.FAILED and "refused" in done.detail
                else AckOutcome.DONE
            )
        source = self._source()
        if self._simulated or source is None:
            self._record_step(rec, ACK_OFFLINE_STEP, HookResult(HookOutcome.SKIPPED, "simulated: not sent"))
            return AckOutcome.DONE
        if rec.server_id is None:
            self._record_step(
                rec, ACK_OFFLINE_STEP, HookResult(HookOutcome.SKIPPED, "text-only server: cannot acknowledge")
            )
            return AckOutcome.DONE
        power_on_after = self._config().agent.power_on_after
        self.journal.hook_started(rec.event_id, Phase.BEFORE_OFFLINE, ACK_OFFLINE_STEP)

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
            retrying(source.acknowledge, rec.server_id, AckAction.OFFLINE, power_on_after=power_on_after)
        except AckRejected as e:
            self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.failed(f"refused: {e}"))
            return AckOutcome.REFUSED
        except MetadataUnreachable as e:
            if self._stop.is_set():
                return AckOutcome.STOPPED  # started, never finished: the next start sends it again
            self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.failed(f"not delivered: {e}"))
            return AckOutcome.DONE
        self._finish_step(rec, ACK_OFFLINE_STEP, HookResult.ok(f"offline, power_on_after={power_on_after}"))
        return AckOutcome.DONE

    def power_off(self, rec: EventRecord) -> None:
        """Run the power-off command, once per event across agent lives (never twice)."""
        current = self.journal.event(rec.event_id)
        done = current.hook(Phase.BEFORE_OFFLINE, POWER_OFF_STEP) if current else None
        if done is not None and done.started_at is not None:
            # Started in an earlier life: the machine may already have been powered off once. Never twice.
            if done.interrupted:
                self._finish_step(rec, POWER_OFF_STEP, HookResult(HookOutcome.INTERRUPTED, "not repeated"))
            return
        cmd = " ".join(self._config().agent.power_off_command)
        if self._simulated:
            log.warning("simulate: would power off now with: %s (not run)", cmd)
            self._record_step(
                rec, POWER_OFF_STEP, HookResult(HookOutcome.SKIPPED, f"simulated: would run {cmd}")
            )
            return
        log.warning("event_id=%s: powering off: %s", rec.event_id, cmd)
        self.journal.hook_started(rec.event_id, Phase.BEFORE_OFFLINE, POWER_OFF_STEP)
        result = self._power_off(self._config().agent.power_off_timeout_s)
        self._finish_step(rec, POWER_OFF_STEP, result)

    def _run_power_off_command(self, timeout_s: float) -> HookResult:
        result = run_program(self._config().agent.power_off_command, label="power-off", timeout_s=timeout_s)
        return HookResult.ok(result.describe()) if result.ok else HookResult.failed(result.describe())

    def maybe_ack_ready(self, rec: EventRecord) -> None:
        """Acknowledge ``ready`` once per event, when configured and every drain hook succeeded."""
        source = self._source()
        if not self._config().agent.acknowledge_ready or rec.server_id is None or source is None:
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
            power_on_after = self._config().agent.power_on_after
            source.acknowledge(rec.server_id, AckAction.READY, power_on_after=power_on_after)
        except (AckRejected, MetadataUnreachable) as e:
            self._finish_step(rec, ACK_READY_STEP, HookResult.failed(str(e)))
        else:
            self._finish_step(rec, ACK_READY_STEP, HookResult.ok(AckAction.READY.value))

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
