"""A worker name is held by one live process at a time.

Two processes under one name would each take the other's running attempts for their own leftovers (a worker
takes back its own attempts at once after a restart) and abort them. So ``host-engine run`` holds its name
for as long as it lives:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a dedicated connection. The
  database releases it when the connection ends, however the process died (kill -9, a lost machine).
- SQLite: an exclusive ``flock`` on a lock file beside the database; the kernel releases it with the process.

A second process asking for a held name is refused with :class:`WorkerNameTaken`, naming the holder (the
``workers`` row: host, pid, start time). A store outage drops the PostgreSQL connection and its lock: the
holder takes the lock back when the store returns (:meth:`WorkerName.tick`), and if another process got it
first, the holder stops (``on_lost``) rather than run beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, HostEngineError, StoreError
from host_engine.store import Store
from host_engine.timeparse import format_time

log = logging.getLogger(__name__)

# Check the name is still held (and record a heartbeat) this often: a store that comes back after an outage
# sees the lock again within this time.
DEFAULT_CHECK_EVERY_S = 10.0
# Names of in-memory SQLite databases held by this process (no file to lock).
_MEMORY_HELD: set[str] = set()
_MEMORY_LOCK = threading.Lock()


class WorkerNameTaken(Conflict):
    """Another live process holds this worker name."""


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of a worker name (stable across processes and versions)."""
    digest = hashlib.sha256(b"host-engine worker\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_file_path(database: str, name: str) -> Path:
    """The lock file of worker ``name`` beside a SQLite database file."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    path = Path(database)
    return path.with_name(f"{path.name}.worker-{digest}.lock")


class WorkerName:
    """Holds a worker name for this process (:meth:`acquire` ... :meth:`release`, or ``with``).

    Also an engine-loop step: :meth:`tick` checks the name is still held now and then, takes the lock back
    after a store outage, and records a heartbeat in ``workers``.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        check_every_s: float = DEFAULT_CHECK_EVERY_S,
        on_lost: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not name:
            raise WorkerNameTaken("a worker needs a name")
        self.store = store
        self.name = name
        self.check_every_s = check_every_s
        self.on_lost = on_lost
        self.monotonic = monotonic
        self.held = False
        self._conn: sa.Connection | None = None
        self._file: IO[bytes] | None = None
        self._checked_at = 0.0
        self._lost_logged = False

    # ---- holding -----------------------------------------------------------------------------------------

    def acquire(self) -> WorkerName:
        """Take the name, or raise :class:`WorkerNameTaken` naming the process that holds it."""
        if not self._lock():
            raise WorkerNameTaken(self._taken_message())
        self.held = True
        self._checked_at = self.monotonic()
        self._record(started=True)
        log.info("worker %s: name held by this process (pid %s)", self.name, os.getpid())
        return self

    def release(self) -> None:
        """Give the name up (the row says when); safe to call twice, and when the store is unreachable."""
        if not self.held:
            return
        try:
            self._record(stopped=True)
        except HostEngineError as e:
            log.warning("worker %s: stop not recorded: %s", self.name, e)
        self._unlock()
        self.held = False

    def __enter__(self) -> WorkerName:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def tick(self) -> None:
        """Every ``check_every_s``: make sure the name is still ours (re-taking the lock after a store
        outage) and record a heartbeat. Raises :class:`StoreError` while the store is unreachable; calls
        ``on_lost`` (and raises :class:`WorkerNameTaken`) if another process took the name meanwhile."""
        if not self.held or self.monotonic() - self._checked_at < self.check_every_s:
            return
        self._checked_at = self.monotonic()
        try:
            if not self._still_locked():
                self._unlock()
                if not self._lock():
                    self.held = False
                    message = self._taken_message()
                    log.error("worker %s: lost its name to another process: %s; stopping", self.name, message)
                    if self.on_lost is not None:
                        self.on_lost()
                    raise WorkerNameTaken(message)
                log.warning("worker %s: name held again after the store came back", self.name)
            self._record()
        except StoreError as e:
            # Nobody can take the name while the store is away: try again at the next check, quietly.
            if not self._lost_logged:
                log.warning(
                    "worker %s: store unreachable (%s); keeping the name when it answers", self.name, e
                )
                self._lost_logged = True
            return
        self._lost_logged = False

    # ---- the lock itself ---------------------------------------------------------------------------------

    def _backend(self) -> tuple[str, str | None]:
        url = self.store.engine.url
        return url.get_backend_name(), url.database

    def _lock(self) -> bool:
        backend, database = self._backend()
        if backend == "postgresql":
            return self._lock_postgres()
        if not database or database == ":memory:":
            with _MEMORY_LOCK:
                if self.name in _MEMORY_HELD:
                    return False
                _MEMORY_HELD.add(self.name)
                return True
        path = lock_file_path(database, self.name)
        f = path.open("a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._file = f
        return True

    def _lock_postgres(self) -> bool:
        try:
            conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = bool(
                conn.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": advisory_key(self.name)}
                ).scalar()
            )
        except sa.exc.SQLAlchemyError as e:
            first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
            raise StoreError(f"store error taking worker name {self.name!r}: {first}") from e
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def _still_locked(self) -> bool:
        if self._conn is None:
            # A file lock (or an in-memory name) is held until the process lets it go; on PostgreSQL no
            # session means no lock (lost with the store, not yet taken back).
            return self._backend()[0] != "postgresql"
        try:
            self._conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return False  # the session (and its lock) ended: the store restarted or the link broke
        return True

    def _unlock(self) -> None:
        if self._conn is not None:
            # A failure means the session is gone, and its lock with it.
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": advisory_key(self.name)})
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None
        backend, database = self._backend()
        if backend != "postgresql" and (not database or database == ":memory:"):
            with _MEMORY_LOCK:
                _MEMORY_HELD.discard(self.name)

    # ---- the workers row ---------------------------------------------------------------------------------

    def _record(self, *, started: bool = False, stopped: bool = False) -> None:
        w = t.workers
        with self.store.begin() as tx:
            values: dict[str, object] = {"heartbeat_at": tx.now}
            if started:
                values.update(
                    hostname=socket.gethostname(), pid=os.getpid(), started_at=tx.now, stopped_at=None
                )
            if stopped:
                values["stopped_at"] = tx.now
            updated = tx.conn.execute(w.update().where(w.c.name == self.name).values(**values))
            if updated.rowcount == 0:
                tx.conn.execute(
                    w.insert().values(
                        name=self.name,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        started_at=tx.now,
                        heartbeat_at=tx.now,
                        stopped_at=tx.now if stopped else None,
                    )
                )

    def _taken_message(self) -> str:
        holder = ""
        try:
            with self.store.begin(readonly=True) as tx:
                row = tx.conn.execute(sa.select(t.workers).where(t.workers.c.name == self.name)).first()
            if row is not None:
                holder = f" (pid {row.pid} on {row.hostname or '?'}, since {format_time(row.started_at)})"
        except HostEngineError:
            pass
        return (
            f"worker name {self.name!r} is held by another live host-engine process{holder}; "
            "give each worker its own name ([engine] worker, or --worker)"
        )
