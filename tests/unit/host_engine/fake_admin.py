"""An in-memory stand-in for the metadata server's admin API, faked at the HTTP transport (``responses``).

It keeps just what the engine needs (droplets, their one event) and can be told to fail, so engine and
reconciliation tests run without a real server. The real server is exercised in tests/integration.
:func:`answering` makes any number of them answer for a block.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
import responses

_DROPLET = re.compile(r".*/admin/v1/droplets/(?P<id>[^/]+)$")
_EVENT = re.compile(r".*/admin/v1/droplets/(?P<id>[^/]+)/maintenance$")
# The admin token a FakeAdmin accepts unless told otherwise (what the hosts' token files hold).
TOKEN = "s3cret"


@dataclass
class FakeAdmin:
    base_url: str
    token: str = TOKEN
    droplets: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_next: list[int] = field(default_factory=list)  # status codes to answer before serving normally
    down: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)

    def install(self, rsps: responses.RequestsMock) -> None:
        base = re.escape(self.base_url.rstrip("/"))
        for method in ("GET", "PUT", "DELETE"):
            rsps.add_callback(method, re.compile(base + r"/.*"), callback=self._handle)

    def event(self, droplet_id: str) -> dict[str, Any] | None:
        d = self.droplets.get(droplet_id)
        return None if d is None else d["event"]

    def guest_ack(self, droplet_id: str, action: str, power_on_after: bool = True) -> None:
        """What ``POST /v1/maintenance_event/ack`` from the guest does: answer its current event."""
        d = self.droplets[droplet_id]
        assert d["event"] is not None, "no current event to acknowledge"
        d["event"]["acknowledged"] = action
        d["event"]["power_on_after"] = power_on_after
        d["ack"] = {"action": action, "power_on_after": power_on_after, "at": "2026-01-01T00:00:01Z"}

    def _handle(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:  # noqa: PLR0911
        method, url = request.method or "", request.url or ""
        path = url[len(self.base_url.rstrip("/")) :]
        self.calls.append((method, path))
        if self.down:
            raise requests.ConnectionError("connection refused")
        if self.fail_next:
            return self.fail_next.pop(0), {}, json.dumps({"error": "unavailable", "message": "try later"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {}, json.dumps({"error": "unauthorized", "message": "bad token"})
        body = json.loads(request.body) if request.body else {}
        if path == "/admin/v1/droplets" and method == "GET":
            return 200, {}, json.dumps({"droplets": [self._doc(i) for i in sorted(self.droplets)]})
        m = _EVENT.match(path)
        if m:
            did = m.group("id")
            if did not in self.droplets:
                return 404, {}, json.dumps({"error": "not_found", "message": f"no droplet {did}"})
            if method == "PUT":
                old_event = self.droplets[did]["event"]
                if old_event is None or old_event["id"] != body["id"]:
                    self.droplets[did]["ack"] = None  # a new event drops the ack; the same id keeps it
                ev = {
                    "event": body["event"],
                    "id": body["id"],
                    "state": body["state"],
                    "not_before": body.get("not_before"),
                    "deadline": body.get("deadline") or body.get("not_before"),
                    "notified_at": "2026-01-01T00:00:00Z",
                    "acknowledged": None,
                    "power_on_after": None,
                }
                ack = self.droplets[did].get("ack")
                if ack:
                    ev["acknowledged"], ev["power_on_after"] = ack["action"], ack["power_on_after"]
                self.droplets[did]["event"] = ev
                return 200, {}, json.dumps(self._doc(did))
            if method == "DELETE":
                self.droplets[did]["event"] = None
                self.droplets[did]["ack"] = None
                return 204, {}, ""
        m = _DROPLET.match(path)
        if m:
            did = m.group("id")
            if method == "PUT":
                for other, rec in self.droplets.items():
                    clash = set(rec["addresses"]) & set(body["addresses"])
                    if other != did and clash:
                        msg = f"address {sorted(clash)[0]} already belongs to droplet {other}"
                        return 409, {}, json.dumps({"error": "address_in_use", "message": msg})
                created = did not in self.droplets
                old = self.droplets.get(did, {"event": None})
                self.droplets[did] = {
                    "addresses": body["addresses"],
                    "hostname": body.get("hostname", ""),
                    "region": body.get("region", ""),
                    "event": old["event"],
                    "ack": old.get("ack"),
                }
                return (201 if created else 200), {}, json.dumps(self._doc(did))
            if did not in self.droplets:
                return 404, {}, json.dumps({"error": "not_found", "message": f"no droplet {did}"})
            if method == "GET":
                return 200, {}, json.dumps(self._doc(did))
            if method == "DELETE":
                del self.droplets[did]
                return 204, {}, ""
        return 405, {}, json.dumps({"error": "method_not_allowed", "message": path})

    def _doc(self, did: str) -> dict[str, Any]:
        d = self.droplets[did]
        return {"id": did, **d, "ack": d.get("ack")}


@contextlib.contextmanager
def answering(
    *admins: FakeAdmin, before: Callable[[responses.RequestsMock], None] | None = None
) -> Iterator[responses.RequestsMock]:
    """``admins`` answer every request to their base URLs for the block (a request to any other URL fails, as
    ``responses`` makes it); yields the mock (its ``calls``). ``before`` registers callbacks first, so they are
    matched before the admins' own (a probe the fake does not serve)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        if before is not None:
            before(rsps)
        for admin in admins:
            admin.install(rsps)
        yield rsps
