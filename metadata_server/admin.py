"""The admin listener: how the host engine tells the server about droplets and events.

Every request needs ``Authorization: Bearer <token>``, compared in constant time. Every write is
committed to the store before the answer, so an acknowledged change survives a crash.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import validate
from .errors import Conflict, NotFound, ValidationError
from .metrics import CONTENT_TYPE, Metrics, exposition, time_flask_app
from .model import Droplet, EventKind, EventState, Expectation, guest_details
from .responses import JSON, NO_STORE, TEXT, error
from .store import Store
from .timefmt import utc_now

log = logging.getLogger(__name__)

MAX_ADMIN_BODY_BYTES = 64 * 1024
_EVENT_FIELDS = {
    "id",
    "event",
    "state",
    "not_before",
    "deadline",
    "expected_downtime_ms",
    "expected_duration_s",
}
_DROPLET_FIELDS = {"addresses", "hostname", "region"}
# Liveness and readiness probes: answered without a token, and say nothing but "ok" / "not ready".
UNAUTHENTICATED_PATHS = frozenset({"/livez", "/readyz"})


def droplet_doc(d: Droplet) -> dict[str, Any]:
    event = d.event
    return {
        "id": d.id,
        "addresses": list(d.addresses),
        "hostname": d.hostname,
        "region": d.region,
        "event": None if event is None else guest_details(event),
        "ack": None
        if event is None or event.ack is None
        else {
            "action": event.ack.action.value,
            "power_on_after": event.ack.power_on_after,
            "at": event.ack.at,
        },
    }


def add_probes(app: Flask, store: Store) -> None:
    """Liveness and readiness for a load balancer, systemd or Kubernetes probe, which has no token.

    Both are exempt from the token (``UNAUTHENTICATED_PATHS``) and answer one word, nothing else.
    """

    @app.get("/livez")
    def livez() -> Response:
        return Response("ok\n", content_type=TEXT, headers=[NO_STORE])

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            store.data_version()  # the state file answers
        except sqlite3.Error:
            log.warning("readiness: the state file does not answer", exc_info=True)
            return Response("not ready\n", status=503, content_type=TEXT, headers=[NO_STORE])
        return Response("ok\n", content_type=TEXT, headers=[NO_STORE])


def create_admin_app(store: Store, token: str, metrics: Metrics | None = None) -> Flask:
    """The admin Flask app. ``token`` is the shared bearer secret (never logged)."""
    metrics = metrics or Metrics()
    app = Flask("metadata_server.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_ADMIN_BODY_BYTES
    expected = f"Bearer {token}".encode()

    def answer(code: int, err: str, message: str, field: str | None = None) -> Response:
        status, headers, body = error(code, err, message, as_json=True, field=field)
        return Response(body, status=status, headers=headers)

    time_flask_app(app, metrics, "admin")

    @app.before_request
    def authenticate() -> Response | None:
        if request.path in UNAUTHENTICATED_PATHS:
            return None
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            response = answer(401, "unauthorized", "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="metadata-server admin"'
            return response
        return None

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        code = e.code or 500
        return answer(code, (e.name or "error").lower().replace(" ", "_"), e.description or "error")

    @app.errorhandler(ValidationError)
    def invalid(e: ValidationError) -> Response:
        return answer(400, e.code, str(e), e.field)

    @app.errorhandler(NotFound)
    def not_found(e: NotFound) -> Response:
        return answer(404, "not_found", str(e))

    @app.errorhandler(Conflict)
    def conflict(e: Conflict) -> Response:
        return answer(409, e.code, str(e))

    def body() -> dict[str, Any]:
        return validate.json_object(request.get_data(cache=False))

    @app.get("/healthz")
    def healthz() -> Response:
        store.data_version()  # the state file answers
        return jsonify(status="ok")

    add_probes(app, store)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(exposition(store, metrics), content_type=CONTENT_TYPE)

    @app.get("/admin/v1/droplets")
    def list_droplets() -> Response:
        return jsonify(droplets=[droplet_doc(d) for d in store.all()])

    @app.get("/admin/v1/droplets/<droplet_id>")
    def get_droplet(droplet_id: str) -> Response:
        return jsonify(droplet_doc(store.get(droplet_id)))

    @app.put("/admin/v1/droplets/<droplet_id>")
    def put_droplet(droplet_id: str) -> tuple[Response, int]:
        validate.droplet_id(droplet_id)
        doc = body()
        validate.no_unknown_fields(doc, _DROPLET_FIELDS)
        droplet, created = store.put_droplet(
            droplet_id,
            validate.addresses(doc),
            validate.optional_text(doc, "hostname"),
            validate.optional_text(doc, "region"),
        )
        log.info(
            "droplet_id=%s %s addresses=%s",
            droplet_id,
            "registered" if created else "updated",
            droplet.addresses,
        )
        return jsonify(droplet_doc(droplet)), 201 if created else 200

    @app.delete("/admin/v1/droplets/<droplet_id>")
    def delete_droplet(droplet_id: str) -> tuple[str, int]:
        store.delete_droplet(droplet_id)
        log.info("droplet_id=%s removed", droplet_id)
        return "", 204

    @app.put("/admin/v1/droplets/<droplet_id>/maintenance")
    def put_event(droplet_id: str) -> tuple[Response, int]:
        doc = body()
        validate.no_unknown_fields(doc, _EVENT_FIELDS)
        event_id = validate.event_id(doc)
        kind = validate.required_member(doc, "event", EventKind)
        state = validate.required_member(doc, "state", EventState)
        not_before = validate.optional_time(doc, "not_before")
        deadline = validate.optional_time(doc, "deadline") or not_before
        validate.deadline_not_before(not_before, deadline)
        expected = Expectation(
            downtime_ms=validate.optional_amount(
                doc, "expected_downtime_ms", validate.MAX_EXPECTED_DOWNTIME_MS
            ),
            duration_s=validate.optional_amount(doc, "expected_duration_s", validate.MAX_EXPECTED_DURATION_S),
        )
        droplet, created = store.set_event(
            droplet_id, event_id, kind, state, not_before, deadline, utc_now(), expected
        )
        log.info("droplet_id=%s event_id=%s set %s %s", droplet_id, event_id, kind.value, state.value)
        return jsonify(droplet_doc(droplet)), 201 if created else 200

    @app.delete("/admin/v1/droplets/<droplet_id>/maintenance")
    def clear_event(droplet_id: str) -> tuple[str, int]:
        store.clear_event(droplet_id)
        log.info("droplet_id=%s event cleared", droplet_id)
        return "", 204

    return app


__all__ = ["JSON", "create_admin_app", "droplet_doc"]
