"""guest_sdk.console_script: a console script without its extra says in one line which extra to install and
exits 2; with it, the CLI runs on the arguments (the real scripts are also checked in
tests/unit/host_engine/test_cli_safety.py)."""

from __future__ import annotations

import doctest
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version

import pytest

from guest_sdk import console_script
from guest_sdk.console_script import Cli, ConsoleScript

VERSION = version("droplet-live-migration")
ABSENT = "no_such_module_for_the_console_script_test"


def script(modules: tuple[str, ...], load_cli: Callable[[], Cli] | None = None) -> ConsoleScript:
    return ConsoleScript(
        prog="demo",
        extra="demo-extra",
        what="the demo",
        extra_modules=modules,
        package="demo_pkg",
        load_cli=load_cli or (lambda: pytest.fail("the CLI was imported without its extra")),
    )


def test_console_script_without_its_extra_says_which_in_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        script(("json", ABSENT)).main(["run", "--flag"])
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"demo: error: the demo needs the 'demo-extra' extra (no module {ABSENT}): "
        "pip install 'droplet-live-migration[demo-extra]'\n"
    )


def test_console_script_answers_version_without_its_extra(capsys: pytest.CaptureFixture[str]) -> None:
    script((ABSENT,)).main(["--version"])
    assert capsys.readouterr() == (f"demo, version {VERSION}\n", "")


def test_console_script_with_its_extra_runs_the_cli_on_the_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    s = script(("json",), load_cli=lambda: seen.append)
    s.main(["host", "list"])
    monkeypatch.setattr(sys, "argv", ["demo", "--version"])
    s.main()
    assert seen == [["host", "list"], ["--version"]]  # --version is the CLI's own once the extra is there
    assert capsys.readouterr() == ("", "")


def test_console_script_names_an_extra_module_its_list_missed(capsys: pytest.CaptureFixture[str]) -> None:
    def load() -> Cli:
        raise ModuleNotFoundError("No module named 'gevent.monkey'", name="gevent.monkey")

    with pytest.raises(SystemExit) as exc:
        script(("json",), load_cli=load).main(["serve"])
    assert exc.value.code == 2
    assert (
        "(no module gevent.monkey): pip install 'droplet-live-migration[demo-extra]'"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("name", ["demo_pkg.cli", "__main__", None])
def test_console_script_lets_a_missing_module_of_its_own_package_through(name: str | None) -> None:
    """A module of the script's own package missing is a bug in the install, not a missing extra."""

    def load() -> Cli:
        raise ModuleNotFoundError("gone", name=name)

    with pytest.raises(ModuleNotFoundError, match="gone"):
        script(("json",), load_cli=load).main([])


@pytest.mark.parametrize(
    ("entry", "blocked", "message"),
    [
        ("host_engine._entry", "sqlalchemy", "host-engine: error: the host engine needs the 'host' extra"),
        (
            "metadata_server._entry",
            "flask",
            "metadata-server: error: the metadata server needs the 'server' extra",
        ),
    ],
)
def test_console_scripts_in_a_process_without_their_extra_exit_2_with_one_line(
    entry: str, blocked: str, message: str
) -> None:
    """The engine's and the server's entries, as a fresh interpreter runs them, with one extra module hidden."""
    code = f"import sys; sys.modules[{blocked!r}] = None; from {entry} import main; main()"
    r = subprocess.run(
        [sys.executable, "-c", code, "serve"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert f"(no module {blocked}" in r.stderr


def test_console_script_doctest() -> None:
    assert doctest.testmod(console_script).failed == 0
