"""The CLIs' edges: ``--version`` everywhere, the console scripts without their extra, and read commands that
never create a store (issue 13, items 2, 4 and 5)."""

from __future__ import annotations

import sys
from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

from guest_agent.cli import main as guest_agent_main
from guest_sdk.__main__ import main as guest_sdk_main
from host_engine import _entry as host_entry
from host_engine.cli import Deps, cli
from metadata_server import _entry as server_entry
from metadata_server.cli import main as metadata_server_main

VERSION = version("droplet-live-migration")

# ---- --version -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        (cli, "host-engine"),
        (metadata_server_main, "metadata-server"),
        (guest_agent_main, "guest-agent"),
        (guest_sdk_main, "python -m guest_sdk"),
    ],
)
def test_every_cli_answers_version(command: click.Command, prog: str) -> None:
    r = CliRunner().invoke(command, ["--version"], obj=Deps(), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{prog}, version {VERSION}\n"


@pytest.mark.parametrize(("entry", "prog"), [(host_entry, "host-engine"), (server_entry, "metadata-server")])
def test_console_scripts_answer_version_with_or_without_their_extra(
    entry: object, prog: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    main = entry.main  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"{prog}, version {VERSION}\n"
    for module in entry.EXTRA_MODULES:  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module, None)  # find_spec answers None: "not installed"
    main(["--version"])
    assert capsys.readouterr().out == f"{prog}, version {VERSION}\n"


# ---- a console script without its extra ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "prog", "extra", "argv"),
    [
        (host_entry, "host-engine", "host", ["host", "list"]),
        (host_entry, "host-engine", "host", ["--help"]),
        (server_entry, "metadata-server", "server", ["serve"]),
        (server_entry, "metadata-server", "server", []),
    ],
)
def test_console_script_without_its_extra_names_it_in_one_line(
    entry: object,
    prog: str,
    extra: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = entry.EXTRA_MODULES[0]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)  # type: ignore[attr-defined]
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"{prog}: error: the {'host engine' if extra == 'host' else 'metadata server'} needs the "
        f"'{extra}' extra (no module {missing}): pip install 'droplet-live-migration[{extra}]'\n"
    )


def test_extra_modules_are_what_the_extras_install() -> None:
    """Each name the entry checks is installed by the extra it names (pyproject), so the check and the
    advice agree."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["project"]
    server = {
        r.split(">")[0].split("[")[0].strip().replace("-", "_")
        for r in project["optional-dependencies"]["server"]
    }
    assert "droplet-live-migration[server]" in project["optional-dependencies"]["host"]
    assert set(server_entry.EXTRA_MODULES) <= server
    assert set(host_entry.EXTRA_MODULES) <= server
    scripts = project["scripts"]
    assert scripts["host-engine"] == "host_engine._entry:main"
    assert scripts["metadata-server"] == "metadata_server._entry:main"
