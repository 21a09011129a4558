"""``type = "nested_vms"``: nested VMs (libvirt inside the droplet) do not survive a live migration.

In ``on_notice`` / ``before_offline`` the hook records which of the matching domains are running; the
record is kept with the event in the journal (so it survives a crash or the power-off of an offline
migration). In ``after_migration`` it restarts exactly those: a domain still running is reset (or destroyed
and started, or handed to a custom command); one that is shut off — after an offline migration — is
started. Domains that were not running at notice are left alone.

libvirt-python comes from the ``libvirt`` extra (``pip install 'droplet-live-migration[libvirt]'``) and is
imported only here, only when the hook runs, so nothing else in the agent needs it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from guest_agent.config import NestedVMsHookSpec, Phase, RestartMethod
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.hooks.process import run_program
from guest_agent.journal_schema import NESTED_VMS_PREFIX

log = logging.getLogger(__name__)

Connect = Callable[[str], Any]  # uri -> a libvirt.virConnect (or a stand-in with the same methods)


def data_key(uri: str) -> str:
    """Where the record of running domains is kept in the event's journal data."""
    return f"{NESTED_VMS_PREFIX}{uri}"


def libvirt_connect(uri: str) -> Any:
    try:
        import libvirt  # the optional extra: only this hook needs it
    except ImportError as e:
        raise RuntimeError(
            "libvirt-python is not installed: pip install 'droplet-live-migration[libvirt]'"
        ) from e
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    return libvirt.open(uri)


class NestedVMsHook:
    def __init__(self, spec: NestedVMsHookSpec, *, connect: Connect | None = None) -> None:
        self.spec = spec
        self._connect = connect or libvirt_connect

    def describe(self, phase: Phase) -> str:
        if phase is Phase.AFTER_MIGRATION:
            how = {
                RestartMethod.RESET: "reset",
                RestartMethod.DESTROY_START: "destroy and start",
                RestartMethod.COMMAND: f"run {shlex.join(self.spec.command)} for",
            }[self.spec.restart]
            return f"{how} the nested VMs on {self.spec.uri} recorded as running at notice"
        return f"record the running nested VMs on {self.spec.uri} matching {', '.join(self.spec.domains)}"

    def _matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.spec.domains) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.spec.exclude
        )

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        try:
            conn = self._connect(self.spec.uri)
        except Exception as e:  # libvirt.libvirtError or the missing extra: a hook failure, not a crash
            return HookResult.failed(f"cannot connect to {self.spec.uri}: {e}")
        try:
            if ctx.phase is Phase.AFTER_MIGRATION:
                return self._restart(conn, ctx, timeout_s)
            return self._record(conn, ctx)
        finally:
            with contextlib.suppress(Exception):  # closing is best effort
                conn.close()

    def _record(self, conn: Any, ctx: HookContext) -> HookResult:
        try:
            running = sorted(
                d.name() for d in conn.listAllDomains() if d.isActive() and self._matches(d.name())
            )
        except Exception as e:
            return HookResult.failed(f"cannot list domains on {self.spec.uri}: {e}")
        # Union with an earlier record (on_notice, then before_offline): a VM a drain hook stopped in between
        # was still running at notice and must come back.
        earlier = ctx.data.get(data_key(self.spec.uri), {}).get("running", [])
        recorded = sorted(set(running) | set(earlier))
        log.info("hook %s: running nested VMs recorded: %s", self.spec.name, ", ".join(recorded) or "none")
        return HookResult.ok(
            f"recorded {len(recorded)} running", data={data_key(self.spec.uri): {"running": recorded}}
        )

    def _restart(self, conn: Any, ctx: HookContext, timeout_s: float) -> HookResult:
        record = ctx.data.get(data_key(self.spec.uri))
        if record is None:
            return HookResult.failed(
                f"no record of the nested VMs running at notice on {self.spec.uri} "
                "(the agent was not running then, or no nested_vms hook in on_notice)"
            )
        deadline = ctx.monotonic() + timeout_s
        done: list[str] = []
        failed: list[str] = []
        names: Sequence[str] = record.get("running", [])
        for name in names:
            remaining = deadline - ctx.monotonic()
            if remaining <= 0:
                left = len(names) - len(done) - len(failed)
                return HookResult.cut(f"restarted {len(done)}, {left} left at the timeout ({timeout_s:g} s)")
            try:
                how = self._restart_one(conn, name, remaining, ctx)
            except Exception as e:
                log.error("hook %s: nested VM %s: restart failed: %s", self.spec.name, name, e)
                failed.append(name)
                continue
            log.info("hook %s: nested VM %s: %s", self.spec.name, name, how)
            done.append(name)
        if failed:
            return HookResult.failed(f"restarted {len(done)}; failed: {', '.join(failed)}")
        return HookResult.ok(f"restarted {len(done)}: {', '.join(done) or 'none'}")

    def _restart_one(self, conn: Any, name: str, remaining_s: float, ctx: HookContext) -> str:
        if self.spec.restart is RestartMethod.COMMAND:
            argv = [arg.replace("{domain}", name) for arg in self.spec.command]
            env = dict(os.environ, NESTED_VM=name)
            result = run_program(
                argv,
                label=f"hook {self.spec.name} {name}",
                timeout_s=remaining_s,
                env=env,
                on_start=ctx.on_process_start,
            )
            if not result.ok:
                raise RuntimeError(result.describe())
            return f"restarted by {shlex.join(argv)}"
        dom = conn.lookupByName(name)
        if not dom.isActive():
            dom.create()
            return "was shut off; started"
        if self.spec.restart is RestartMethod.RESET:
            dom.reset(0)
            return "reset"
        dom.destroy()
        dom.create()
        return "destroyed and started"
