"""How the project's daemons log: one setup and one set of formats for ``host-engine run``,
``metadata-server serve`` (its gunicorn arbiters and workers included) and ``guest-agent run``.

``guest_sdk`` is the one package every other installs, so this module lives here and is public; it imports
only the standard library and click.

Four formats, chosen with ``--log-format`` (:class:`LogFormat`):

* ``auto`` (the default): ``journal`` when ``$JOURNAL_STREAM`` is set (systemd connected stderr to the
  journal), else ``text``;
* ``text``: ``2026-12-04T05:03:15.123Z INFO host_engine.engine: engine started`` (UTC);
* ``journal``: ``<6>host_engine.engine: engine started``: no timestamp (journald adds its own) and the
  syslog priority as the ``<N>`` prefix journald reads (``SyslogLevelPrefix=``); every line of a multi-line
  message (a traceback) carries the prefix, so none of it falls back to the default priority;
* ``json``: one JSON object a line, never more (a traceback is one ``exception`` field)::

    {"time": "2026-12-04T05:03:15.123Z", "level": "info", "logger": "host_engine.executor",
     "message": "migration_id=m-1 droplet_id=web1 attempt 1 started", "pid": 4242,
     "migration_id": "m-1", "droplet_id": "web1"}

  The ids (:data:`ID_KEYS`) become fields when the message carries them as ``key=value`` (the way every
  line about a migration, droplet or event is written) or when the call passed them as ``extra=``.

In every format secrets are redacted (:func:`redact`): bearer tokens, ``token=``/``password=``/``secret=``
values and the password of a URL's userinfo become ``***``.

>>> import json
>>> doc = json.loads(JsonFormatter().format(logging.makeLogRecord(
...     {"name": "demo", "levelno": 20, "levelname": "INFO", "msg": "droplet_id=%s event_id=%s set",
...      "args": ("web1", "ev-1")})))
>>> doc["droplet_id"], doc["event_id"], doc["level"]
('web1', 'ev-1', 'info')
>>> redact("postgresql://engine:hunter2@db/x Authorization: Bearer abc token=s3cret")
'postgresql://engine:***@db/x Authorization: Bearer *** token=***'
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any, TypeVar

import click

__all__ = [
    "ID_KEYS",
    "JournalFormatter",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "active_format",
    "error_line",
    "log_format_option",
    "redact",
    "setup_logging",
    "syslog_priority",
]

ID_KEYS = ("migration_id", "droplet_id", "event_id")
"""The ids a line about a migration, a droplet or an event carries; JSON lines have them as fields."""

QUIET_LOGGERS = ("urllib3", "requests")
"""Libraries whose INFO lines (one per connection) drown the daemons' own: WARNING and up only."""

_ID_RE = re.compile(r"(?<![\w.-])(" + "|".join(ID_KEYS) + r")=([^\s,;]+)")
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"), r"\1***"),
    # userinfo of a URL: postgresql://user:password@host
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    # key=value and "key": "value" for names that end in token, password, secret or api key
    (
        re.compile(r"(?i)(\b[\w-]*(?:token|password|passwd|secret|api[_-]?key)=)[^\s\"',;&]+"),
        r"\1***",
    ),
    (
        re.compile(r"(?i)(\"[\w-]*(?:token|password|passwd|secret|api[_-]?key)\"\s*:\s*\")[^\"]*\""),
        r'\1***"',
    ),
)


class LogFormat(enum.Enum):
    """What ``--log-format`` accepts; :meth:`resolve` turns ``AUTO`` into the format to use."""

    AUTO = "auto"
    TEXT = "text"
    JOURNAL = "journal"
    JSON = "json"

    def resolve(self, environ: Mapping[str, str] | None = None) -> LogFormat:
        """``AUTO`` is ``JOURNAL`` when ``$JOURNAL_STREAM`` is set, else ``TEXT``; others are themselves."""
        if self is not LogFormat.AUTO:
            return self
        env = os.environ if environ is None else environ
        return LogFormat.JOURNAL if env.get("JOURNAL_STREAM") else LogFormat.TEXT


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: DEBUG 7, INFO 6, WARNING 4, ERROR 3, CRITICAL 2.

    A custom level takes the priority of the nearest standard level at or below it.
    """
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def redact(text: str) -> str:
    """``text`` with bearer tokens, ``token=``-like values and URL passwords replaced by ``***``."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _RedactingFormatter(logging.Formatter):
    """Formats message and traceback as :class:`logging.Formatter` does, with :func:`redact` applied."""

    def message_of(self, record: logging.LogRecord) -> str:
        return redact(record.getMessage())

    def exception_of(self, record: logging.LogRecord) -> str:
        """The traceback and stack of ``record`` (empty when it has none), redacted."""
        parts = []
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return redact("\n".join(parts))


