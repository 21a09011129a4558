"""Hypothesis: whatever the server says, in whatever order, with restarts in between, the agent's promises hold."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_agent.config import Phase
from guest_agent.source import CLEAR, Notice, NoticeKind
from guest_agent.states import EventStatus

from .conftest import World, live, offline

NOTICES = st.one_of(
    st.sampled_from(["a", "b", "c"]).map(live),
    st.sampled_from(["x", "y"]).map(offline),
    st.just(CLEAR),
    st.just(Notice(NoticeKind.OTHER, "reboot_soon")),
    st.none(),  # the service is unreachable: unknown
)
STEPS = st.lists(st.tuples(NOTICES, st.booleans()), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, prefer_offline=st.booleans())
def test_policy_promises_hold_for_any_sequence(
    world_factory: Callable[..., World], steps: list[tuple[Notice | None, bool]], prefer_offline: bool
) -> None:
    w = world_factory(policy=f"prefer_offline = {str(prefer_offline).lower()}")
    w.journal_path.unlink(missing_ok=True)
    w.restart()
    for notice, restart in steps:
        if restart:
            w.restart()
        w.agent.handle(notice)
        rec = w.agent.journal.active()
        # Never restoring while the server still shows that very event.
        if rec is not None and notice is not None and notice.id == rec.server_id:
            assert rec.status not in (EventStatus.RESTORING, EventStatus.DONE)

    runs = Counter((c.event_id, c.phase, c.name) for c in w.recorder.calls)
    assert all(n == 1 for n in runs.values()), runs  # no hook ran twice for one event
    drained = {c.event_id for c in w.recorder.calls if c.phase is Phase.ON_NOTICE}
    for c in w.recorder.calls:
        if c.phase is Phase.AFTER_MIGRATION:
            # restore only what was noticed (a superseding offline event inherits its predecessor's drain)
            assert c.event_id in drained or w.agent.journal.event(c.event_id) is not None
    assert len(w.power_offs) == len({c.event_id for c in w.recorder.calls if c.phase is Phase.BEFORE_OFFLINE})

    # Finally the flag clears and stays clear: everything is restored, nothing is left active.
    w.restart().handle(CLEAR)
    assert w.agent.journal.active() is None
    for ev in w.agent.journal.events():
        assert ev.status in (EventStatus.DONE, EventStatus.SUPERSEDED)
        if ev.status is EventStatus.DONE and ev.hook(Phase.ON_NOTICE, "drain") is not None:
            restore = ev.hook(Phase.AFTER_MIGRATION, "restore")
            assert restore is not None
            assert restore.finished
