"""gunicorn's own log lines (arbiter and workers) in the server's format.

gunicorn gives its ``gunicorn.error`` logger a handler of its own with its own format
(``[2026-12-04 05:03:15 +0000] [42] [INFO] ...``) and stops it from propagating. :class:`PropagatingLogger`
(gunicorn's ``logger_class``) removes that handler and lets the records reach the root logger, which
``metadata-server serve`` configured before forking (``guest_sdk.daemon_logging``): so under journald they
carry syslog priorities and no timestamp, and with ``--log-format json`` they are JSON lines like the rest.
The access log stays off (``accesslog`` unset); if a deployment sets it, its lines follow the same way.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger


class PropagatingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, minus its handlers: its records go to the process's root logger."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # levels, and handlers we drop below (it runs again on a config reload)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                if getattr(handler, "_gunicorn", False):
                    logger.removeHandler(handler)
            logger.propagate = True