class TextFormatter(_RedactingFormatter):
    """``<RFC 3339 UTC time> <LEVEL> <logger>: <message>``, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_rfc3339(record.created)} {record.levelname} {record.name}: {self.message_of(record)}"
        exception = self.exception_of(record)
        return f"{line}\n{exception}" if exception else line


class JournalFormatter(_RedactingFormatter):
    """``<priority><logger>: <message>``: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = f"{record.name}: {self.message_of(record)}"
        exception = self.exception_of(record)
        if exception:
            text = f"{text}\n{exception}"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(_RedactingFormatter):
    """One JSON object a line: time, level, logger, message, pid, the ids, and ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        message = self.message_of(record)
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "pid": record.process,
        }
        for key, value in _ID_RE.findall(message):
            doc.setdefault(key, value.rstrip(".:)").strip("'\""))
        for key in ID_KEYS:
            value = getattr(record, key, None)  # passed as extra={...}
            if value is not None:
                doc[key] = redact(str(value))
        exception = self.exception_of(record)
        if exception:
            doc["exception"] = exception
        return json.dumps(doc, ensure_ascii=False, default=str)


_FORMATTERS: dict[LogFormat, type[_RedactingFormatter]] = {
    LogFormat.TEXT: TextFormatter,
    LogFormat.JOURNAL: JournalFormatter,
    LogFormat.JSON: JsonFormatter,
}


class _DaemonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (told apart from handlers a host program installed)."""

    def __init__(self, stream: IO[str], log_format: LogFormat) -> None:
        super().__init__(stream)
        self.log_format = log_format
        self.setFormatter(_FORMATTERS[log_format]())


def setup_logging(
    log_format: LogFormat | str,
    level: int | str,
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    replace_foreign: bool = True,
) -> logging.Handler | None:
    """Send every log record of this process to ``stream`` (stderr) in ``log_format``, from ``level`` up.

    Call it once, in the daemon's entry point, before any fork (children inherit it). It replaces the root
    logger's handlers; with ``replace_foreign=False`` a root logger that a host program configured (a test
    harness, an embedding application: any handler this function did not install) is left alone and
    ``None`` is returned. Also: the libraries in :data:`QUIET_LOGGERS` log WARNING and up, Python warnings
    go through logging, and in the ``journal`` and ``json`` formats an uncaught exception (main thread or
    another) is logged as one CRITICAL record instead of a bare traceback on stderr.
    """
    fmt = LogFormat(log_format).resolve(environ)
    root = logging.getLogger()
    if not replace_foreign and any(not isinstance(h, _DaemonHandler) for h in root.handlers):
        return None
    handler = _DaemonHandler(sys.stderr if stream is None else stream, fmt)
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    if fmt is not LogFormat.TEXT:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    return handler


def active_format() -> LogFormat | None:
    """The format :func:`setup_logging` set up for this process, or ``None`` if it did not configure it.

    For a line a CLI says on stderr itself when nothing logs (``created a new store``): a daemon logs it.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _DaemonHandler):
            return handler.log_format
    return None


def error_line(line: str, logger: str = "cli") -> str:
    """A CLI's one-line error (``host-engine: error: ...``) as the daemon's log format has it.

    Unchanged unless :func:`setup_logging` chose ``journal`` (then with the error priority, ``<3>``, so
    ``journalctl -p err`` shows why the daemon exited) or ``json`` (then one JSON object, level ``error``).
    """
    fmt = active_format()
    if fmt is None or fmt is LogFormat.TEXT:
        return line
    record = logging.LogRecord(logger, logging.ERROR, __file__, 0, line, None, None)
    return _FORMATTERS[fmt]().format(record)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("uncaught").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("uncaught").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


F = TypeVar("F", bound=Callable[..., Any])


def log_format_option(envvar: str) -> Callable[[F], F]:
    """The ``--log-format [auto|text|journal|json]`` option (also ``$envvar``), as a :class:`LogFormat`.

    A value not in the list is a usage error (the CLI's one line, exit 2).
    """
    return click.option(
        "--log-format",
        "log_format",
        type=click.Choice([f.value for f in LogFormat]),
        default=LogFormat.AUTO.value,
        envvar=envvar,
        show_default=True,
        callback=lambda _ctx, _param, value: LogFormat(value),
        help=f"How to log on stderr: auto (journal under systemd, else text), text, journal or json "
        f"(also ${envvar}).",
    )
