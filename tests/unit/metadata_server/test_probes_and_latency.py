"""Liveness/readiness probes without a token, and the request-latency histogram."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from werkzeug.test import Client

from metadata_server.admin import create_admin_app
from metadata_server.guest import GuestApp
from metadata_server.store import Store

from .conftest import AUTH, D1, TOKEN


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
def test_probes_answer_without_a_token_and_say_nothing_else(admin: Client, path: str) -> None:
    admin.put("/admin/v1/droplets/secret-d1", json={"addresses": [D1], "hostname": "db-prod"}, headers=AUTH)
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):
        r = admin.get(path, headers=headers)
        assert (r.status_code, r.data, r.mimetype) == (200, b"ok\n", "text/plain")
        assert set(r.headers.keys()) == {"Content-Type", "Content-Length", "Cache-Control"}
    assert admin.post(path).status_code == 405
    # Only the probes: everything else still wants the token, however the path is spelled.
    for other in ("/healthz", "/metrics", "/admin/v1/droplets", path.upper(), path + "/", path + "x"):
        assert admin.get(other).status_code == 401, other


def test_readiness_is_503_when_the_state_file_does_not_answer(db: Path) -> None:
    store = Store(db)
    with create_admin_app(store, TOKEN).test_client() as admin:
        assert admin.get("/readyz").status_code == 200
        store.close()  # the state file stops answering
        r = admin.get("/readyz")
        assert (r.status_code, r.data) == (503, b"not ready\n")
        assert admin.get("/livez").status_code == 200  # alive, just not ready


def sample(text: str, name: str, **labels: str) -> float:
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{wanted} in the metrics")


def test_admin_requests_are_timed_per_endpoint(admin: Client) -> None:
    admin.put("/admin/v1/droplets/d1", json={"addresses": [D1]}, headers=AUTH)
    admin.get("/admin/v1/droplets/d1", headers=AUTH)
    admin.get("/admin/v1/droplets/d2", headers=AUTH)  # 404s are timed too
    admin.get("/admin/v1/droplets/d1")  # and 401s
    text = admin.get("/metrics", headers=AUTH).get_data(as_text=True)
    name = "metadata_server_request_duration_seconds"
    endpoint = "/admin/v1/droplets/<droplet_id>"
    assert sample(text, name + "_count", listener="admin", endpoint=endpoint) == 4
    assert sample(text, name + "_bucket", listener="admin", endpoint=endpoint, le="+Inf") == 4
    assert 0 < sample(text, name + "_sum", listener="admin", endpoint=endpoint) < 4 * 5


def test_guest_requests_are_timed_but_held_long_polls_are_not(two_droplets: GuestApp) -> None:
    client = Client(two_droplets)

    def get(path: str) -> None:
        client.open(path, environ_base={"REMOTE_ADDR": D1})

    get("/v1/maintenance_event")
    get("/v1/maintenance_event.json")
    get("/v1/maintenance_event")
    etag = client.open("/v1/maintenance_event", environ_base={"REMOTE_ADDR": "127.0.0.3"}).headers["ETag"]
    held = f"/v1/maintenance_event?wait_for_change=true&last_etag={etag}&timeout_sec=1"
    client.open(held, environ_base={"REMOTE_ADDR": "127.0.0.3"})  # held 1 s, then answered unchanged
    get("/metadata/v1/id")
    text = generate_latest(two_droplets.metrics.registry).decode()
    name = "metadata_server_request_duration_seconds"
    assert sample(text, name + "_count", listener="guest", endpoint="/v1/maintenance_event") == 3
    assert sample(text, name + "_count", listener="guest", endpoint="/v1/maintenance_event.json") == 1
    assert sample(text, name + "_count", listener="guest", endpoint="/metadata/v1/id") == 1
    assert sample(text, name + "_sum", listener="guest", endpoint="/v1/maintenance_event") < 0.9
    fast = sample(text, name + "_bucket", listener="guest", endpoint="/v1/maintenance_event", le="0.5")
    assert fast == 3
