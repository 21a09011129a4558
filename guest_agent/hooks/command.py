"""``type = "command"``: run a program (argv, no shell) with the event JSON on stdin.

Environment: the agent's own, plus ``MAINTENANCE_EVENT`` (``live_migrate``/``offline_migrate``),
``MAINTENANCE_EVENT_ID``, ``MAINTENANCE_DEADLINE`` (RFC 3339, empty when unknown), ``MAINTENANCE_NOT_BEFORE``,
``MAINTENANCE_PHASE``, ``MAINTENANCE_HOOK``, ``MAINTENANCE_SIMULATED`` (``1`` under ``simulate``), plus the
hook's ``env`` table. Exit status 0 is success.
"""

from __future__ import annotations

import json
import os
import shlex

from guest_agent.config import CommandHookSpec, Phase
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.hooks.process import run_program


class CommandHook:
    def __init__(self, spec: CommandHookSpec) -> None:
        self.spec = spec

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        env = dict(os.environ)
        env.update(ctx.event.environment(ctx.phase, self.spec.name))
        env.update(dict(self.spec.env))
        payload = json.dumps(ctx.event.to_json(ctx.phase, self.spec.name)).encode("utf-8") + b"\n"
        result = run_program(
            self.spec.command,
            label=f"hook {self.spec.name}",
            timeout_s=timeout_s,
            stdin=payload,
            env=env,
            cwd=self.spec.cwd,
            on_start=ctx.on_process_start,
        )
        if result.timed_out:
            return HookResult.cut(f"{result.describe()} ({timeout_s:g} s)")
        if result.ok:
            return HookResult.ok(result.describe())
        return HookResult.failed(result.describe())

    def describe(self, phase: Phase) -> str:
        return f"run {shlex.join(self.spec.command)} (timeout {self.spec.timeout_s:g} s)"
