"""wait / wait_until_clear / watch: long-polls with ETags, polling fallback, timeouts — on a fake clock."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_sdk import EventKind, MaintenanceClient, MetadataUnavailable, WaitTimeout
from tests.unit.guest_sdk.conftest import JSON_URL, TEXT_URL, FakeClock, event_json

MakeClient = Callable[..., MaintenanceClient]


@dataclass
class LongPollServer:
    """A fake of our server's JSON long-poll: a timeline of states, each with its ETag.

    ``changes_at`` maps fake-clock times to the document current from then on. A long-poll holds (advancing
    the fake clock) until the next change or its timeout_sec, like the real server.
    """

    clock: FakeClock
    initial: dict[str, object]
    changes_at: list[tuple[float, dict[str, object]]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)

    def current(self) -> dict[str, object]:
        doc = self.initial
        for when, changed in self.changes_at:
            if self.clock.now >= when:
                doc = changed
        return doc

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        self.queries.append(query)
        if query.get("wait_for_change") == "true":
            timeout_sec = int(query["timeout_sec"])
            give_up = self.clock.now + timeout_sec
            last = query["last_etag"].strip('"')
            if self.current()["etag"] == last:
                # Hold until the ETag differs from the caller's (a change to the same content is none).
                upcoming = [
                    when
                    for when, doc in self.changes_at
                    if self.clock.now < when <= give_up and doc["etag"] != last
                ]
                self.clock.now = min(upcoming) if upcoming else give_up
        doc = self.current()
        return 200, {"ETag": f'"{doc["etag"]}"'}, json.dumps(doc)


def serve(http: responses.RequestsMock, server: LongPollServer) -> None:
    http.add_callback(responses.GET, JSON_URL, callback=server, content_type="application/json")


NONE0 = event_json("", etag="e0")
LIVE1 = event_json("live_migrate", etag="e1")
LIVE2 = event_json("live_migrate", state="in_progress", etag="e2")
NONE3 = event_json("", etag="e3")


def test_wait_returns_at_once_when_an_event_is_scheduled(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    server = LongPollServer(fake_clock, LIVE1)
    serve(http, server)
    ev = make_client().wait()
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert len(server.queries) == 1
    assert fake_clock.now == 1000.0


def test_wait_long_polls_with_the_last_etag(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    server = LongPollServer(fake_clock, NONE0, [(1000.0 + 150, LIVE1)])
    serve(http, server)
    ev = make_client().wait()
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert ev.id == "ev-1"
    assert fake_clock.now == 1150.0  # returned on the change, not after a poll interval
    assert fake_clock.sleeps == []  # no polling
    assert server.queries[1:] == [
        {"wait_for_change": "true", "last_etag": "e0", "timeout_sec": "60"},
        {"wait_for_change": "true", "last_etag": "e0", "timeout_sec": "60"},
        {"wait_for_change": "true", "last_etag": "e0", "timeout_sec": "60"},
    ]


def test_wait_long_poll_read_timeout_is_server_wait_plus_margin(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, NONE0, [(1000.0 + 10, LIVE1)]))
    make_client(long_poll_timeout_s=30, long_poll_margin_s=4.0, connect_timeout_s=1.0).wait()
    assert http.calls[1].request.req_kwargs["timeout"] == (1.0, 34.0)  # type: ignore[attr-defined]


def test_wait_times_out_with_wait_timeout(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    server = LongPollServer(fake_clock, NONE0)
    serve(http, server)
    with pytest.raises(WaitTimeout) as info:
        make_client().wait(timeout_s=90)
    assert isinstance(info.value, TimeoutError)
    assert info.value.last_event is not None
    assert info.value.last_event.kind is EventKind.NONE
    assert fake_clock.now == 1090.0  # the long-polls were sized to the time left: 60 then 30
    assert [q.get("timeout_sec") for q in server.queries] == [None, "60", "30"]


def test_wait_timeout_zero_checks_once(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, NONE0))
    with pytest.raises(WaitTimeout):
        make_client().wait(timeout_s=0)
    assert len(http.calls) == 1


def test_wait_until_clear_long_polls_until_the_flag_clears(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, LIVE1, [(1000.0 + 20, LIVE2), (1000.0 + 200, NONE3)]))
    ev = make_client().wait_until_clear(timeout_s=3600)
    assert ev.kind is EventKind.NONE
    assert ev.etag == "e3"
    assert fake_clock.now == 1200.0


def test_wait_polls_a_text_only_server_at_the_interval(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, status=404)
    bodies = iter(["", "", "", "live_migrate\n"])
    http.add_callback(responses.GET, TEXT_URL, callback=lambda _req: (200, {}, next(bodies)))
    ev = make_client(poll_interval_s=2.0).wait(timeout_s=60)
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert fake_clock.sleeps == [2.0, 2.0, 2.0]
    # No request carried long-poll parameters: there was no ETag to pass.
    assert all("wait_for_change" not in str(c.request.url) for c in http.calls)


def test_wait_polling_times_out_on_the_deadline(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, status=404)
    http.get(TEXT_URL, body="")
    with pytest.raises(WaitTimeout):
        make_client(poll_interval_s=2.0).wait(timeout_s=4.5)
    assert fake_clock.sleeps == [2.0, 2.0, 0.5]


def test_wait_falls_back_to_polling_when_server_ignores_long_poll(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    # An ETag on every answer, but wait_for_change is ignored: the answer comes at once, unchanged.
    calls = {"n": 0}

    def answer(_req: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        calls["n"] += 1
        doc = LIVE1 if calls["n"] >= 7 else NONE0
        return 200, {"ETag": f'"{doc["etag"]}"'}, json.dumps(doc)

    http.add_callback(responses.GET, JSON_URL, callback=answer, content_type="application/json")
    client = make_client(poll_interval_s=3.0)
    ev = client.wait(timeout_s=600)
    assert ev.kind is EventKind.LIVE_MIGRATE
    assert not client.uses_long_poll
    # Two early answers get a short pause (a server shutting down answers once early); the third in a
    # row switches to polling, paced by the interval: no hot loop either way.
    assert fake_clock.sleeps == [1.0, 1.0, 3.0, 3.0, 3.0]
    assert calls["n"] == 7


def test_wait_keeps_long_polling_after_one_early_answer(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    # A server restarting gracefully answers its held long-polls at once, unchanged; then it holds again.
    server = LongPollServer(fake_clock, NONE0, [(1000.0 + 500, LIVE1)])
    early = {"left": 1}

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if "wait_for_change" in str(request.url) and early["left"]:
            early["left"] -= 1
            return 200, {"ETag": '"e0"'}, json.dumps(NONE0)
        return server(request)

    http.add_callback(responses.GET, JSON_URL, callback=answer, content_type="application/json")
    client = make_client(poll_interval_s=5.0)
    assert client.wait(timeout_s=3600).kind is EventKind.LIVE_MIGRATE
    assert client.uses_long_poll
    assert fake_clock.sleeps == [1.0]
    assert fake_clock.now == 1500.0


def test_wait_unavailable_while_event_known_is_reported_not_cleared(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, json=LIVE1, headers={"ETag": '"e1"'})
    http.get(JSON_URL, body=requests.exceptions.ConnectionError("metadata server restarting"))
    with pytest.raises(MetadataUnavailable) as info:
        make_client(retry_attempts=3).wait_until_clear(timeout_s=600)
    assert info.value.last_known is not None
    assert info.value.last_known.kind is EventKind.LIVE_MIGRATE


def test_wait_rides_through_a_short_outage(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, json=LIVE1, headers={"ETag": '"e1"'})
    http.get(JSON_URL, status=502)
    http.get(JSON_URL, body=requests.exceptions.ConnectionError("reset"))
    http.get(JSON_URL, json=NONE3, headers={"ETag": '"e3"'})
    ev = make_client().wait_until_clear(timeout_s=600)
    assert ev.kind is EventKind.NONE
    assert len(fake_clock.sleeps) == 2


def test_wait_retries_stop_at_the_wait_deadline(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, status=503, headers={"Retry-After": "30"})
    with pytest.raises(MetadataUnavailable):
        make_client(retry_attempts=10).wait(timeout_s=45)
    assert fake_clock.now <= 1045.0
    assert len(http.calls) == 2  # the 3rd attempt would have been after the deadline


# -- watch ----------------------------------------------------------------------------------------------


def test_watch_yields_each_change_once(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, NONE0, [(1100.0, LIVE1), (1300.0, LIVE2), (1500.0, NONE3)]))
    seen = []
    for ev in make_client().watch():
        seen.append((ev.kind, ev.state, ev.etag))
        if len(seen) == 4:
            break
    assert seen == [
        (EventKind.NONE, None, "e0"),
        (EventKind.LIVE_MIGRATE, "scheduled", "e1"),
        (EventKind.LIVE_MIGRATE, "in_progress", "e2"),
        (EventKind.NONE, None, "e3"),
    ]


def test_watch_ends_cleanly_after_its_timeout(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, NONE0, [(1100.0, LIVE1)]))
    kinds = [ev.kind for ev in make_client().watch(timeout_s=300)]
    assert kinds == [EventKind.NONE, EventKind.LIVE_MIGRATE]
    assert fake_clock.now == 1300.0


def test_watch_ends_when_stop_is_set(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    serve(http, LongPollServer(fake_clock, NONE0, [(1100.0, LIVE1), (1200.0, LIVE2)]))
    stop = threading.Event()
    seen = []
    for ev in make_client().watch(stop=stop):
        seen.append(ev.etag)
        if ev.kind is EventKind.LIVE_MIGRATE:
            stop.set()
    assert seen == ["e0", "e1"]


def test_watch_polls_a_text_only_server(
    http: responses.RequestsMock, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    http.get(JSON_URL, status=404)
    bodies = iter(["", "", "live_migrate", "live_migrate", "live_migrate", "", ""])
    http.add_callback(responses.GET, TEXT_URL, callback=lambda _req: (200, {}, next(bodies)))
    kinds = [ev.kind for ev in make_client(poll_interval_s=1.0).watch(timeout_s=5.5)]
    assert kinds == [EventKind.NONE, EventKind.LIVE_MIGRATE, EventKind.NONE]


PALETTE = [
    event_json("", etag="p0"),
    event_json("live_migrate", etag="p1"),
    event_json("live_migrate", state="in_progress", etag="p2"),
    event_json("offline_migrate", id="ev-2", etag="p3"),
    event_json("live_migrate", acknowledged="ready", etag="p4"),
]


@settings(max_examples=40, deadline=None)
@given(
    initial=st.integers(0, len(PALETTE) - 1),
    timeline=st.lists(
        st.tuples(st.integers(1, 400), st.integers(0, len(PALETTE) - 1)), min_size=0, max_size=12
    ),
    long_poll_s=st.integers(15, 120),
)
def test_watch_yields_exactly_the_changes_each_once(
    initial: int, timeline: list[tuple[int, int]], long_poll_s: int
) -> None:
    clock = FakeClock()
    changes: list[tuple[float, dict[str, object]]] = []
    at = clock.now
    for gap, index in timeline:
        at += gap
        changes.append((at, PALETTE[index]))
    expected = [PALETTE[initial]["etag"]]
    for _, doc in changes:
        if doc["etag"] != expected[-1]:
            expected.append(doc["etag"])
    server = LongPollServer(clock, PALETTE[initial], changes)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        serve(http, server)
        with MaintenanceClient(
            "http://169.254.169.254", sleep=clock.sleep, clock=clock.clock, long_poll_timeout_s=long_poll_s
        ) as client:
            seen = [ev.etag for ev in client.watch(timeout_s=at - clock.now + 1)]
    assert seen == expected
    assert clock.sleeps == []  # all by long-poll
    # Bounded work: one long-poll per change plus one per long_poll_s of quiet time, plus the first read.
    assert len(server.queries) <= 2 + len(changes) + (at - 1000.0 + 1) / long_poll_s + 1
