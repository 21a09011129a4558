"""The app factories take what gunicorn's ``module:factory(...)`` syntax passes: literals, paths as strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from metadata_server.app import create_app, create_guest_app
from metadata_server.config import TOKEN_ENV
from metadata_server.errors import ConfigError

from .conftest import TOKEN


def test_create_app_from_strings_reads_the_token_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "state.sqlite3")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for app in (create_app(db, token_file=str(token_file)), create_app(db, TOKEN)):
        with app.test_client() as c:
            assert (
                c.get("/admin/v1/droplets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            )
    with pytest.raises(ConfigError, match=f"no admin token: give --admin-token-file or set {TOKEN_ENV}"):
        create_app(db)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with create_app(db).test_client() as c:
        assert c.get("/admin/v1/droplets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    with pytest.raises(ConfigError, match="db_path must be a file path"):
        create_app("")


@pytest.mark.parametrize(("given", "expected"), [(None, 8), (3, 3), ("5", 5)])
def test_create_guest_app_from_strings(tmp_path: Path, given: int | str | None, expected: int) -> None:
    app = create_guest_app(str(tmp_path / "state.sqlite3"), max_waits_per_droplet=given, watch=False)
    assert app.settings.max_waits_per_droplet == expected


@pytest.mark.parametrize("given", [0, -1, "four", "", "\u0665", True, 2.5])
def test_create_guest_app_refuses_a_bad_cap_in_one_line(tmp_path: Path, given: object) -> None:
    with pytest.raises(ConfigError, match="max_waits_per_droplet must be a positive integer"):
        create_guest_app(tmp_path / "state.sqlite3", max_waits_per_droplet=given, watch=False)  # type: ignore[arg-type]
