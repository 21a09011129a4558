"""The demo's guest agents: one ``guest-agent run`` per droplet, from its own 127.0.0.N address, whose hooks
are small commands that say what a real one would do and stamp a line in ``hooks.log``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from guest_agent.config import Phase
from host_engine.lab.demo.scenario import DropletSpec
from host_engine.lab.launch import GuestAgentProcess, agent_config

# One line per hook run: "<unix time> <phase> <hook> <event id> <what it says>". Appending one short line is
# atomic, so the file is both the demo's output and the proof that each hook ran exactly once.
HOOK_SCRIPT = 'echo "$(date +%s.%N) $MAINTENANCE_PHASE $MAINTENANCE_HOOK $MAINTENANCE_EVENT_ID $1" >> "$0"'


class HookRun(NamedTuple):
    """One line of ``hooks.log``."""

    at: float  # unix time the hook started
    phase: Phase
    hook: str
    event_id: str
    says: str


@dataclass
class ScenarioAgent(GuestAgentProcess):
    """``guest-agent run`` for one droplet of the scenario. Build with :meth:`for_droplet`."""

    spec: DropletSpec = field(kw_only=True)
    address: str = field(kw_only=True)

    @classmethod
    def for_droplet(cls, spec: DropletSpec, address: str, workdir: Path) -> ScenarioAgent:
        return cls(workdir, workdir / "config.toml", spec=spec, address=address)

    @property
    def hooks_path(self) -> Path:
        return self.workdir / "hooks.log"

    @property
    def poweroff_path(self) -> Path:
        return self.workdir / "powered-off"

    def write_scenario_config(self, metadata_url: str) -> None:
        """Its config: the droplet's hooks, its owner's offline preference, a harmless power-off command (it
        only leaves a file the demo turns into "the droplet is off" in the simulator)."""
        poweroff = f'echo "$(date +%s.%N) poweroff" >> {self.poweroff_path}'
        hooks: dict[str, list[dict[str, object]]] = {}
        for hook in self.spec.hooks:
            command = ["/bin/sh", "-c", HOOK_SCRIPT, str(self.hooks_path), hook.says]
            hooks.setdefault(hook.phase.value, []).append(
                {"name": hook.name, "command": command, "timeout_s": 10}
            )
        text = agent_config(
            metadata={
                "url": metadata_url,
                "source_address": self.address,
                "timeout_s": 5,
                "max_backoff_s": 1,
            },
            agent={
                "journal_path": str(self.journal_path),
                "prefer_offline": self.spec.prefer_offline,
                "power_on_after": True,
                "power_off_command": ["/bin/sh", "-c", poweroff],
                "power_off_timeout_s": 10,
                "deadline_margin_s": 1,
                "log_level": "info",
            },
            hooks=hooks,
        )
        self.write_config(text)

    def hook_runs(self) -> list[HookRun]:
        """Every hook run so far, oldest first."""
        out = []
        if self.hooks_path.exists():
            for line in self.hooks_path.read_text(errors="replace").splitlines():
                parts = line.split(" ", 4)
                if len(parts) == 5:
                    with contextlib.suppress(ValueError):
                        out.append(HookRun(float(parts[0]), Phase(parts[1]), parts[2], parts[3], parts[4]))
        return out

    def powered_off_at(self) -> float | None:
        """When its power-off command ran (unix time), None while it has not."""
        if not self.poweroff_path.exists():
            return None
        try:
            return float(self.poweroff_path.read_text().split(" ", 1)[0])
        except ValueError:
            return None
