"""guest_sdk.daemon_logging: the formats the three daemons log in (the daemons themselves, run as processes,
are in tests/unit/deploy/test_logging_daemons.py)."""

from __future__ import annotations

import doctest
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from guest_sdk import daemon_logging
from guest_sdk.daemon_logging import (
    LogFormat,
    active_format,
    log_format_option,
    redact,
    setup_logging,
    syslog_priority,
)

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards (pytest's own capture handlers included)."""
    logger = logging.getLogger()
    saved = logger.handlers[:], logger.level, sys.excepthook
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    sys.excepthook = saved[2]
    logging.captureWarnings(False)


def emit(root: logging.Logger, fmt: str, *, env: dict[str, str] | None = None) -> str:
    stream = io.StringIO()
    setup_logging(fmt, "debug", stream=stream, environ=env or {})
    log = logging.getLogger("host_engine.executor")
    log.debug("polling")
    log.info("migration_id=%s droplet_id=%s attempt %s started", "m-7", "web1", 1)
    log.warning("reconcile http://127.0.0.1:1 failed: refused")
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        log.exception("migration_id=%s: attempt thread failed", "m-7")
    log.critical("engine stopped")
    return stream.getvalue()


def test_journal_lines_carry_the_syslog_priority_and_no_timestamp(root: logging.Logger) -> None:
    lines = emit(root, "journal").splitlines()
    assert lines[:3] == [
        "<7>host_engine.executor: polling",
        "<6>host_engine.executor: migration_id=m-7 droplet_id=web1 attempt 1 started",
        "<4>host_engine.executor: reconcile http://127.0.0.1:1 failed: refused",
    ]
    assert lines[3] == "<3>host_engine.executor: migration_id=m-7: attempt thread failed"
    assert lines[-1] == "<2>host_engine.executor: engine stopped"
    # The traceback's lines keep the error priority (journald gives an unprefixed line the default, info).
    traceback_lines = lines[4:-1]
    assert traceback_lines[0] == "<3>Traceback (most recent call last):"
    assert traceback_lines[-1] == "<3>RuntimeError: disk full"
    assert all(line.startswith("<3>") for line in traceback_lines)
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_auto_is_journal_under_systemd_else_text_with_a_utc_timestamp(root: logging.Logger) -> None:
    assert emit(root, "auto", env={"JOURNAL_STREAM": "8:4242"}).startswith("<7>host_engine.executor: polling")
    text = emit(root, "auto").splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z DEBUG host_engine\.executor: polling", text[0]
    )
    assert text[2].endswith(" WARNING host_engine.executor: reconcile http://127.0.0.1:1 failed: refused")
    assert LogFormat.AUTO.resolve({"JOURNAL_STREAM": ""}) is LogFormat.TEXT


