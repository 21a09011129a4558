"""The guest listener: what a droplet can ask, identified only by its TCP source address.

``GET /v1/maintenance_event`` is the one endpoint every guest polls, so it (and its JSON twin and their
long-polls) is answered by ``GuestApp`` straight from precomputed bytes, before Flask's routing; every
other guest request goes through the Flask app built by ``create_guest_flask``. Both share one
``GuestApp.maintenance`` so there is one implementation of the endpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import validate
from .errors import Conflict, ValidationError
from .hub import Hub
from .metrics import LONG_POLL_KEY, STARTED_KEY, Metrics, time_flask_app
from .model import AckAction, DropletView
from .responses import JSON, NO_STORE, TEXT, Answer, error, status_line
from .store import Store
from .timefmt import utc_now

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
DEFAULT_LONG_POLL_S = 60
DEFAULT_MAX_WAITS_PER_DROPLET = 8
_HOT_PATHS = {"/v1/maintenance_event": False, "/v1/maintenance_event.json": True}
_FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")
_MAX_QUERY_FIELDS = 8


@dataclass(frozen=True)
class GuestSettings:
    # Per worker process: with W workers a droplet can hold at most W times this many long-polls.
    max_waits_per_droplet: int = DEFAULT_MAX_WAITS_PER_DROPLET
    default_long_poll_s: int = DEFAULT_LONG_POLL_S


class GuestApp:
    """The WSGI application of the guest listener."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        metrics: Metrics,
        settings: GuestSettings | None = None,
        now: Callable[[], str] = utc_now,
    ) -> None:
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.settings = settings or GuestSettings()
        self.now = now
        self.flask = create_guest_flask(self)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        as_json = _HOT_PATHS.get(environ.get("PATH_INFO", ""))
        method = environ.get("REQUEST_METHOD")
        if as_json is None or method not in ("GET", "HEAD"):
            environ[STARTED_KEY] = started
            return self.flask(environ, start_response)
        code, headers, body = self.maintenance(environ, as_json)
        path = environ["PATH_INFO"]
        self.metrics.count("guest", path, code)
        if not environ.get(LONG_POLL_KEY):
            self.metrics.observe("guest", path, time.perf_counter() - started)
        start_response(status_line(code), headers)
        return [] if method == "HEAD" else [body]

    # ---- the maintenance event -------------------------------------------------------------------------

    def refusal(self, environ: WSGIEnvironment, as_json: bool) -> Answer | None:
        """Requests no guest endpoint serves: relayed through a proxy, or with an oversized body."""
        for header in _FORWARDED:
            if header in environ:
                return error(
                    403,
                    "forwarded_request",
                    "requests relayed with X-Forwarded-For or Forwarded are refused",
                    as_json=as_json,
                )
        length = environ.get("CONTENT_LENGTH") or "0"
        if not validate.is_ascii_number(length) or int(length) > MAX_BODY_BYTES:
            return error(
                413,
                "body_too_large",
                f"request bodies are limited to {MAX_BODY_BYTES} bytes",
                as_json=as_json,
            )
        return None

    def droplet(self, environ: WSGIEnvironment) -> DropletView | None:
        return self.hub.view_for_address_now(environ.get("REMOTE_ADDR", ""))

    def maintenance(self, environ: WSGIEnvironment, as_json: bool) -> Answer:
        refused = self.refusal(environ, as_json)
        if refused is not None:
            return refused
        view = self.droplet(environ)
        if view is None:
            return _not_a_droplet(environ, as_json)
        query = environ.get("QUERY_STRING", "")
        if not query:
            return _event_answer(view, as_json)
        try:
            wait, etag, timeout_s = self._long_poll_params(query)
        except ValidationError as e:
            return error(400, e.code, str(e), as_json=as_json, field=e.field)
        if not wait:
            return _event_answer(view, as_json)
        return self._long_poll(environ, view, view.etag if etag is None else etag, timeout_s, as_json)

    def _long_poll(
        self, environ: WSGIEnvironment, view: DropletView, etag: str, timeout_s: int, as_json: bool
    ) -> Answer:
        droplet_id = view.droplet.id
        if not self.hub.try_hold(droplet_id, self.settings.max_waits_per_droplet):
            return _retry_later(429, "too_many_waits", "too many long-polls held for this droplet", as_json)
        environ[LONG_POLL_KEY] = True
        self.metrics.held_long_polls.inc()
        try:
            changed = self.hub.wait_for_change(droplet_id, etag, timeout_s)
        finally:
            self.hub.release(droplet_id)
            self.metrics.held_long_polls.dec()
        if self.hub.stopping:
            # Not "unchanged": tell the client to come back, so it never mistakes a server shutting
            # down for one that cannot long-poll.
            return _retry_later(503, "shutting_down", "the metadata server is restarting; retry", as_json)
        if changed is None:
            return _not_a_droplet(environ, as_json)
        return _event_answer(changed, as_json)

    def _long_poll_params(self, query: str) -> tuple[bool, str | None, int]:
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
        except ValueError as e:
            raise ValidationError("malformed query string", field="query") from e

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        wait = validate.wait_flag(one("wait_for_change"))
        etag = validate.last_etag(one("last_etag"))
        timeout_s = validate.timeout_sec(one("timeout_sec"), self.settings.default_long_poll_s)
        return wait, etag, timeout_s


