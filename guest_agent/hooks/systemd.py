"""``type = "systemd"``: ``systemctl stop|start|restart UNIT...`` with the hook's timeout."""

from __future__ import annotations

import os
import shlex

from guest_agent.config import Phase, SystemdHookSpec
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.hooks.process import run_program


class SystemdHook:
    def __init__(self, spec: SystemdHookSpec) -> None:
        self.spec = spec

    def argv(self) -> list[str]:
        return [*self.spec.systemctl, self.spec.action.value, *self.spec.units]

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        env = dict(os.environ)
        env.update(ctx.event.environment(ctx.phase, self.spec.name))
        result = run_program(
            self.argv(),
            label=f"hook {self.spec.name}",
            timeout_s=timeout_s,
            env=env,
            on_start=ctx.on_process_start,
        )
        if result.timed_out:
            return HookResult.cut(f"{result.describe()} ({timeout_s:g} s)")
        if result.ok:
            return HookResult.ok(f"{self.spec.action.value} {' '.join(self.spec.units)}")
        return HookResult.failed(f"systemctl {self.spec.action.value}: {result.describe()}")

    def describe(self, phase: Phase) -> str:
        return f"run {shlex.join(self.argv())} (timeout {self.spec.timeout_s:g} s)"
