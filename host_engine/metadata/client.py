"""The metadata server's admin API, from the engine's side (docs/metadata-server.md, "Admin API").

:class:`AdminClient` owns a ``requests.Session``, always passes a timeout, sends the bearer token, never
follows redirects, and retries with the project's one retry policy (``guest_sdk.retry``: jittered exponential
back-off, ``Retry-After`` clamped to 1-30 s, a time budget) only what is safe to retry:
connection errors, timeouts, ``429`` and ``5xx``. Every call is idempotent (``PUT`` a whole record, ``DELETE``
that treats ``404`` as done), so a retry after a lost answer changes nothing. Any other ``4xx`` is a
:class:`NotifierError` at once; running out of retries is :class:`AdminAPIUnavailable` (a ``TransientError``).
The token is never logged. The servers' certificates are checked against ``ca_file`` (``[metadata] ca_file``:
a private CA's PEM bundle) or, without it, the CA bundle of the engine's Python environment (certifi's); the
environment (``REQUESTS_CA_BUNDLE``, proxies) is ignored either way.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from guest_sdk.retry import RetryPolicy, parse_retry_after
from host_engine.errors import AdminAPIUnavailable, ConfigError, NotifierError
from host_engine.timeparse import format_time

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ATTEMPTS = 4
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
#: Answers that mean the engine cannot use the server: its token is refused.
TOKEN_REFUSED = frozenset({401, 403})

#: Told the outcome of each request once its retries are over: (the client's base URL, whether the server
#: answered usably). ``host-engine run`` sets the ``host_engine_metadata_server_up`` gauges with it.
RequestObserver = Callable[[str, bool], None]


class _Retryable(Exception):
    """A transient failure inside one attempt (internal: tenacity retries on it)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read metadata server token file {path}: {e.strerror}") from e
    if not token:
        raise ConfigError(f"metadata server token file {path} is empty")
    return token


def check_ca_file(path: str | Path) -> str:
    """``path`` if it is a readable PEM bundle with at least one certificate, else one ``ConfigError``
    naming ``[metadata] ca_file`` (checked when the engine starts, not at the first notice)."""
    try:
        Path(path).read_bytes()
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as e:  # an OSError too: first
        raise ConfigError(
            f"config [metadata] ca_file: {path} holds no usable PEM CA certificate ({e.reason or e})"
        ) from e
    except OSError as e:
        raise ConfigError(f"config [metadata] ca_file: cannot read {path}: {e.strerror or e}") from e
    return str(path)


