"""``guest-agent``: run the daemon, show its state, rehearse the hooks, check a config, install the unit.

Every mistake a user can make (bad config, a second agent on the same journal, an unreachable service in
``status``) is one line on stderr and an exit code that says which kind (``errors.py``).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from guest_agent.agent import Agent
from guest_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, HookSpec, Phase, load_config
from guest_agent.errors import EXIT_UNAVAILABLE, GuestAgentError, HookFailed
from guest_agent.hooks import Hook, build_hook
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.journal import EventRecord, Journal
from guest_agent.source import CLEAR, Notice, NoticeKind, SDKSource
from guest_sdk import daemon_logging
from guest_sdk.daemon_logging import LogFormat, log_format_option

log = logging.getLogger("guest_agent")

UNIT_NAME = "guest-agent.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GuestAgentError as e:
            click.echo(daemon_logging.error_line(f"guest-agent: {e}", "guest_agent"), err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str, log_format: LogFormat | str = LogFormat.AUTO) -> None:
    """The agent logs as the engine and the server do (``guest_sdk.daemon_logging``)."""
    daemon_logging.setup_logging(log_format, level)


class _OneLineUsageErrors(click.Group):
    """A bad flag or value is one line on stderr and exit 2, never a usage dump."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            click.echo(f"guest-agent: error: {e.format_message()}", err=True)
            ctx.exit(2)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            click.echo(f"guest-agent: error: {e.format_message()}", err=True)
            ctx.exit(2)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    envvar="GUEST_AGENT_CONFIG",
    show_default=True,
    help="The TOML config file (also $GUEST_AGENT_CONFIG).",
)


@click.group(cls=_OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="droplet-live-migration", prog_name="guest-agent")
def main() -> None:
    """The guest agent: runs your hooks when this droplet is about to be migrated."""


@main.command()
@config_option
@log_format_option(envvar="GUEST_AGENT_LOG_FORMAT")
@_one_line_errors
def run(config_path: Path, log_format: LogFormat) -> None:
    """Run the agent in the foreground (what the systemd unit starts)."""
    from guest_agent.daemon import Daemon

    config = load_config(config_path)
    setup_logging(config.agent.log_level, log_format)
    daemon = Daemon.open(config, lambda: load_config(config_path))
    sys.exit(daemon.run())


@main.command("check-config")
@config_option
@_one_line_errors
def check_config(config_path: Path) -> None:
    """Validate the config file; print a summary, or one line naming the problem."""
    config = load_config(config_path)
    click.echo(f"{config_path}: OK")
    click.echo(f"  metadata: {config.metadata.url}" + _src(config))
    click.echo(f"  journal: {config.agent.journal_path}")
    click.echo(
        f"  policy: prefer_offline={str(config.agent.prefer_offline).lower()}, "
        f"power_off_command={' '.join(config.agent.power_off_command)}"
    )
    for phase in Phase:
        hooks = config.phase_hooks(phase)
        names = ", ".join(f"{h.name} ({h.kind})" for h in hooks) or "none"
        click.echo(f"  {phase.value}: {names}")


def _src(config: AgentConfig) -> str:
    return f" from {config.metadata.source_address}" if config.metadata.source_address else ""


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_one_line_errors
def status(config_path: Path, as_json: bool) -> None:
    """Show the event the metadata service announces and what the agent did about it."""
    config = load_config(config_path)
    journal = Journal.open(config.agent.journal_path, read_only=True)
    source = SDKSource(config.metadata)
    try:
        notice: Notice | None = source.current()
        error = None
    except GuestAgentError as e:
        notice, error = None, str(e)
    finally:
        source.close()
    active = journal.active()
    recent = journal.events()[-5:]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "metadata": _notice_json(notice) if notice is not None else {"error": error},
                    "active": _record_json(active) if active else None,
                    "recent": [_record_json(r) for r in recent],
                },
                indent=2,
            )
        )
    else:
        if notice is None:
            click.echo(f"metadata: unreachable ({error})")
        elif notice.kind is NoticeKind.NONE:
            click.echo("metadata: no maintenance event")
        else:
            click.echo(
                f"metadata: {notice.raw} (id {notice.id or '-'}, state {notice.state or '-'}, "
                f"deadline {_fmt_dt(notice.deadline)}, acknowledged {notice.acknowledged or '-'})"
            )
        if active is None:
            click.echo("agent: idle")
        for rec in recent:
            _echo_record(rec, active=active is not None and rec.event_id == active.event_id)
    if notice is None:
        sys.exit(EXIT_UNAVAILABLE)


def _echo_record(rec: EventRecord, *, active: bool) -> None:
    marker = "active" if active else "past"
    click.echo(
        f"{marker} event {rec.event_id}: {rec.kind.value}, {rec.status.value}, "
        f"first seen {_fmt_ts(rec.first_seen)}, deadline {_fmt_ts(rec.deadline)}"
    )
    for hook in rec.hooks:
        outcome = (
            hook.outcome.value if hook.outcome else ("running or interrupted" if hook.started_at else "-")
        )
        click.echo(f"  {hook.phase.value}/{hook.name}: {outcome}{' - ' + hook.detail if hook.detail else ''}")


