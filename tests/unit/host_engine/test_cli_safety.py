"""The CLIs' edges: ``--version`` everywhere, the console scripts without their extra, and read commands that
never create a store (issue 13, items 2, 4 and 5)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from guest_agent.cli import main as guest_agent_main
from guest_sdk.__main__ import main as guest_sdk_main
from host_engine import _entry as host_entry
from host_engine.cli import Deps, cli
from host_engine.store import database_url
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


# ---- read commands never create a store ----------------------------------------------------------------

HINT = "(create one with `host-engine init` or `host-engine host add`)"

# Every command that needs a store already there, with arguments that would otherwise be accepted: reads, and
# changes to hosts, droplets or migrations that must already exist (on a new store they could only fail).
NEEDS_A_STORE: list[list[str]] = [
    ["host", "list"],
    ["host", "list", "--json"],
    ["host", "show", "hv1"],
    ["host", "set-state", "hv1", "maintenance"],
    ["droplet", "add", "d1", "--host", "hv1", "--vcpus", "1", "--memory", "1GiB", "--disk", "1GiB"],
    ["droplet", "set", "d1", "--hostname", "x"],
    ["droplet", "list"],
    ["droplet", "show", "d1"],
    ["inventory", "sync", "hv1"],
    ["inventory", "sync", "hv1", "--dry-run"],
    ["plan", "evacuate", "hv1"],
    ["evacuate", "hv1", "--start", "+1h"],
    ["evacuate", "hv1", "--start", "+1h", "--dry-run"],
    ["migrate", "d1", "--start", "+1h"],
    ["migrate", "d1", "--now", "--unsafe-short-notice"],
    ["cancel", "m-1"],
    ["abort", "m-1"],
    ["force-complete", "m-1", "--reason", "window closing"],
    ["status"],
    ["status", "--json"],
    ["status", "--watch", "--count", "1"],
    ["report", "m-1"],
    ["history", "d1"],
    ["sim", "calibrate"],
]
# The commands that may start from nothing, and so create the store (saying so on stderr).
CREATES_A_STORE: list[list[str]] = [
    ["init"],
    ["host", "add", "hv1", "--datacenter", "nyc1", "--vcpus", "4", "--memory", "8GiB", "--disk", "100GiB"],
    ["run", "--max-ticks", "1"],
]
# Commands that do not open the engine's store: demo keeps its own, install-unit writes a systemd unit.
NO_STORE = {"demo", "install-unit"}


def _leaf_commands(group: click.Group, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out |= _leaf_commands(command, f"{prefix}{name} ")
        else:
            out.add(f"{prefix}{name}")
    return out


def _command_of(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("host", "droplet", "inventory", "plan", "sim") else argv[0]


def test_every_command_says_whether_it_may_create_the_store() -> None:
    """A new command must be added to one of the lists above (and so to the tests below)."""
    covered = {_command_of(a) for a in NEEDS_A_STORE + CREATES_A_STORE} | NO_STORE
    assert _leaf_commands(cli) == covered


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(
        cli, list(args), obj=Deps(user="tester", install_signals=False, sleep=lambda s: None), env=env,
        catch_exceptions=False,
    )  # fmt: skip
    return r.exit_code, r.stdout, r.stderr


def test_host_list_on_a_missing_path_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    """Issue 13.2: ``--db /nonexistent/dir/x.db host list`` exited 0 with an empty table and created the
    directory and a database."""
    db = tmp_path / "nonexistent" / "dir" / "x.db"
    code, out, err = run_cli("--db", str(db), "host", "list")
    assert (code, out) == (3, "")
    assert err == f"host-engine: error: no store at {db} {HINT}\n"
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("argv", NEEDS_A_STORE, ids=" ".join)
def test_commands_that_need_a_store_refuse_a_missing_one(tmp_path: Path, argv: list[str]) -> None:
    db = tmp_path / "nope" / "engine.db"
    code, out, err = run_cli("--db", str(db), *argv)
    assert code == 3, (out, err)
    assert err == f"host-engine: error: no store at {db} {HINT}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_default_store_is_not_created_by_a_read(tmp_path: Path) -> None:
    env: dict[str, str | None] = {"XDG_STATE_HOME": str(tmp_path / "state"), "HOST_ENGINE_DB": None}
    code, _out, err = run_cli("status", env=env)
    assert code == 3 and err.startswith(
        f"host-engine: error: no store at {tmp_path}/state/host-engine/engine.db"
    )
    assert not (tmp_path / "state").exists()
    code, _out, err = run_cli("init", env=env)
    assert code == 0 and (tmp_path / "state" / "host-engine" / "engine.db").exists()


@pytest.mark.parametrize("argv", CREATES_A_STORE, ids=" ".join)
def test_commands_that_start_from_nothing_create_the_store_and_say_so(
    tmp_path: Path, argv: list[str]
) -> None:
    db = tmp_path / "new" / "engine.db"
    code, _out, err = run_cli("--db", str(db), *argv)
    assert code == 0, err
    assert err.splitlines()[0] == f"host-engine: created a new store at {db}"
    assert db.exists()
    code, out, err = run_cli("--db", str(db), "host", "list")
    assert code == 0 and out.startswith("HOST") and "created" not in err


def test_init_creates_once_then_leaves_the_store_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    code, out, err = run_cli("--db", str(db), "init")
    assert code == 0 and out.startswith(f"store created at {db} (schema version ")
    assert err == f"host-engine: created a new store at {db}\n"
    assert run_cli("--db", str(db), "host", "add", "hv1", "--datacenter", "nyc1", "--vcpus", "4", "--memory",
                   "8GiB", "--disk", "100GiB")[0] == 0  # fmt: skip
    code, out, err = run_cli("--db", str(db), "init")
    assert code == 0 and out.startswith(f"store ready at {db} (schema version ") and err == ""
    code, out, _err = run_cli("--db", str(db), "host", "list", "--json")
    assert code == 0 and [h["name"] for h in json.loads(out)] == ["hv1"]


def test_a_database_without_the_stores_tables_is_no_store(db_url: str) -> None:
    """An empty SQLite file or an empty PostgreSQL database: a read refuses it and adds no table to it."""
    if "://" not in db_url:
        Path(db_url).touch()
    code, _out, err = run_cli("--db", db_url, "host", "list")
    assert code == 3 and "no store at " in err and HINT in err, err
    engine = sa.create_engine(database_url(db_url))
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert run_cli("--db", db_url, "init")[0] == 0
    code, out, err = run_cli("--db", db_url, "host", "list")
    assert code == 0 and out.startswith("HOST"), err


def test_not_a_database_is_one_line_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "notes.txt"
    db.write_text("not a database\n" * 100)
    for argv in (["host", "list"], ["init"]):
        code, out, err = run_cli("--db", str(db), *argv)
        assert code == 7 and out == "", (out, err)
        assert len(err.splitlines()) == 1 and err.startswith("host-engine: error: cannot open store"), err
    assert db.read_text() == "not a database\n" * 100


@pytest.mark.parametrize(
    ("db", "code", "message"),
    [
        ("", 2, "--db must be a path or a postgresql:// URL, got ''"),
        ("   ", 2, "--db must be a path or a postgresql:// URL"),
        ("a\0b", 2, "--db must be a path or a postgresql:// URL"),
        ("nosuchdriver://x/y", 7, "cannot use database"),
        ("postgresql://nobody@127.0.0.1:1/none", 7, "cannot open store"),
    ],
)
def test_bad_db_values_are_one_line(tmp_path: Path, db: str, code: int, message: str) -> None:
    for argv in (["host", "list"], ["init"]):
        got, out, err = run_cli("--db", db, *argv)
        assert (got, out) == (code, ""), err
        assert len(err.splitlines()) == 1 and err.startswith("host-engine: error: ") and message in err, err


def test_a_directory_as_db_is_one_line(tmp_path: Path) -> None:
    for argv in (["host", "list"], ["init"]):
        code, out, err = run_cli("--db", str(tmp_path), *argv)
        assert code == 7 and out == "" and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
