"""What must hold when the demo ends: every droplet on exactly one host (the store, the simulator and the
metadata server agree), no event left anywhere, every hook of a moved droplet ran exactly once for the
engine's event and its agent's journal says so; a bystander's agent saw nothing at all.

Each check returns the problems it found, one line each; none means consistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guest_agent.config import Phase
from guest_agent.journal import HookOutcome
from guest_agent.states import EventStatus
from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import SimWorld
from host_engine.errors import HostEngineError
from host_engine.lab.demo.agents import ScenarioAgent
from host_engine.lab.demo.scenario import EVACUATE
from host_engine.lab.launch import MetadataServerProcess
from host_engine.models import Migration
from host_engine.states import MigrationState
from host_engine.store import Store


def check_placement(store: Store, world: SimWorld, migrations: Mapping[str, str]) -> list[str]:
    """Store = simulator for every droplet, each running, nothing left throttled, all off the evacuated host,
    every migration completed to where the store has its droplet."""
    problems = []
    for d in store.list_droplets():
        sim = world.droplets[d.id]
        holding = world.hosts_holding(d.id)
        if sim.host != d.host or holding != [d.host]:
            problems.append(
                f"{d.id}: store says {d.host}, simulator runs it on {sim.host}, images on {holding}"
            )
        if sim.state is not DomainState.RUNNING:
            problems.append(f"{d.id}: {sim.state.value} in the simulator, expected running")
        if sim.throttle_pct or sim.disk_limit_bps is not None:
            problems.append(f"{d.id}: a throttle or disk limit was left on")
        if d.host == EVACUATE:
            problems.append(f"{d.id}: still on {EVACUATE}")
    for did, mid in migrations.items():
        m = store.get_migration(mid)
        if m.state is not MigrationState.COMPLETED:
            problems.append(f"{did}: migration {mid} ended {m.state.value}")
        elif store.get_droplet(did).host != m.target_host:
            problems.append(f"{did}: completed to {m.target_host} but the store has it elsewhere")
    return problems


def check_metadata_server(store: Store, server: MetadataServerProcess | None) -> list[str]:
    """Every droplet registered with its addresses, and no event left on it."""
    if server is None:
        return ["no metadata server"]
    problems = []
    try:
        with server.client() as client:
            listed = {str(doc.get("id")): doc for doc in client.list_droplets()}
    except HostEngineError as e:
        return [f"metadata server: {e}"]
    for d in store.list_droplets():
        doc = listed.get(d.id)
        if doc is None:
            problems.append(f"{d.id}: not registered on the metadata server")
            continue
        if sorted(doc.get("addresses") or []) != sorted(d.addresses):
            problems.append(f"{d.id}: the metadata server has addresses {doc.get('addresses')}")
        if doc.get("event"):
            problems.append(f"{d.id}: an event is left on the metadata server: {doc.get('event')}")
    return problems


def check_hooks(
    store: Store, agents: Mapping[str, ScenarioAgent], migrations: Mapping[str, str]
) -> list[str]:
    """Each moved droplet's hooks (``check_moved``), each bystander's silence (``check_bystander``)."""
    problems = []
    for did, agent in agents.items():
        mid = migrations.get(did)
        if mid is None:
            problems += check_bystander(did, agent)
        else:
            problems += check_moved(did, agent, store.get_migration(mid))
    return problems


def check_bystander(did: str, agent: ScenarioAgent) -> list[str]:
    problems = []
    runs = agent.hook_runs()
    if runs:
        problems.append(f"{did}: hooks ran though it did not move: {[_name(r.phase, r.hook) for r in runs]}")
    seen = sorted(agent.journal().get("events", {}))
    if seen:
        problems.append(f"{did}: its agent saw events {seen} though it did not move")
    return problems


def check_moved(did: str, agent: ScenarioAgent, m: Migration) -> list[str]:
    problems = []
    runs = agent.hook_runs()
    wanted = [(h.phase, h.name) for h in agent.spec.hooks]
    for phase, name in wanted:
        n = sum(1 for r in runs if (r.phase, r.hook) == (phase, name))
        if n != 1:
            problems.append(f"{did}: {_name(phase, name)} ran {n} times, expected exactly once")
    unexpected = [_name(r.phase, r.hook) for r in runs if (r.phase, r.hook) not in wanted]
    if unexpected:
        problems.append(f"{did}: unexpected hook runs {unexpected}")
    live_ids = {r.event_id for r in runs if r.phase is not Phase.AFTER_MIGRATION}
    if live_ids and live_ids != {m.event_id}:
        problems.append(f"{did}: hooks ran for events {sorted(live_ids)}, the engine sent {m.event_id}")
    journal = agent.journal()
    if journal.get("active") is not None:
        problems.append(f"{did}: the agent still has an active event {journal.get('active')}")
    ev = journal.get("events", {}).get(m.event_id)
    if ev is None:
        return [*problems, f"{did}: the agent's journal has no event {m.event_id}"]
    if _status(ev) is not EventStatus.DONE:
        problems.append(f"{did}: the agent's journal says {ev.get('status')}, expected done")
    for phase, name in wanted:
        rec = ev.get("hooks", {}).get(_name(phase, name)) or {}
        if _outcome(rec) is not HookOutcome.OK:
            problems.append(f"{did}: journal has {_name(phase, name)} {rec.get('outcome')}, expected ok")
    return problems


def _name(phase: Phase, hook: str) -> str:
    """How the agent's journal names a hook: ``on_notice/lb-drain``."""
    return f"{phase.value}/{hook}"


def _status(event: Mapping[str, Any]) -> EventStatus | None:
    try:
        return EventStatus(event.get("status"))
    except ValueError:
        return None


def _outcome(record: Mapping[str, Any]) -> HookOutcome | None:
    try:
        return HookOutcome(record.get("outcome"))
    except ValueError:
        return None
