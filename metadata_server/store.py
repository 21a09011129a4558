"""The metadata server's own small store: one SQLite file, durable before any admin answer.

Every write is one ``BEGIN IMMEDIATE`` transaction committed with ``synchronous=FULL`` in WAL mode, so
what the admin API acknowledged survives a restart, ``kill -9`` and a power cut. The guest workers are
other processes: they notice writes through ``PRAGMA data_version`` (see ``hub.py``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, Conflict, NotFound
from .model import UNKNOWN, Ack, AckAction, Droplet, Event, EventKind, EventState, Expectation

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS droplets (
    id TEXT PRIMARY KEY,
    hostname TEXT,
    region TEXT
);
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    droplet_id TEXT NOT NULL REFERENCES droplets(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS addresses_droplet ON addresses(droplet_id);
CREATE TABLE IF NOT EXISTS events (
    droplet_id TEXT PRIMARY KEY REFERENCES droplets(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    not_before TEXT,
    deadline TEXT,
    notified_at TEXT NOT NULL,
    ack_action TEXT,
    ack_power_on_after INTEGER,
    ack_at TEXT
);
-- One row per droplet ever written: the sequence number of its last change (removals included),
-- so other processes can reload just what changed since the sequence number they last saw.
CREATE TABLE IF NOT EXISTS changes (
    droplet_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_seq ON changes(seq);
"""
# Columns added after the table was first created: (schema version that added it, column, SQL type).
# Each is added when missing, so a crash between ALTER and the user_version bump simply skips it.
_ADDED_EVENT_COLUMNS = (
    (3, "expected_downtime_ms", "REAL"),
    (3, "expected_duration_s", "REAL"),
)