def test_json_is_one_object_a_line_with_the_ids_and_the_traceback_as_one_field(root: logging.Logger) -> None:
    docs = [json.loads(line) for line in emit(root, "json").splitlines()]
    assert len(docs) == 5  # the traceback did not add lines
    for doc in docs:
        assert set(doc) >= {"time", "level", "logger", "message", "pid"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
        assert doc["logger"] == "host_engine.executor"
    assert [d["level"] for d in docs] == ["debug", "info", "warning", "error", "critical"]
    started, failed = docs[1], docs[3]
    assert (started["migration_id"], started["droplet_id"]) == ("m-7", "web1")
    assert "event_id" not in started
    assert failed["migration_id"] == "m-7"  # "m-7:" in the message: the colon is not part of the id
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("RuntimeError: disk full")
    assert "exception" not in docs[0] and "droplet_id" not in docs[0]


def test_json_ids_passed_as_extra_become_fields(root: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging(LogFormat.JSON, logging.INFO, stream=stream, environ={})
    logging.getLogger("guest_agent").info("hook ran", extra={"event_id": "ev-9", "droplet_id": "d1"})
    doc = json.loads(stream.getvalue())
    assert (doc["event_id"], doc["droplet_id"], doc["message"]) == ("ev-9", "d1", "hook ran")


@pytest.mark.parametrize("fmt", ["text", "journal", "json"])
def test_secrets_are_never_logged(root: logging.Logger, fmt: str) -> None:
    stream = io.StringIO()
    setup_logging(fmt, "info", stream=stream, environ={})
    log = logging.getLogger("host_engine.store")
    log.info("store postgresql://engine:hunter2@db.internal/engine")
    log.warning("admin call sent Authorization: Bearer tok-5ecret-123 and got 401")
    log.info('body {"token": "tok-5ecret-123", "droplet_id": "d1"} admin_token=tok-5ecret-123&x=1')
    try:
        raise ValueError("password=hunter2 refused")
    except ValueError:
        log.exception("connect failed")
    out = stream.getvalue()
    assert "hunter2" not in out and "tok-5ecret-123" not in out, out
    assert "postgresql://engine:***@db.internal/engine" in out
    assert "Bearer ***" in out and "admin_token=***" in out


def test_redact_keeps_what_is_not_a_secret() -> None:
    line = "droplet_id=d1 token_file=/etc/engine/token url=http://127.0.0.1:8080/admin user=ops"
    assert redact(line) == line


def test_syslog_priority_of_custom_levels() -> None:
    assert [syslog_priority(n) for n in (5, 10, 15, 20, 25, 30, 35, 40, 50, 60)] == [
        7,
        7,
        7,
        6,
        6,
        4,
        4,
        3,
        2,
        2,
    ]


def test_a_host_programs_logging_is_left_alone_when_asked(root: logging.Logger) -> None:
    foreign = logging.StreamHandler(io.StringIO())
    root.handlers[:] = [foreign]
    assert setup_logging("json", "info", replace_foreign=False) is None
    assert root.handlers == [foreign] and active_format() is None
    ours = setup_logging("json", "info", stream=io.StringIO())
    assert root.handlers == [ours] and active_format() is LogFormat.JSON
    # Once ours, a second setup (the `-v` of the group, then `run --log-format`) replaces it.
    again = setup_logging("journal", "info", stream=io.StringIO(), replace_foreign=False)
    assert root.handlers == [again] and active_format() is LogFormat.JOURNAL


def test_the_option_parses_to_the_enum_and_refuses_other_values() -> None:
    @click.command()
    @log_format_option(envvar="X_LOG_FORMAT")
    def cmd(log_format: LogFormat) -> None:
        click.echo(repr(log_format))

    runner = CliRunner()
    assert runner.invoke(cmd, []).output.strip() == repr(LogFormat.AUTO)
    assert runner.invoke(cmd, ["--log-format", "json"]).output.strip() == repr(LogFormat.JSON)
    assert runner.invoke(cmd, [], env={"X_LOG_FORMAT": "journal"}).output.strip() == repr(LogFormat.JOURNAL)
    bad = runner.invoke(cmd, ["--log-format", "xml"])
    assert bad.exit_code == 2 and "'xml' is not one of 'auto', 'text', 'journal', 'json'" in bad.output


@pytest.mark.parametrize("where", ["main", "thread"])
def test_an_uncaught_exception_in_json_mode_is_one_json_line(where: str) -> None:
    body = "raise ValueError('boom password=hunter2')"
    if where == "thread":
        body = f"import threading\ndef f():\n    {body}\nt = threading.Thread(target=f); t.start(); t.join()"
    script = "from guest_sdk.daemon_logging import setup_logging\nsetup_logging('json', 'info')\n" + body
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    doc = json.loads(lines[0])
    assert doc["level"] == "critical" and doc["message"].startswith("uncaught exception")
    assert doc["exception"].endswith("ValueError: boom password=***")


def test_python_warnings_are_log_records(root: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("journal", "info", stream=stream, environ={})
    import warnings

    warnings.warn("old api", DeprecationWarning, stacklevel=1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>py.warnings: ") and "DeprecationWarning: old api" in lines[0]
    assert all(line.startswith("<4>") for line in lines)


def test_module_docstring_examples() -> None:
    assert doctest.testmod(daemon_logging).failed == 0


def test_error_line_follows_the_format_the_daemon_chose(root: logging.Logger) -> None:
    line = "host-engine: error: store unreachable"
    root.handlers[:] = [logging.StreamHandler(io.StringIO())]  # not set up by us: the line as it is
    assert daemon_logging.error_line(line, "host_engine") == line
    setup_logging("text", "info", stream=io.StringIO())
    assert daemon_logging.error_line(line, "host_engine") == line  # the CLIs' one-line contract
    setup_logging("journal", "info", stream=io.StringIO())
    assert daemon_logging.error_line(line, "host_engine") == f"<3>host_engine: {line}"
    setup_logging("json", "info", stream=io.StringIO())
    doc = json.loads(daemon_logging.error_line(line, "host_engine"))
    assert (doc["level"], doc["logger"], doc["message"]) == ("error", "host_engine", line)
