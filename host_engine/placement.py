"""Placement (docs/host-engine.md, "Placement: where, and why"): which host takes each droplet, and why.

Filters, then weighers, in the shape of OpenStack Nova's scheduler:

* filters drop, in this order, hosts in another ``datacenter``, not ``active`` (``state``), the ``source``,
  another ``compat_group`` (CPU model / hypervisor version: live migration needs the same), and hosts without
  room for the droplet's ``vcpus`` / ``memory`` / ``disk`` — room being raw capacity x the over-commit ratio,
  minus the droplets on the host and every active migration already heading there (including the ones placed
  earlier in the same plan) — and, when anti-affinity is on, hosts that already hold (or will receive) a
  droplet with the same non-empty owner tag (``anti_affinity``);
* weighers score what is left from the host's committed fractions ``u`` (used / allowed, per resource):
  ``least_allocated = mean(1 - u)`` (prefer emptier hosts) and ``balanced_allocation = 1 - stdev(u)``
  (prefer hosts whose resources are used evenly, as Kubernetes' NodeResourcesBalancedAllocation), combined
  with the configured weights. Scores depend only on the host, so they are computed once per host and again
  only for a host that just received a droplet; the highest wins, ties broken by host name.

Droplets are placed largest first (memory, then vCPUs, then disk, then id), so big ones are not left without
room by small ones. The same inputs always give the same plan.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from host_engine.config import PlacementConfig
from host_engine.models import Droplet, Host, Usage
from host_engine.states import HostState
from host_engine.units import format_size

#: Filter names, in the order they run (a host is counted against the first filter that rejects it).
STATIC_FILTERS = ("datacenter", "state", "source", "compat_group")
DYNAMIC_FILTERS = ("vcpus", "memory", "disk", "anti_affinity")
FILTERS = STATIC_FILTERS + DYNAMIC_FILTERS
SCORE_DIGITS = 6


@dataclass(frozen=True)
class Verdict:
    """One host's verdict for one droplet (``--explain``)."""

    host: str
    accepted: bool
    filter: str | None = None
    reason: str = ""
    score: float | None = None
    components: Mapping[str, float] = field(default_factory=dict)
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "accepted": self.accepted,
            "filter": self.filter,
            "reason": self.reason,
            "score": self.score,
            "components": dict(self.components),
            "rank": self.rank,
        }


@dataclass(frozen=True)
class Choice:
    """Where one droplet goes, with the runners-up and how many hosts each filter rejected."""

    droplet_id: str
    target: str | None
    score: float | None
    runners_up: tuple[tuple[str, float], ...]
    rejected: Mapping[str, int]
    hosts_considered: int
    verdicts: tuple[Verdict, ...] | None = None

    @property
    def placed(self) -> bool:
        return self.target is not None

    def summary_of_rejections(self) -> str:
        parts = [f"{n} {name}" for name, n in self.rejected.items() if n]
        return ", ".join(parts) if parts else "none"

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "droplet": self.droplet_id,
            "target": self.target,
            "score": self.score,
            "runners_up": [{"host": h, "score": s} for h, s in self.runners_up],
            "rejected": dict(self.rejected),
            "hosts_considered": self.hosts_considered,
        }
        if self.verdicts is not None:
            doc["verdicts"] = [v.to_dict() for v in self.verdicts]
        return doc


@dataclass(frozen=True)
class Plan:
    """A placement for every droplet asked about, in placement order."""

    source: str
    choices: tuple[Choice, ...]

    @property
    def unplaced(self) -> list[Choice]:
        return [c for c in self.choices if not c.placed]

    def choice(self, droplet_id: str) -> Choice:
        for c in self.choices:
            if c.droplet_id == droplet_id:
                return c
        raise KeyError(droplet_id)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "choices": [c.to_dict() for c in self.choices]}


def placement_order(droplets: Iterable[Droplet]) -> list[Droplet]:
    """Largest first; ids break ties so the order never depends on the input's order."""
    return sorted(droplets, key=lambda d: (-d.memory_bytes, -d.vcpus, -d.disk_bytes, d.id))