class Store:
    """Thread-safe access to the state file. Cheap to construct; opens the file at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"cannot open state file {path}: {e}") from e
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"state file {self.path} has schema version {version}, newer than this server's "
                f"{SCHEMA_VERSION}; upgrade the server"
            )
        if version < SCHEMA_VERSION:
            # executescript commits first; the schema is idempotent (IF NOT EXISTS), so a crash midway
            # simply redoes it on the next start.
            self._conn.executescript(_SCHEMA)
            have = {row[1] for row in self._conn.execute("PRAGMA table_info(events)")}
            for added_in, column, sql_type in _ADDED_EVENT_COLUMNS:
                if version < added_in and column not in have:
                    self._conn.execute(f"ALTER TABLE events ADD COLUMN {column} {sql_type}")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits."""
        with self._lock:
            (v,) = self._conn.execute("PRAGMA data_version").fetchone()
            return int(v)

    # ---- droplets -------------------------------------------------------------------------------------

    def put_droplet(
        self, droplet_id: str, addresses: list[str], hostname: str | None, region: str | None
    ) -> tuple[Droplet, bool]:
        """Register or replace a droplet. Returns the record and whether it was created."""
        with self._write() as c:
            self._touch(c, droplet_id)
            placeholders = ",".join("?" * len(addresses))
            clash = c.execute(
                f"SELECT address, droplet_id FROM addresses WHERE address IN ({placeholders}) "  # noqa: S608
                "AND droplet_id != ?",
                [*addresses, droplet_id],
            ).fetchone()
            if clash:
                raise Conflict(
                    f"address {clash[0]} already belongs to droplet {clash[1]}", code="address_in_use"
                )
            created = c.execute("SELECT 1 FROM droplets WHERE id = ?", (droplet_id,)).fetchone() is None
            c.execute(
                "INSERT INTO droplets (id, hostname, region) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET hostname = excluded.hostname, region = excluded.region",
                (droplet_id, hostname, region),
            )
            c.execute("DELETE FROM addresses WHERE droplet_id = ?", (droplet_id,))
            c.executemany(
                "INSERT INTO addresses (address, droplet_id) VALUES (?, ?)",
                [(a, droplet_id) for a in addresses],
            )
            return self._load(c, droplet_id), created

    def delete_droplet(self, droplet_id: str) -> None:
        with self._write() as c:
            self._touch(c, droplet_id)
            if c.execute("DELETE FROM droplets WHERE id = ?", (droplet_id,)).rowcount == 0:
                raise NotFound(f"no droplet {droplet_id}")

    def get(self, droplet_id: str) -> Droplet:
        with self._lock:
            return self._load(self._conn, droplet_id)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read (a snapshot) under the connection lock."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def snapshot(self) -> tuple[int, list[Droplet]]:
        """Every droplet with its event, in id order, and the change sequence they reflect: one read."""
        with self._read() as c:
            (seq,) = c.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
            addrs: dict[str, list[str]] = {}
            for address, did in c.execute("SELECT address, droplet_id FROM addresses ORDER BY address"):
                addrs.setdefault(did, []).append(address)
            events = {row[0]: _event(row[1:]) for row in c.execute(_SELECT_ALL_EVENTS)}
            droplets = [
                Droplet(
                    id=did, hostname=h, region=r, addresses=tuple(addrs.get(did, ())), event=events.get(did)
                )
                for did, h, r in c.execute("SELECT id, hostname, region FROM droplets ORDER BY id")
            ]
            return int(seq), droplets

    def all(self) -> list[Droplet]:
        """Every droplet with its event, in id order."""
        return self.snapshot()[1]

    # ---- events ---------------------------------------------------------------------------------------

    def set_event(
        self,
        droplet_id: str,
        event_id: str,
        kind: EventKind,
        state: EventState,
        not_before: str | None,
        deadline: str | None,
        now: str,
        expected: Expectation = UNKNOWN,
    ) -> tuple[Droplet, bool]:
        """Set the droplet's one current event. Same id: update, keep ack. New id: replace, drop ack.

        ``expected`` replaces the stored prediction either way (a PUT without it clears it).
        """
        with self._write() as c:
            self._touch(c, droplet_id)
            self._require(c, droplet_id)
            row = c.execute("SELECT id FROM events WHERE droplet_id = ?", (droplet_id,)).fetchone()
            if row is not None and row[0] == event_id:
                c.execute(
                    "UPDATE events SET kind = ?, state = ?, not_before = ?, deadline = ?, "
                    "expected_downtime_ms = ?, expected_duration_s = ? WHERE droplet_id = ?",
                    (
                        kind.value,
                        state.value,
                        not_before,
                        deadline,
                        expected.downtime_ms,
                        expected.duration_s,
                        droplet_id,
                    ),
                )
                created = False
            else:
                c.execute("DELETE FROM events WHERE droplet_id = ?", (droplet_id,))
                c.execute(
                    "INSERT INTO events (droplet_id, id, kind, state, not_before, deadline, notified_at, "
                    "expected_downtime_ms, expected_duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        droplet_id,
                        event_id,
                        kind.value,
                        state.value,
                        not_before,
                        deadline,
                        now,
                        expected.downtime_ms,
                        expected.duration_s,
                    ),
                )
                created = True
            return self._load(c, droplet_id), created

    def clear_event(self, droplet_id: str) -> None:
        with self._write() as c:
            self._touch(c, droplet_id)
            self._require(c, droplet_id)
            c.execute("DELETE FROM events WHERE droplet_id = ?", (droplet_id,))

    def acknowledge(
        self, droplet_id: str, event_id: str, action: AckAction, power_on_after: bool, now: str
    ) -> Droplet:
        with self._write() as c:
            self._touch(c, droplet_id)
            self._require(c, droplet_id)
            row = c.execute("SELECT id FROM events WHERE droplet_id = ?", (droplet_id,)).fetchone()
            if row is None:
                raise Conflict("no maintenance event is scheduled for this droplet", code="no_event")
            if row[0] != event_id:
                raise Conflict(f"event {event_id} is not the current event", code="stale_event")
            c.execute(
                "UPDATE events SET ack_action = ?, ack_power_on_after = ?, ack_at = ? WHERE droplet_id = ?",
                (action.value, int(power_on_after), now, droplet_id),
            )
            return self._load(c, droplet_id)

    # ---- helpers --------------------------------------------------------------------------------------

    @staticmethod
    def _touch(c: sqlite3.Connection, droplet_id: str) -> None:
        c.execute(
            "INSERT INTO changes (droplet_id, seq) "
            "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM changes)) "
            "ON CONFLICT(droplet_id) DO UPDATE SET seq = excluded.seq",
            (droplet_id,),
        )

    def changed_since(self, seq: int) -> tuple[int, dict[str, Droplet | None]]:
        """Droplets written after ``seq`` (None: removed), and the newest sequence number; one read."""
        with self._read() as c:
            rows = c.execute("SELECT droplet_id, seq FROM changes WHERE seq > ?", (seq,)).fetchall()
            out: dict[str, Droplet | None] = {}
            for droplet_id, s in rows:
                seq = max(seq, s)
                try:
                    out[droplet_id] = self._load(c, droplet_id)
                except NotFound:
                    out[droplet_id] = None
            return seq, out

    @staticmethod
    def _require(c: sqlite3.Connection, droplet_id: str) -> None:
        if c.execute("SELECT 1 FROM droplets WHERE id = ?", (droplet_id,)).fetchone() is None:
            raise NotFound(f"no droplet {droplet_id}")

    @staticmethod
    def _load(c: sqlite3.Connection, droplet_id: str) -> Droplet:
        row = c.execute("SELECT hostname, region FROM droplets WHERE id = ?", (droplet_id,)).fetchone()
        if row is None:
            raise NotFound(f"no droplet {droplet_id}")
        addresses = tuple(
            a
            for (a,) in c.execute(
                "SELECT address FROM addresses WHERE droplet_id = ? ORDER BY address", (droplet_id,)
            )
        )
        ev = c.execute(_SELECT_EVENT, (droplet_id,)).fetchone()
        return Droplet(
            id=droplet_id,
            hostname=row[0],
            region=row[1],
            addresses=addresses,
            event=_event(ev) if ev else None,
        )


_SELECT_EVENT = (
    "SELECT id, kind, state, not_before, deadline, notified_at, ack_action, ack_power_on_after, ack_at, "
    "expected_downtime_ms, expected_duration_s FROM events WHERE droplet_id = ?"
)
_SELECT_ALL_EVENTS = (
    "SELECT droplet_id, id, kind, state, not_before, deadline, notified_at, ack_action, "
    "ack_power_on_after, ack_at, expected_downtime_ms, expected_duration_s FROM events"
)


def _event(row: tuple[object, ...] | sqlite3.Row) -> Event:
    eid, kind, state, not_before, deadline, notified_at, ack_action, ack_poa, ack_at, downtime, duration = row
    ack = (
        Ack(action=AckAction(ack_action), power_on_after=bool(ack_poa), at=str(ack_at))
        if ack_action is not None
        else None
    )
    return Event(
        id=str(eid),
        kind=EventKind(kind),
        state=EventState(state),
        not_before=_opt(not_before),
        deadline=_opt(deadline),
        notified_at=str(notified_at),
        ack=ack,
        expected_downtime_ms=_opt_float(downtime),
        expected_duration_s=_opt_float(duration),
    )


def _opt(v: object) -> str | None:
    return None if v is None else str(v)


def _opt_float(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) else None
