"""Hook kinds the agent can run: command, webhook, nested_vms, systemd."""

from __future__ import annotations

from guest_agent.config import CommandHookSpec, HookSpec, NestedVMsHookSpec, SystemdHookSpec, WebhookHookSpec
from guest_agent.hooks.base import EventInfo, Hook, HookContext, HookResult
from guest_agent.hooks.command import CommandHook
from guest_agent.hooks.nested_vms import NestedVMsHook
from guest_agent.hooks.systemd import SystemdHook
from guest_agent.hooks.webhook import WebhookHook

__all__ = ["EventInfo", "Hook", "HookContext", "HookResult", "build_hook"]


def build_hook(spec: HookSpec) -> Hook:
    """The runnable hook for a validated spec."""
    if isinstance(spec, CommandHookSpec):
        return CommandHook(spec)
    if isinstance(spec, WebhookHookSpec):
        return WebhookHook(spec)
    if isinstance(spec, NestedVMsHookSpec):
        return NestedVMsHook(spec)
    if isinstance(spec, SystemdHookSpec):
        return SystemdHook(spec)
    raise TypeError(f"unknown hook spec {type(spec).__name__}")