class AdminClient:
    """A client for one metadata server's admin listener. Use as a context manager (it owns a session)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        sleep: Callable[[float], None] | None = None,
        session: requests.Session | None = None,
        ca_file: str | None = None,
    ) -> None:
        """``ca_file``: the PEM bundle to verify the server's certificate with (default: certifi's)."""
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"metadata server URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self._sleep = sleep
        self.session = session or requests.Session()
        self.session.trust_env = False  # no proxies from the environment on the management network
        if ca_file:
            self.session.verify = check_ca_file(ca_file)
        self.observer: RequestObserver | None = None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"AdminClient({self.base_url!r})"  # never the token

    # ---- transport -----------------------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: Mapping[str, Any] | None) -> requests.Response:
        try:
            r = self.session.request(
                method,
                self.base_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self.timeout_s,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as e:  # not transient: a certificate will not fix itself
            raise NotifierError(f"TLS error talking to {self.base_url}: {e}") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Retryable(f"{method} {self.base_url}{path}: {type(e).__name__}") from e
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(
                f"{method} {self.base_url}{path}: HTTP {r.status_code}",
                parse_retry_after(r.headers.get("Retry-After")),  # the project's one parser (guest_sdk.retry)
            )
        return r

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> requests.Response:
        """One idempotent call, retried on transient failures. Other 4xx are returned to the caller."""
        retrying = RetryPolicy(self.attempts, RETRY_INITIAL_S, RETRY_MAX_S).retrying(
            retry=lambda e: isinstance(e, _Retryable), sleep=self._sleep or time.sleep
        )
        try:
            r: requests.Response = retrying(self._once, method, path, body)
        except _Retryable as e:
            self._observe(False)
            raise AdminAPIUnavailable(
                f"metadata server unavailable after {self.attempts} attempts: {e}"
            ) from e
        except NotifierError:  # TLS
            self._observe(False)
            raise
        self._observe(r.status_code not in TOKEN_REFUSED)
        return r

    def _observe(self, ok: bool) -> None:
        if self.observer is not None:
            self.observer(self.base_url, ok)

    @staticmethod
    def _refused(r: requests.Response, what: str) -> NotifierError:
        try:
            doc = r.json()
            code, message = str(doc.get("error", "")), str(doc.get("message", ""))
        except ValueError:
            code, message = "", r.text[:200]
        return NotifierError(
            f"metadata server refused {what}: HTTP {r.status_code} {code} {message}".strip(),
            status=r.status_code,
            code=code or None,
        )

    # ---- API ---------------------------------------------------------------------------------------------

    def healthz(self) -> bool:
        return self.request("GET", "/healthz").status_code == 200

    def list_droplets(self) -> list[dict[str, Any]]:
        r = self.request("GET", "/admin/v1/droplets")
        if r.status_code != 200:
            raise self._refused(r, "listing droplets")
        droplets = r.json().get("droplets", [])
        if not isinstance(droplets, list):
            raise NotifierError("metadata server answered a droplet list that is not a list")
        return droplets

    def get_droplet(self, droplet_id: str) -> dict[str, Any] | None:
        """The droplet's record with its event and ack, or None when the server does not know it."""
        r = self.request("GET", f"/admin/v1/droplets/{droplet_id}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._refused(r, f"reading droplet {droplet_id}")
        doc: dict[str, Any] = r.json()
        return doc

    def put_droplet(
        self, droplet_id: str, addresses: list[str], *, hostname: str = "", region: str = ""
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"addresses": list(addresses)}
        if hostname:
            body["hostname"] = hostname
        if region:
            body["region"] = region
        r = self.request("PUT", f"/admin/v1/droplets/{droplet_id}", body)
        if r.status_code not in (200, 201):
            raise self._refused(r, f"registering droplet {droplet_id}")
        doc: dict[str, Any] = r.json()
        return doc

    def delete_droplet(self, droplet_id: str) -> None:
        r = self.request("DELETE", f"/admin/v1/droplets/{droplet_id}")
        if r.status_code not in (204, 200, 404):
            raise self._refused(r, f"removing droplet {droplet_id}")

    def set_event(
        self,
        droplet_id: str,
        event_id: str,
        event: str,
        state: str,
        *,
        not_before: datetime | None = None,
        deadline: datetime | None = None,
        expected: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Set the droplet's one current event. ``NotifierError`` (status 404) if the droplet is unknown.

        ``expected`` adds the optional prediction fields (``expected_downtime_ms``, ``expected_duration_s``).
        A server too old to know them refuses them as unknown fields; the event is then set without them.
        """
        body: dict[str, Any] = {"id": event_id, "event": event, "state": state}
        if not_before is not None:
            body["not_before"] = format_time(not_before)
        if deadline is not None:
            body["deadline"] = format_time(deadline)
        path = f"/admin/v1/droplets/{droplet_id}/maintenance"
        r = self.request("PUT", path, {**body, **(expected or {})})
        if expected and r.status_code == 400 and _unknown_field(r) in expected:
            r = self.request("PUT", path, body)
        if r.status_code not in (200, 201):
            raise self._refused(r, f"setting event {event_id} on droplet {droplet_id}")
        doc: dict[str, Any] = r.json()
        return doc

    def clear_event(self, droplet_id: str) -> None:
        """Clear the droplet's event. An unknown droplet has no event: that is success too."""
        r = self.request("DELETE", f"/admin/v1/droplets/{droplet_id}/maintenance")
        if r.status_code not in (204, 200, 404):
            raise self._refused(r, f"clearing the event of droplet {droplet_id}")


def _unknown_field(r: requests.Response) -> str | None:
    """The field a 400 answer refused as unknown, if that is what it says."""
    try:
        doc = r.json()
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("error") == "unknown_field" and isinstance(doc.get("field"), str):
        return str(doc["field"])
    return None