class Placer:
    """Places droplets on a fleet snapshot. Each placement is counted against its host for the next ones.

    ``usage`` is what each host already carries (droplets + active incoming migrations, see
    :meth:`host_engine.store.Tx.usage_by_host`); ``tags`` the owner tags present or arriving on each host.
    """

    def __init__(
        self,
        hosts: Sequence[Host],
        usage: Mapping[str, Usage],
        tags: Mapping[str, Iterable[str]],
        config: PlacementConfig,
    ) -> None:
        self.config = config
        self.hosts = sorted(hosts, key=lambda h: h.name)
        oc = config.overcommit
        self._cap_v = [h.vcpus * oc.vcpu for h in self.hosts]
        self._cap_m = [h.memory_bytes * oc.memory for h in self.hosts]
        self._cap_d = [h.disk_bytes * oc.disk for h in self.hosts]
        empty = Usage()
        self._used_v = [float(usage.get(h.name, empty).vcpus) for h in self.hosts]
        self._used_m = [float(usage.get(h.name, empty).memory_bytes) for h in self.hosts]
        self._used_d = [float(usage.get(h.name, empty).disk_bytes) for h in self.hosts]
        self._tags = [set(tags.get(h.name, ())) for h in self.hosts]
        self._tag_hosts: dict[str, set[int]] = {}
        for i, host_tags in enumerate(self._tags):
            for tag in host_tags:
                self._tag_hosts.setdefault(tag, set()).add(i)
        self._index = {h.name: i for i, h in enumerate(self.hosts)}

    # ---- weighers ----------------------------------------------------------------------------------------

    def _fractions(self, i: int) -> tuple[float, float, float]:
        def frac(used: float, cap: float) -> float:
            return 1.0 if cap <= 0 else min(1.0, used / cap)

        return (
            frac(self._used_v[i], self._cap_v[i]),
            frac(self._used_m[i], self._cap_m[i]),
            frac(self._used_d[i], self._cap_d[i]),
        )

    def components(self, i: int) -> dict[str, float]:
        u = self._fractions(i)
        mean = sum(u) / 3
        least = 1.0 - mean
        balanced = 1.0 - math.sqrt(sum((x - mean) ** 2 for x in u) / 3)
        return {
            "least_allocated": round(least, SCORE_DIGITS),
            "balanced_allocation": round(balanced, SCORE_DIGITS),
        }

    def score(self, i: int) -> float:
        c = self.components(i)
        w = self.config.weights
        return round(
            w.least_allocated * c["least_allocated"] + w.balanced_allocation * c["balanced_allocation"],
            SCORE_DIGITS,
        )

    # ---- filters -----------------------------------------------------------------------------------------

    def _static_reject(self, host: Host, source: Host) -> tuple[str, str] | None:
        if host.datacenter != source.datacenter:
            return "datacenter", f"in {host.datacenter}, not {source.datacenter}"
        if host.state is not HostState.ACTIVE:
            return "state", f"host is {host.state.value}"
        if host.name == source.name:
            return "source", "the droplet's own host"
        if host.compat_group != source.compat_group:
            return "compat_group", f"group {host.compat_group!r}, source has {source.compat_group!r}"
        return None

    def _dynamic_reject(self, i: int, d: Droplet) -> tuple[str, str] | None:
        oc = self.config.overcommit
        h = self.hosts[i]
        free_v = self._cap_v[i] - self._used_v[i]
        if free_v < d.vcpus:
            return "vcpus", (
                f"needs {d.vcpus} vCPUs, {free_v:g} free of {self._cap_v[i]:g} ({h.vcpus} x {oc.vcpu:g})"
            )
        free_m = self._cap_m[i] - self._used_m[i]
        if free_m < d.memory_bytes:
            return "memory", (
                f"needs {format_size(d.memory_bytes)}, {format_size(int(free_m))} free of "
                f"{format_size(int(self._cap_m[i]))} ({format_size(h.memory_bytes)} x {oc.memory:g})"
            )
        free_d = self._cap_d[i] - self._used_d[i]
        if free_d < d.disk_bytes:
            return "disk", (
                f"needs {format_size(d.disk_bytes)} of disk, {format_size(int(free_d))} free of "
                f"{format_size(int(self._cap_d[i]))} ({format_size(h.disk_bytes)} x {oc.disk:g})"
            )
        if self.config.anti_affinity and d.owner_tag and d.owner_tag in self._tags[i]:
            return "anti_affinity", f"already holds a droplet tagged {d.owner_tag!r}"
        return None

    # ---- placing -----------------------------------------------------------------------------------------

    def place(
        self,
        droplets: Sequence[Droplet],
        source: Host,
        *,
        explain: Iterable[str] = (),
        only_target: str | None = None,
    ) -> Plan:
        """Choose a target for each droplet (largest first), counting each choice for the next ones.

        ``explain``: droplet ids to attach every host's :class:`Verdict` to. ``only_target``: the one host
        allowed (``migrate --to``); it still has to pass every filter.
        """
        explain_ids = set(explain)
        static_counts = dict.fromkeys(STATIC_FILTERS, 0)
        static_verdicts: dict[int, tuple[str, str]] = {}
        candidates: list[int] = []
        for i, h in enumerate(self.hosts):
            rej = self._static_reject(h, source)
            if rej is None and only_target is not None and h.name != only_target:
                continue
            if rej is None:
                candidates.append(i)
            else:
                static_counts[rej[0]] += 1
                static_verdicts[i] = rej
        # Ranking: (-score, name) ascending = best first. Updated only for hosts that receive a droplet.
        ranking = sorted((-self.score(i), self.hosts[i].name, i) for i in candidates)
        runners = self.config.runners_up
        choices = []
        # Capacity rejections per droplet shape, counted once over all candidates, then kept up to date
        # incrementally: a placement changes one host, so only that host's verdict can change.
        shape_counts: dict[tuple[int, int, int], list[int]] = {}
        candidate_set = set(candidates)
        for d in placement_order(droplets):
            shape = (d.vcpus, d.memory_bytes, d.disk_bytes)
            if shape not in shape_counts:
                shape_counts[shape] = self._count_capacity(candidates, *shape)
            cv, cm, cd = shape_counts[shape]
            counts = dict(static_counts)
            counts.update(
                vcpus=cv, memory=cm, disk=cd, anti_affinity=self._count_anti_affinity(candidate_set, d)
            )
            picked: list[tuple[str, float, int]] = []
            for neg, name, i in ranking:
                if self._dynamic_reject(i, d) is None:
                    picked.append((name, -neg, i))
                    if len(picked) > runners:
                        break
            verdicts = self._verdicts(d, source, static_verdicts, ranking) if d.id in explain_ids else None
            if picked:
                name, score, i = picked[0]
                choices.append(
                    Choice(
                        d.id,
                        name,
                        score,
                        tuple((n, s) for n, s, _ in picked[1:]),
                        counts,
                        len(self.hosts),
                        verdicts,
                    )
                )
                old = (-score, name, i)
                del ranking[bisect.bisect_left(ranking, old)]
                self._commit(i, d, shape_counts)
                bisect.insort(ranking, (-self.score(i), name, i))
            else:
                choices.append(Choice(d.id, None, None, (), counts, len(self.hosts), verdicts))
        return Plan(source.name, tuple(choices))

    def _commit(self, i: int, d: Droplet, shape_counts: dict[tuple[int, int, int], list[int]]) -> None:
        """Count ``d`` against host ``i``, and move ``i`` between the shapes' rejection counts."""
        before = {s: self._capacity_category(i, *s) for s in shape_counts}
        self._used_v[i] += d.vcpus
        self._used_m[i] += d.memory_bytes
        self._used_d[i] += d.disk_bytes
        if d.owner_tag:
            self._tags[i].add(d.owner_tag)
            self._tag_hosts.setdefault(d.owner_tag, set()).add(i)
        for s, was in before.items():
            now = self._capacity_category(i, *s)
            if now != was:
                if was:
                    shape_counts[s][was - 1] -= 1
                if now:
                    shape_counts[s][now - 1] += 1

    def _capacity_category(self, i: int, rv: int, rm: int, rd: int) -> int:
        """0: room for the shape; 1, 2, 3: rejected by the vcpus, memory, disk filter."""
        if self._cap_v[i] - self._used_v[i] < rv:
            return 1
        if self._cap_m[i] - self._used_m[i] < rm:
            return 2
        if self._cap_d[i] - self._used_d[i] < rd:
            return 3
        return 0

    def _count_capacity(self, candidates: Sequence[int], rv: int, rm: int, rd: int) -> list[int]:
        # The one full pass per droplet shape: plain locals, no calls.
        cap_v, cap_m, cap_d = self._cap_v, self._cap_m, self._cap_d
        used_v, used_m, used_d = self._used_v, self._used_m, self._used_d
        cv = cm = cd = 0
        for i in candidates:
            if cap_v[i] - used_v[i] < rv:
                cv += 1
            elif cap_m[i] - used_m[i] < rm:
                cm += 1
            elif cap_d[i] - used_d[i] < rd:
                cd += 1
        return [cv, cm, cd]

    def _count_anti_affinity(self, candidates: set[int], d: Droplet) -> int:
        """Candidates with room for ``d`` that the anti-affinity filter rejects (few: hosts with its tag)."""
        if not (self.config.anti_affinity and d.owner_tag):
            return 0
        shape = (d.vcpus, d.memory_bytes, d.disk_bytes)
        return sum(
            1
            for i in self._tag_hosts.get(d.owner_tag, ())
            if i in candidates and self._capacity_category(i, *shape) == 0
        )

    def _verdicts(
        self,
        d: Droplet,
        source: Host,
        static: Mapping[int, tuple[str, str]],
        ranking: Sequence[tuple[float, str, int]],
    ) -> tuple[Verdict, ...]:
        rank_of: dict[int, int] = {}
        rank = 0
        for _neg, _name, i in ranking:
            if self._dynamic_reject(i, d) is None:
                rank += 1
                rank_of[i] = rank
        out = []
        for i, h in enumerate(self.hosts):
            rej = static.get(i) or self._dynamic_reject(i, d)
            if rej is None and i not in rank_of:
                rej = ("only_target", "not the host asked for")
            if rej is not None:
                out.append(Verdict(h.name, False, rej[0], rej[1]))
            else:
                out.append(Verdict(h.name, True, None, "", self.score(i), self.components(i), rank_of[i]))
        out.sort(key=lambda v: (v.rank is None, v.rank or 0, v.host))
        return tuple(out)
