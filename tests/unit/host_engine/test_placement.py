"""Placement: filters, weighers, explanations, and hypothesis properties over random fleets."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_engine.config import Overcommit, PlacementConfig, Weights
from host_engine.models import Droplet, Host, Usage
from host_engine.placement import FILTERS, Placer, placement_order
from host_engine.states import HostState
from tests.unit.host_engine.conftest import GIB

CFG = PlacementConfig()


def host(name: str, **kw: object) -> Host:
    f: dict[str, object] = {
        "datacenter": "nyc1",
        "vcpus": 16,
        "memory_bytes": 64 * GIB,
        "disk_bytes": 1000 * GIB,
        "compat_group": "g1",
    }
    f.update(kw)
    return Host(name=name, **f)  # type: ignore[arg-type]


def drop(did: str, **kw: object) -> Droplet:
    f: dict[str, object] = {"host": "src", "vcpus": 2, "memory_bytes": 4 * GIB, "disk_bytes": 50 * GIB}
    f.update(kw)
    return Droplet(id=did, **f)  # type: ignore[arg-type]


def test_placement_filters_count_each_rejection_once() -> None:
    src = host("src")
    hosts = [
        src,
        host("other-dc", datacenter="ams3"),
        host("down", state=HostState.DOWN),
        host("maint", state=HostState.MAINTENANCE),
        host("old-cpu", compat_group="g0"),
        host("tiny-cpu", vcpus=0),
        host("tiny-mem", memory_bytes=1 * GIB),
        host("tiny-disk", disk_bytes=10 * GIB),
        host("tagged"),
        host("good"),
    ]
    placer = Placer(hosts, {}, {"tagged": {"acme"}}, CFG)
    plan = placer.place([drop("d1", owner_tag="acme")], src, explain=["d1"])
    [c] = plan.choices
    assert c.target == "good"
    assert c.rejected == {
        "datacenter": 1,
        "state": 2,
        "source": 1,
        "compat_group": 1,
        "vcpus": 1,
        "memory": 1,
        "disk": 1,
        "anti_affinity": 1,
    }
    assert c.verdicts is not None
    by_host = {v.host: v for v in c.verdicts}
    assert by_host["good"].accepted and by_host["good"].rank == 1
    assert by_host["tiny-mem"].filter == "memory" and "needs 4GiB" in by_host["tiny-mem"].reason
    assert by_host["tagged"].filter == "anti_affinity"
    assert set(FILTERS) == set(c.rejected)


def test_placement_anti_affinity_can_be_switched_off() -> None:
    src = host("src")
    cfg = PlacementConfig(anti_affinity=False)
    plan = Placer([src, host("tagged")], {}, {"tagged": {"acme"}}, cfg).place(
        [drop("d1", owner_tag="acme")], src
    )
    assert plan.choices[0].target == "tagged"


def test_placement_overcommit_ratios_apply() -> None:
    src = host("src")
    hosts = [src, host("h", vcpus=4)]
    many = [drop(f"d{i}", vcpus=4, memory_bytes=1 * GIB, disk_bytes=1 * GIB) for i in range(5)]
    plan = Placer(hosts, {}, {}, CFG).place(many, src)  # 4 vCPUs x 4.0 = 16 = four droplets of 4
    assert sum(c.placed for c in plan.choices) == 4
    strict = PlacementConfig(overcommit=Overcommit(vcpu=1.0))
    plan = Placer(hosts, {}, {}, strict).place(many, src)
    assert sum(c.placed for c in plan.choices) == 1


def test_placement_counts_planned_moves_and_spreads() -> None:
    src = host("src")
    hosts = [src, host("a"), host("b")]
    # "a" is already receiving 60 GiB of planned moves: only 4 GiB left.
    usage = {"a": Usage(2, 60 * GIB, 10 * GIB, 1)}
    plan = Placer(hosts, usage, {}, CFG).place([drop("d1", memory_bytes=8 * GIB), drop("d2")], src)
    assert plan.choice("d1").target == "b"
    # d2 fits both; "a" is fuller (64/64 memory would be used): b still wins on least_allocated.
    assert plan.choice("d2").target == "b"
    assert plan.choice("d2").runners_up[0][0] == "a"


def test_placement_ties_break_by_name_and_weights_matter() -> None:
    src = host("src")
    plan = Placer([src, host("b"), host("a"), host("c")], {}, {}, CFG).place([drop("d1")], src)
    assert plan.choice("d1").target == "a"
    assert [h for h, _ in plan.choice("d1").runners_up] == ["b", "c"]
    # balanced-only weights prefer the host whose resources are used evenly.
    usage = {"a": Usage(8, 0, 0, 1), "b": Usage(32, 32 * GIB, 500 * GIB, 1)}  # b: half of each
    cfg = PlacementConfig(weights=Weights(least_allocated=0.0, balanced_allocation=1.0))
    plan = Placer([src, host("a"), host("b")], usage, {}, cfg).place([drop("d1")], src)
    assert plan.choice("d1").target == "b"


def test_placement_only_target() -> None:
    src = host("src")
    hosts = [src, host("a"), host("b", memory_bytes=1 * GIB)]
    plan = Placer(hosts, {}, {}, CFG).place([drop("d1")], src, only_target="b", explain=["d1"])
    c = plan.choice("d1")
    assert c.target is None
    assert c.verdicts is not None
    assert {v.host: v.filter for v in c.verdicts}["b"] == "memory"
    assert {v.host: v.filter for v in c.verdicts}["a"] == "only_target"


def test_placement_largest_first() -> None:
    ds = [drop("s", memory_bytes=1 * GIB), drop("l", memory_bytes=8 * GIB), drop("m", memory_bytes=4 * GIB)]
    assert [d.id for d in placement_order(ds)] == ["l", "m", "s"]


# ---- properties ----------------------------------------------------------------------------------------

hosts_st = st.lists(
    st.tuples(
        st.integers(0, 32),  # vcpus
        st.integers(0, 128),  # memory GiB
        st.integers(0, 2000),  # disk GiB
        st.sampled_from(["nyc1", "ams3"]),
        st.sampled_from(["g1", "g2"]),
        st.sampled_from(list(HostState)),
        st.integers(0, 64),  # planned/used vcpus
        st.integers(0, 96),  # planned/used memory GiB
        st.frozensets(st.sampled_from(["acme", "blue", "c"]), max_size=2),
    ),
    min_size=1,
    max_size=12,
)
# Few distinct sizes, so that shapes repeat and the incremental rejection counts get exercised.
droplets_st = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 4, 8, 16]),
        st.sampled_from([0, 1, 4, 16, 64]),
        st.sampled_from([0, 10, 100, 500]),
        st.sampled_from(["", "", "acme", "blue", "c"]),
    ),
    min_size=1,
    max_size=15,
)
ratios_st = st.tuples(st.sampled_from([1.0, 2.0, 4.0]), st.sampled_from([1.0, 1.5]), st.sampled_from([1.0]))


def _fleet(
    raw_hosts: list[tuple[object, ...]], raw_drops: list[tuple[object, ...]]
) -> tuple[Host, list[Host], dict[str, Usage], dict[str, frozenset[str]], list[Droplet]]:
    src = host("src", vcpus=64, memory_bytes=256 * GIB, disk_bytes=4000 * GIB)
    hosts = [src]
    usage: dict[str, Usage] = {}
    tags: dict[str, frozenset[str]] = {}
    for n, (v, m, dsk, dc, grp, state, uv, um, tg) in enumerate(raw_hosts):
        name = f"h{n:02d}"
        hosts.append(
            Host(name, str(dc), int(v), int(m) * GIB, int(dsk) * GIB, str(grp), state)  # type: ignore[call-overload]
        )
        usage[name] = Usage(int(uv), int(um) * GIB, 0, 1)  # type: ignore[call-overload]
        tags[name] = tg  # type: ignore[assignment]
    drops = [
        drop(f"d{n:02d}", vcpus=v, memory_bytes=m * GIB, disk_bytes=dk * GIB, owner_tag=t)
        for n, (v, m, dk, t) in enumerate(raw_drops)  # type: ignore[misc]
    ]
    return src, hosts, usage, tags, drops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts_st, droplets_st, ratios_st, st.booleans())
def test_placement_properties(
    raw_hosts: list[tuple[object, ...]],
    raw_drops: list[tuple[object, ...]],
    ratios: tuple[float, float, float],
    anti: bool,
) -> None:
    src, hosts, usage, tags, drops = _fleet(raw_hosts, raw_drops)
    cfg = PlacementConfig(overcommit=Overcommit(*ratios), anti_affinity=anti)
    plan = Placer(hosts, usage, tags, cfg).place(drops, src)
    # Same inputs, same plan (and independent of the order droplets and hosts are given in).
    again = Placer(list(reversed(hosts)), usage, tags, cfg).place(list(reversed(drops)), src)
    assert again == plan

    by_name = {h.name: h for h in hosts}
    by_id = {d.id: d for d in drops}
    load: dict[str, list[float]] = {
        h.name: [float(usage.get(h.name, Usage()).vcpus), float(usage.get(h.name, Usage()).memory_bytes), 0.0]
        for h in hosts
    }
    placed_tags: dict[str, Counter[str]] = {h.name: Counter(tags.get(h.name, ())) for h in hosts}
    for c in plan.choices:
        if c.target is None:
            continue
        d, h = by_id[c.droplet_id], by_name[c.target]
        assert h.name != src.name
        assert h.state is HostState.ACTIVE and h.datacenter == src.datacenter
        assert h.compat_group == src.compat_group
        load[h.name][0] += d.vcpus
        load[h.name][1] += d.memory_bytes
        load[h.name][2] += d.disk_bytes
        assert load[h.name][0] <= h.vcpus * ratios[0]
        assert load[h.name][1] <= h.memory_bytes * ratios[1]
        assert load[h.name][2] <= h.disk_bytes * ratios[2]
        if anti and d.owner_tag:
            assert placed_tags[h.name][d.owner_tag] == 0
        placed_tags[h.name][d.owner_tag] += 1


@settings(max_examples=60, deadline=None)
@given(hosts_st, droplets_st)
def test_placement_explain_agrees_with_choice(
    raw_hosts: list[tuple[object, ...]], raw_drops: list[tuple[object, ...]]
) -> None:
    src, hosts, usage, tags, drops = _fleet(raw_hosts, raw_drops)
    ids = [d.id for d in drops]
    plan = Placer(hosts, usage, tags, CFG).place(drops, src, explain=ids)
    for c in plan.choices:
        assert c.verdicts is not None
        accepted = [v for v in c.verdicts if v.accepted]
        if c.target is None:
            assert accepted == []
        else:
            assert accepted[0].host == c.target and accepted[0].rank == 1
        rejected = Counter(v.filter for v in c.verdicts if not v.accepted)
        assert {k: v for k, v in c.rejected.items() if v} == dict(rejected)


@pytest.mark.parametrize("n_hosts", [1, 50])
def test_placement_full_datacenter_places_nothing(n_hosts: int) -> None:
    src = host("src")
    hosts = [src] + [host(f"h{i}", memory_bytes=1 * GIB) for i in range(n_hosts)]
    plan = Placer(hosts, {}, {}, CFG).place([drop("d1")], src)
    assert plan.unplaced and plan.choices[0].rejected["memory"] == n_hosts
