"""``guest-agent run``: wire the config, journal, watcher, metrics and signals around the :class:`Agent`.

Signals: SIGTERM/SIGINT let the running hook step finish (up to its timeout), save state and exit 0;
SIGHUP reloads the config file (a bad file is logged and the old config kept).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType

from guest_agent.agent import Agent
from guest_agent.config import AgentConfig
from guest_agent.errors import ConfigError, GuestAgentError
from guest_agent.journal import Journal
from guest_agent.metrics import Metrics, serve
from guest_agent.source import Notice, SDKSource, Watcher

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # how often the main loop looks at signals when nothing happens
ERROR_PAUSE_S = 5.0  # after an unexpected error: retry in-process rather than crash-loop under systemd
_NO_NEWS = object()


class Daemon:
    """The running agent process. Build it with :meth:`open` (which takes the journal lock)."""

    def __init__(self, config: AgentConfig, load: Callable[[], AgentConfig], journal: Journal) -> None:
        self.config = config
        self._load = load
        self._reload = threading.Event()
        self.metrics = Metrics()
        self.journal = journal
        self._source = SDKSource(config.metadata)
        self.agent = Agent(config, self.journal, source=self._source, metrics=self.metrics)
        self._watcher = self._new_watcher(self._source)

    @classmethod
    def open(cls, config: AgentConfig, load: Callable[[], AgentConfig]) -> Daemon:
        """Lock, then load, the journal (one agent per journal) before anything runs."""
        journal = Journal.open_locked(config.agent.journal_path)
        return cls(config, load, journal)

    def _new_watcher(self, source: SDKSource) -> Watcher:
        return Watcher(
            source,
            max_backoff_s=self.config.metadata.max_backoff_s,
            on_change=lambda n: self.metrics.metadata_up(n is not None),
        )

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.agent.stopping:
            log.warning("%s: finishing the current step, then exiting", signal.Signals(signum).name)
        self.agent.request_stop()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        server = None
        if self.config.metrics.enabled:
            try:
                server = serve(self.metrics, self.config.metrics.host, self.config.metrics.port)
            except OSError as e:
                self.journal.unlock()
                where = f"{self.config.metrics.host}:{self.config.metrics.port}"
                raise GuestAgentError(f"cannot serve metrics on {where}: {e.strerror or e}") from e
        log.info(
            "guest-agent started: metadata %s%s, journal %s",
            self.config.metadata.url,
            f" from {self.config.metadata.source_address}" if self.config.metadata.source_address else "",
            self.config.agent.journal_path,
        )
        try:
            self.agent.report_interrupted()
            self._watcher.start()
            notice: Notice | None = None
            self._handle(None)  # resume a phase that needs no answer from the server
            while not self.agent.stopping:
                item = self._next(IDLE_TICK_S)
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload()
                if item is not _NO_NEWS:
                    notice = item  # type: ignore[assignment]
                self._handle(notice)
        finally:
            self._watcher.stop()
            self._source.close()
            if server is not None:
                server.shutdown()
            self.journal.unlock()
        log.info("guest-agent stopped; state saved in %s", self.config.agent.journal_path)
        return 0

    def _handle(self, notice: Notice | None) -> None:
        try:
            self.agent.handle(notice)
        except Exception:  # a full disk, a bug: log it, keep the state, try again shortly
            log.exception("error while handling the event; retrying in %.0f s", ERROR_PAUSE_S)
            self.agent.wait_for_stop(ERROR_PAUSE_S)

    def _next(self, timeout_s: float) -> object:
        """The latest item from the watcher (only the newest matters), or _NO_NEWS."""
        try:
            item: object = self._watcher.queue.get(timeout=timeout_s)
        except queue.Empty:
            return _NO_NEWS
        while True:
            try:
                item = self._watcher.queue.get_nowait()
            except queue.Empty:
                return item

    def _do_reload(self) -> None:
        try:
            new = self._load()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, keeping the old one: %s", e)
            return
        if new.agent.journal_path != self.config.agent.journal_path or new.metrics != self.config.metrics:
            log.warning("SIGHUP: journal_path and [metrics] changes take effect on restart only")
        old_metadata = self.config.metadata
        self.config = new
        if new.metadata != old_metadata:
            self._watcher.stop()
            self._source.close()
            self._source = SDKSource(new.metadata)
            self._watcher = self._new_watcher(self._source)
            self._watcher.start()
        self.agent.replace_config(new, self._source)
        log.info("SIGHUP: config reloaded from %s", new.source)