def _notice_json(n: Notice) -> dict[str, Any]:
    return {
        "event": n.raw,
        "id": n.id,
        "state": n.state,
        "not_before": _fmt_dt(n.not_before) if n.not_before is not None else None,  # JSON: null, not "-"
        "deadline": _fmt_dt(n.deadline) if n.deadline is not None else None,
        "acknowledged": n.acknowledged,
    }


def _record_json(rec: EventRecord) -> dict[str, Any]:
    return {
        "id": rec.event_id,
        "kind": rec.kind.value,
        "status": rec.status.value,
        "first_seen": _fmt_ts(rec.first_seen),
        "deadline": _fmt_ts(rec.deadline) if rec.deadline is not None else None,  # JSON: null, not "-"
        "hooks": [
            {
                "phase": h.phase.value,
                "name": h.name,
                "outcome": h.outcome.value if h.outcome else None,
                "detail": h.detail,
                "runs": h.runs,
            }
            for h in rec.hooks
        ],
    }


class _DryRunHook:
    def __init__(self, hook: Hook) -> None:
        self._hook = hook

    @property
    def spec(self) -> HookSpec:
        return self._hook.spec

    def describe(self, phase: Phase) -> str:
        return self._hook.describe(phase)

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        what = self._hook.describe(ctx.phase)
        click.echo(f"  [dry run] {ctx.phase.value}/{self.spec.name}: would {what}")
        return HookResult.ok(f"dry run: would {what}")


@main.command()
@config_option
@click.option(
    "--event",
    "kind",
    type=click.Choice([NoticeKind.LIVE_MIGRATE.value, NoticeKind.OFFLINE_MIGRATE.value]),
    required=True,
    help="The kind of event to rehearse.",
)
@click.option("--dry-run", is_flag=True, help="Only say what each hook would do; run nothing.")
@_one_line_errors
def simulate(config_path: Path, kind: str, dry_run: bool) -> None:
    """Rehearse the hooks against a fake event, without touching the real service.

    Hooks run for real (unless --dry-run) with MAINTENANCE_SIMULATED=1; nothing is acknowledged, the
    power-off command is never run, and the daemon's journal is not touched.
    """
    config = load_config(config_path)
    setup_logging(config.agent.log_level)
    factory: Callable[[HookSpec], Hook] = build_hook
    if dry_run:

        def factory(spec: HookSpec) -> Hook:
            return _DryRunHook(build_hook(spec))

    now = datetime.now(UTC)
    notice = Notice(
        kind=NoticeKind(kind),
        raw=kind,
        id=f"simulated-{kind}-{int(time.time())}",
        state="scheduled",
        not_before=now + timedelta(seconds=config.agent.default_notice_s),
    )
    agent = Agent(config, Journal(None), source=None, hook_factory=factory, simulated=True)
    click.echo(f"simulating {kind} (event id {notice.id}){' - dry run' if dry_run else ''}")
    agent.handle(notice)  # drain, and the shutdown path when it applies
    agent.handle(CLEAR)  # the flag clears: restore
    failures = 0
    for report in agent.reports:
        for name, outcome, detail in report.results:
            failures += not outcome.success
            click.echo(f"{report.phase.value}/{name}: {outcome.value}{' - ' + detail if detail else ''}")
    rec = agent.journal.events()[-1]
    for hook in rec.hooks:
        if hook.name.startswith("@"):
            shown = hook.outcome.value if hook.outcome else "-"
            click.echo(f"{hook.phase.value}/{hook.name}: {shown} - {hook.detail}")
    if failures:
        raise HookFailed(f"{failures} hook(s) did not succeed in the rehearsal")
    click.echo("all hooks succeeded")


@main.command("install-unit")
@config_option
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_UNIT_DIR,
    show_default=True,
    help="Directory to write guest-agent.service into.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing unit file.")
@_one_line_errors
def install_unit(config_path: Path, dest: Path, force: bool) -> None:
    """Write the systemd unit shipped with the package (ExecStart pointing at this installation)."""
    text = importlib.resources.files("guest_agent").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    exe = _agent_executable()
    lines = [
        f"ExecStart={exe} run --config {config_path}" if line.startswith("ExecStart=") else line
        for line in text.splitlines()
    ]
    target = dest / UNIT_NAME
    if target.exists() and not force:
        raise GuestAgentError(f"{target} exists (use --force to overwrite)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise GuestAgentError(f"cannot write {target}: {e.strerror or e}") from e
    click.echo(f"wrote {target}")
    click.echo("next: systemctl daemon-reload && systemctl enable --now guest-agent")


def _agent_executable() -> str:
    beside = Path(sys.executable).parent / "guest-agent"
    if beside.exists():
        return str(beside)
    found = shutil.which("guest-agent")
    return found or "/usr/local/bin/guest-agent"


def _fmt_dt(when: datetime | None) -> str:
    return when.isoformat().replace("+00:00", "Z") if when is not None else "-"


def _fmt_ts(ts: float | None) -> str:
    return _fmt_dt(datetime.fromtimestamp(ts, UTC)) if ts is not None else "-"