def _event_answer(view: DropletView, as_json: bool) -> Answer:
    body = view.json_body if as_json else view.text_body
    return (
        200,
        [
            ("Content-Type", JSON if as_json else TEXT),
            ("Content-Length", str(len(body))),
            ("ETag", view.quoted_etag),
            NO_STORE,
        ],
        body,
    )


def _retry_later(code: int, err: str, message: str, as_json: bool) -> Answer:
    status, headers, body = error(code, err, message, as_json=as_json)
    return status, [*headers, ("Retry-After", "1")], body


def _not_a_droplet(environ: WSGIEnvironment, as_json: bool) -> Answer:
    address = environ.get("REMOTE_ADDR", "?")
    return error(404, "not_a_droplet", f"no droplet has the address {address}", as_json=as_json)


def create_guest_flask(guest: GuestApp) -> Flask:
    """The Flask app for every guest request but the hot GETs (it routes those too, for 405s)."""
    app = Flask("metadata_server.guest")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    def as_json_path() -> bool:
        return request.path.endswith(".json") or request.path.endswith("/ack")

    def answer(a: Answer) -> Response:
        code, headers, body = a
        return Response(body, status=code, headers=headers)

    time_flask_app(app, guest.metrics, "guest")

    @app.before_request
    def refuse() -> Response | None:
        refused = guest.refusal(request.environ, as_json_path())
        return answer(refused) if refused is not None else None

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        code = e.code or 500
        name = (e.name or "error").lower().replace(" ", "_")
        response = answer(error(code, name, e.description or name, as_json=as_json_path()))
        if code == 405 and hasattr(e, "valid_methods") and e.valid_methods:
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response

    @app.route("/v1/maintenance_event", methods=["GET"])
    def text_event() -> Response:
        return answer(guest.maintenance(request.environ, as_json=False))

    @app.route("/v1/maintenance_event.json", methods=["GET"])
    def json_event() -> Response:
        return answer(guest.maintenance(request.environ, as_json=True))

    @app.route("/v1/maintenance_event/ack", methods=["POST"])
    def ack() -> Response:
        view = guest.droplet(request.environ)
        if view is None:
            return answer(_not_a_droplet(request.environ, True))
        try:
            body = validate.json_object(request.get_data(cache=False))
            validate.no_unknown_fields(body, {"id", "action", "power_on_after"})
            event_id = validate.event_id(body)
            action = validate.required_member(body, "action", AckAction)
            power_on_after = validate.optional_bool(body, "power_on_after", True)
            guest.store.acknowledge(view.droplet.id, event_id, action, power_on_after, guest.now())
        except ValidationError as e:
            return answer(error(400, e.code, str(e), as_json=True, field=e.field))
        except Conflict as e:
            return answer(error(409, e.code, str(e), as_json=True))
        log.info("droplet_id=%s event_id=%s acknowledged %s", view.droplet.id, event_id, action.value)
        guest.hub.refresh()  # our own commit: data_version does not move for it, the sequence does
        updated = guest.hub.view_for_id(view.droplet.id) or view
        return answer(_event_answer(updated, as_json=True))

    def require_droplet() -> DropletView | Response:
        view = guest.droplet(request.environ)
        return view if view is not None else answer(_not_a_droplet(request.environ, as_json_path()))

    @app.route("/metadata/v1/id")
    def droplet_id() -> Response:
        view = require_droplet()
        if isinstance(view, Response):
            return view
        return Response(view.droplet.id, content_type=TEXT, headers=[NO_STORE])

    @app.route("/metadata/v1/hostname")
    def hostname() -> Response:
        view = require_droplet()
        if isinstance(view, Response):
            return view
        return Response(view.droplet.hostname or "", content_type=TEXT, headers=[NO_STORE])

    @app.route("/metadata/v1.json")
    def metadata_json() -> Response:
        view = require_droplet()
        if isinstance(view, Response):
            return view
        doc: dict[str, Any] = {
            "droplet_id": view.droplet.id,
            "hostname": view.droplet.hostname,
            "region": view.droplet.region,
            "maintenance_event": view.details,
        }
        return Response(json.dumps(doc), content_type=JSON, headers=[NO_STORE])

    return app
