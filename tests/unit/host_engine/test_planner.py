"""The planner's spacing and request checks."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_engine.config import EngineConfig, ScheduleConfig
from host_engine.errors import InvalidInput, NoCapacity
from host_engine.models import Droplet
from host_engine.planner import Limits, Request, Slot, estimate, evacuate, lay_out, validate_request
from host_engine.states import HostState
from host_engine.store import Store
from tests.unit.host_engine.conftest import GIB, T0, make_droplet, make_host

CFG = ScheduleConfig(bandwidth_bps=1 * GIB, slot_overhead=timedelta(minutes=1))


def drop(i: int, mem_gib: int = 4, disk_gib: int = 56) -> Droplet:
    return Droplet(f"d{i}", "src", 1, mem_gib * GIB, disk_gib * GIB)


def test_planner_estimate() -> None:
    assert estimate(drop(1), CFG) == timedelta(seconds=60 + 60)  # 60 GiB at 1 GiB/s + 1 min


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 8), st.integers(0, 200)), min_size=1, max_size=25),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 600), st.integers(1, 600)), max_size=5),
)
def test_planner_spacing_never_exceeds_limits(
    moves: list[tuple[int, int, int]],
    max_parallel: int,
    max_per_target: int,
    max_per_source: int,
    existing_raw: list[tuple[int, int, int]],
) -> None:
    limits = Limits(max_parallel, max_per_target, max_per_source)
    existing = [
        Slot("src", f"t{t}", T0 + timedelta(seconds=s), T0 + timedelta(seconds=s + d))
        for t, s, d in existing_raw
    ]
    # The existing slots may themselves break the limits; only count what the planner adds on top.
    triples = [(drop(i, mem, disk), "src", f"t{t}") for i, (t, mem, disk) in enumerate(moves)]
    times = lay_out(triples, T0, limits, CFG, existing)
    slots = [Slot("src", tgt, nb, nb + dur) for (_, _, tgt), (nb, dur) in zip(triples, times, strict=True)]
    assert all(nb >= T0 for nb, _ in times)
    # At any instant inside a planned slot (the busiest instants are slot starts), everything running, the
    # existing migrations included, stays within the limits.
    everything = slots + existing
    for s in slots:
        for at in sorted({o.start for o in everything if s.start <= o.start < s.end}):
            running = [o for o in everything if o.start <= at < o.end]
            assert len(running) <= max_parallel
            assert len(running) <= max_per_source  # every slot leaves "src"
            assert sum(1 for o in running if o.target == s.target) <= max_per_target
    # Deterministic.
    assert lay_out(triples, T0, limits, CFG, existing) == times


def test_planner_spacing_waits_for_existing_migrations() -> None:
    limits = Limits(1, 1, 1)
    existing = [Slot("other", "t0", T0, T0 + timedelta(minutes=5))]
    [(nb, _)] = lay_out([(drop(1), "src", "t1")], T0, limits, CFG, existing)
    assert nb == T0 + timedelta(minutes=5)


@pytest.mark.parametrize(
    ("start_s", "notice_s", "unsafe", "message"),
    [
        (-10, 600, False, "in the past"),
        (3600, 300, False, "shorter than the 10m minimum"),
        (3600, -5, True, "must not be negative"),
        (300, 600, False, "too soon"),
        (30, 60, True, "too soon"),
    ],
)
def test_planner_refuses_bad_requests(start_s: int, notice_s: int, unsafe: bool, message: str) -> None:
    req = Request(
        T0 + timedelta(seconds=start_s),
        timedelta(seconds=notice_s),
        Limits(1, 1, 1),
        unsafe_short_notice=unsafe,
    )
    with pytest.raises(InvalidInput, match=message):
        validate_request(req, ScheduleConfig(), T0)


def test_planner_start_now_read_a_moment_before_the_transaction_is_not_in_the_past() -> None:
    # ``--start now`` / ``migrate --now`` parse "now" just before the transaction reads its own clock.
    req = Request(T0 - timedelta(seconds=2), timedelta(0), Limits(1, 1, 1), unsafe_short_notice=True)
    validate_request(req, ScheduleConfig(), T0)


def test_planner_accepts_short_notice_only_when_unsafe() -> None:
    req = Request(
        T0 + timedelta(seconds=60), timedelta(seconds=30), Limits(1, 1, 1), unsafe_short_notice=True
    )
    validate_request(req, ScheduleConfig(), T0)
    with pytest.raises(InvalidInput):
        Limits(0, 1, 1)


def test_planner_concurrent_evacuations_never_share_room(store: Store) -> None:
    """Two evacuations at once (two connections, SQLite or PostgreSQL): room for one droplet goes to one."""
    for name in ("src1", "src2"):
        store.add_host(make_host(name, vcpus=64, memory_bytes=256 * GIB))
    store.add_host(make_host("target", vcpus=64, memory_bytes=16 * GIB))
    store.add_droplet(make_droplet("a", "src1", memory_bytes=12 * GIB))
    store.add_droplet(make_droplet("b", "src2", memory_bytes=12 * GIB))
    # src1 and src2 go into maintenance as they are evacuated, so "target" is the only possible home.
    req = Request(T0 + timedelta(hours=1), timedelta(minutes=10), Limits(4, 4, 4), requested_by="t")
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def evac(host: str) -> None:
        barrier.wait()
        try:
            evacuate(store, host, req, EngineConfig())
            outcomes[host] = "ok"
        except NoCapacity:
            outcomes[host] = "no capacity"

    threads = [threading.Thread(target=evac, args=(h,)) for h in ("src1", "src2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcomes.values()) == ["no capacity", "ok"]
    [m] = store.list_migrations()
    assert m.target_host == "target"
    loser = "src1" if outcomes["src1"] == "no capacity" else "src2"
    assert store.get_host(loser).state is HostState.ACTIVE  # the refused evacuation changed nothing
